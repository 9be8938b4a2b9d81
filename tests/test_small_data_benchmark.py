"""benchmarks/small_data.py ``within``: a mean AUROC split into "any finding vs none" and "which
finding, among images with one", checked on a hand-computed case."""
from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.small_data import separation


def test_a_model_that_only_knows_sick_from_healthy_is_at_chance_among_the_sick():
    # 10 healthy images at 0.1 for both findings; 5 with finding A and 5 with B, all at 0.9 for both
    n_healthy, n_each = 10, 5
    ids = [f"i{k}" for k in range(n_healthy + 2 * n_each)]
    a = [0] * n_healthy + [1] * n_each + [0] * n_each
    b = [0] * n_healthy + [0] * n_each + [1] * n_each
    p = [0.1] * n_healthy + [0.9] * (2 * n_each)
    manifest = pd.DataFrame({"image_id": ids, "cohort": "c", "A": a, "B": b})
    oof = pd.DataFrame({"image_id": ids, "prob_A": p, "prob_B": p})

    row = separation(oof, manifest, ["A", "B"]).set_index("images").loc["cohort c"]

    assert row["n"] == 20 and row["with a finding"] == 0.5
    assert row["any finding vs none (mean prob)"] == 1.0
    # all images, finding A: 5 positives at 0.9 beat the 10 healthy (0.1) and tie the 5 B images (0.9):
    # (5*10 + 5*5/2) / (5*15) = 0.8333; the same for B
    assert row["mean AUROC, all images"] == pytest.approx(62.5 / 75) and row["findings (all)"] == 2
    # among the 10 images with a finding the scores cannot tell A from B
    assert row["mean AUROC, among images with a finding"] == 0.5 and row["findings (among)"] == 2
