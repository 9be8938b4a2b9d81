"""Training across nodes: a real two-node Ray cluster on this machine (Ray's own test utility),
one training worker per node (STRICT_SPREAD), DDP over the network between them."""
from __future__ import annotations

import pytest

from pipelines.rundir import RunDir
from tests.train_fixtures import write_run
from trainers import TrainConfig, fit

pytestmark = pytest.mark.ray


def test_workers_on_two_nodes_train_and_report(two_node_cluster, tmp_path):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    run = write_run(tmp_path / "run", n_train=48, n_val=16, image_size=32)
    cfg = TrainConfig(backbone="resnet18", weights="none", freeze="none", epochs=1, batch_size=8, workers=2,
                      placement_strategy="STRICT_SPREAD", shuffle_buffer=16)
    result = fit(RunDir(run), cfg)
    row = result.metrics_history.iloc[-1]
    assert row["num_nodes"] == 2 and row["world_size"] == 2
    assert row["val_images"] == 16 and row["train_images"] == 48
    assert 0.0 <= row["val_mean_auroc"] <= 1.0
    assert (run / "train" / "best" / "model.pt").exists()
