"""Training on a real local Ray (2 CPUs): two DDP workers fed by Ray Data from synthetic shards;
outputs of the data contract; a worker killed mid-run and the run finishing from its checkpoint."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipelines.labels import FINDINGS
from pipelines.rundir import RunDir
from tests.train_fixtures import write_run
from trainers import TrainConfig, fit, load_checkpoint, prepare_input
from trainers.data import apply_uncertain, row_keys
from trainers.sampling import copies, make_plan

pytestmark = pytest.mark.ray

TINY = dict(backbone="resnet18", weights="none", freeze="none", batch_size=8, lr=1e-3, workers=2, shuffle_buffer=16)


def test_two_workers_train_report_auroc_and_write_the_checkpoint(ray_local, tmp_path):
    run = write_run(tmp_path / "run", n_train=64, n_val=30, image_size=32)
    result = fit(RunDir(run), TrainConfig(epochs=2, **TINY))

    history = pd.read_csv(run / "train" / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert set(history["world_size"]) == {2} and set(history["start_epoch"]) == {0}
    assert list(history["train_images"]) == [64, 64]  # 32 rows per worker, 4 full batches each
    assert list(history["val_images"]) == [30, 30]  # every validation image scored exactly once
    per_finding = [f"val_auroc_{f}" for f in FINDINGS]
    assert set(per_finding) <= set(history.columns)
    assert history["val_auroc_Hernia"].isna().all()  # never positive in these data: undefined, not 0.5
    assert history["val_mean_auroc"].max() > 0.6  # the bright squares are learnable
    assert result.best_metrics["val_mean_auroc"] == pytest.approx(history["val_mean_auroc"].max())

    best = run / "train" / "best"
    assert sorted(p.name for p in best.iterdir()) == ["model.json", "model.pt", "ood.npz"]
    from trainers.ood import read_ood

    ood, _ = read_ood(best)  # statistics of this run's train images, threshold on its 30 validation images
    assert ood.meta["train_images"] == 64 and ood.meta["val_images"] == 30 and ood.meta["threshold_on"] == "val"
    info = json.loads((best / "model.json").read_text())
    assert info["backbone"] == "resnet18" and info["findings"] == list(FINDINGS) and info["image_size"] == 32
    assert info["in_channels"] == 1 and info["train_config"]["effective_loss"] == "weighted"
    model, info = load_checkpoint(best)
    x = prepare_input(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), info)
    assert torch.sigmoid(model(x)).shape == (3, len(FINDINGS))
    assert json.loads((run / "train" / "config.json").read_text())["backbone"] == "resnet18"


def test_a_killed_worker_resumes_from_the_last_checkpoint_with_the_same_resampling(ray_local, tmp_path):
    run = write_run(tmp_path / "run", n_train=48, n_val=16, image_size=32, seed=1)
    marker = tmp_path / "worker-killed"
    # with a weight average, so the restarted group also resumes the average and the raw weights
    cfg = TrainConfig(epochs=3, sampling="over", max_failures=1, fail_at_epoch=2, fail_marker=str(marker), ema=0.9, **TINY)
    result = fit(RunDir(run), cfg)

    assert marker.exists()  # the last worker did exit hard during epoch 2
    history = result.metrics_history
    assert list(history["epoch"]) == [1, 2, 3]
    assert list(history["start_epoch"]) == [0, 1, 1]  # epochs 2 and 3 ran in the restarted group, from epoch 1's checkpoint
    # Epoch k's oversampled set is a function of (seed, k): the restarted group drew the same one.
    train = pd.concat(pd.read_parquet(p) for p in sorted((run / "shards" / "split=train").glob("*.parquet")))
    labels = apply_uncertain(train[list(FINDINGS)].to_numpy(), "zeros")
    plan = make_plan(labels, "over", seed=0, max_repeat=cfg.over_max_repeat)
    keys = row_keys(train["image_id"])
    expected = [2 * (int(copies(plan, labels, keys, e).sum()) // 2 // 8 * 8) for e in range(3)]
    assert list(history["train_images"]) == expected
    assert expected[0] > len(train) - 16  # oversampling added rows
    assert not math.isnan(history["val_loss"].iloc[-1])


def test_patience_stops_training_when_validation_auroc_stops_improving(ray_local, tmp_path):
    """Validation without a positive image gives no defined AUROC, so no epoch ever improves:
    with --patience 1 training stops after the first epoch instead of running all three."""
    run = write_run(tmp_path / "run", n_train=32, n_val=16, image_size=32)
    for part in (run / "shards" / "split=val").glob("*.parquet"):
        frame = pd.read_parquet(part)
        frame[list(FINDINGS)] = 0
        frame.to_parquet(part, index=False)
    result = fit(RunDir(run), TrainConfig(epochs=3, patience=1, **TINY))
    assert list(result.metrics_history["epoch"]) == [1]
    assert (run / "train" / "best" / "model.pt").exists()


def test_training_prints_one_line_per_epoch_as_it_ends(ray_local, tmp_path):
    run = write_run(tmp_path / "run", n_train=32, n_val=16, image_size=32)
    lines: list[str] = []
    # every small-data regulariser on, so their code runs in real workers
    cfg = TrainConfig(epochs=3, label_smoothing=0.1, mixup=0.2, dropout=0.2, ema=0.9, **TINY)
    result = fit(RunDir(run), cfg, echo=lines.append)
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]  # one per epoch, nothing per batch
    assert all("train loss" in line and "val mean AUROC" in line and "img/s" in line and "elapsed" in line for line in lines)
    assert "(best)" in lines[0] and "left ~" in lines[0] and "left ~" not in lines[-1]

    # With --ema the checkpoint holds the average; the raw weights travel in the training state.
    last = next(Path(result.ray_path).rglob("epoch-0003"))
    state = torch.load(last / "train_state.pt", weights_only=True)
    saved = torch.load(last / "model.pt", weights_only=True)
    assert set(state["raw_model"]) == set(saved)
    assert any(not torch.equal(saved[k], state["raw_model"][k]) for k in saved if saved[k].is_floating_point())
