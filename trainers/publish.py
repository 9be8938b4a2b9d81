"""Publishing a run's best checkpoint (``train/best``, ``tune/best``) for evaluation and prediction."""
from __future__ import annotations

import shutil
from pathlib import Path

from pipelines.atomic import staged_dir
from pipelines.rundir import RunDir
from trainers.checkpoint import INFO_FILE, MODEL_FILE


def publish_best(source: Path, best_dir: Path, ood_from: RunDir | None = None) -> Path:
    """Copy the data-contract files of the checkpoint folder ``source`` to ``best_dir``, swapped in
    whole: an evaluation never reads a model next to another model's ``model.json``. With
    ``ood_from``, the OOD statistics of that run's train and val shards are computed for these
    weights and written beside them (``ood.npz``, trainers/ood.py) before the swap."""
    with staged_dir(best_dir) as staging:
        for name in (MODEL_FILE, INFO_FILE):
            shutil.copy2(Path(source) / name, staging / name)
        if ood_from is not None:
            from trainers.ood import record_ood

            record_ood(staging, ood_from)
    return best_dir
