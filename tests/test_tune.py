"""Strategy search on a real local Ray: a 4-trial grid over tiny synthetic shards, and a trial that
Tune stops early handing its workers back."""
from __future__ import annotations

import os
import time

import pandas as pd
import pytest
import torch
from ray import tune

from pipelines.labels import FINDINGS
from pipelines.rundir import RunDir
from tests.train_fixtures import write_run
from trainers import TrainConfig, load_checkpoint, prepare_input
from tuning import default_space, load_space, run_search
from tuning.search import TRIAL_DRIVER_RESOURCES, max_concurrent_trials, state_api_reachable
from tuning.trial import run_trial

pytestmark = pytest.mark.ray

BASE = dict(backbone="resnet18", weights="none", freeze="none", batch_size=8, workers=1, cpus_per_worker=0.5, shuffle_buffer=16, epochs=2)


def test_four_trial_search_writes_a_sorted_table_and_a_loadable_best(ray_local, tmp_path, capsys):
    run = write_run(tmp_path / "run", n_train=48, n_val=24, image_size=32)
    space = default_space(lr=(1e-3, 3e-3), sampling=("none", "over"), loss=("bce", "weighted"), freeze=("none",))
    epoch_lines: list[str] = []
    result = run_search(RunDir(run), TrainConfig(**BASE), space, num_samples=1, asha=False, epoch_echo=epoch_lines.append)
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("trial ")]
    assert "Configuration for experiment" not in out and "View detailed results" not in out  # Tune's own box: not in a log
    assert [line.split()[1] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]  # one line per finished trial
    assert all("best val mean AUROC" in line and "2/2 epochs" in line for line in progress)
    # --verbose: one line per epoch of every trial, the line `cxr train` prints, named by its trial
    assert sorted((line.split()[1], line.split()[3]) for line in epoch_lines) == sorted((str(k), e) for k in range(1, 5) for e in ("1/2", "2/2"))
    assert all(line.startswith("trial ") and "train loss" in line and "val mean AUROC" in line for line in epoch_lines)

    table = pd.read_csv(run / "tune" / "results.csv")
    assert len(table) == 4
    assert {"sampling", "loss", "freeze", "lr", "status", "epochs", "best_val_mean_auroc", "weakest_findings"} <= set(table.columns)
    assert set(zip(table["sampling"], table["loss"])) == {("none", "bce"), ("none", "weighted"), ("over", "bce"), ("over", "weighted")}
    scores = table["best_val_mean_auroc"].tolist()
    assert scores == sorted(scores, reverse=True)
    assert (table["status"] == "completed").all() and (table["epochs"] == 2).all()
    assert all(len(w.split(", ")) == 3 for w in table["weakest_findings"])
    assert "| sampling" in (run / "tune" / "results.md").read_text()
    assert result.curves is not None and result.curves.exists()

    model, info = load_checkpoint(run / "tune" / "best")
    assert info["findings"] == list(FINDINGS)
    assert info["metrics"]["val_mean_auroc"] == pytest.approx(scores[0])  # the best trial's best epoch
    x = prepare_input(torch.zeros((2, 32, 32), dtype=torch.uint8), info)
    assert model(x).shape == (2, len(FINDINGS))


def reserved_placement_groups(ray_module) -> list[dict]:
    return [pg for pg in ray_module.util.placement_group_table().values() if pg["state"] != "REMOVED"]


@pytest.mark.solo  # the state API it checks must reach this test's Ray, not a parallel worker's
def test_a_trial_stopped_early_gives_its_workers_back(ray_local, tmp_path):
    """Tune kills the process of a trial it stops (as ASHA does); Ray Train V2 must still free that
    trial's worker reservation (ray-project/ray#54305), or an early-stopping search on a small
    cluster runs out of CPUs and hangs."""
    # as long as Ray waits for its dashboard (set in conftest): it answers slowly on a loaded machine
    deadline = time.monotonic() + float(os.environ["RAY_DASHBOARD_STARTUP_TIMEOUT_S"])
    while not state_api_reachable() and time.monotonic() < deadline:
        time.sleep(2)
    assert state_api_reachable()  # what Train's placement-group cleaner relies on
    run = write_run(tmp_path / "run", n_train=24, n_val=12, image_size=32)
    base = TrainConfig(**{**BASE, "epochs": 4})
    param_space = {"base": base.to_dict(), "run_dir": str(run), "train_storage": str(tmp_path / "ray" / "train")}
    tuner = tune.Tuner(
        tune.with_resources(run_trial, TRIAL_DRIVER_RESOURCES),
        param_space=param_space,
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), stop={"training_iteration": 1}, verbose=0),
    )
    grid = tuner.fit()
    assert grid[0].metrics["training_iteration"] == 1  # stopped after its first epoch of four

    deadline = time.monotonic() + 60  # the cleaner polls each second; this is a bound, not a timing
    while reserved_placement_groups(ray_local) and time.monotonic() < deadline:
        time.sleep(1)
    assert reserved_placement_groups(ray_local) == []
    assert ray_local.available_resources().get("CPU") == 2


def test_space_yaml_and_its_errors(tmp_path):
    good = tmp_path / "space.yaml"
    good.write_text("sampling: {grid: [none, under]}\nlr: {loguniform: [1.0e-4, 1.0e-2]}\nbatch_size: 16\n")
    space = load_space(good)
    assert space["batch_size"] == 16 and space["sampling"] == tune.grid_search(["none", "under"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n")
    with pytest.raises(ValueError, match="unknown parameter 'learning_rate'"):
        load_space(bad)
    bad.write_text("lr: {normal: [0, 1]}\n")
    with pytest.raises(ValueError, match="lr must be one of"):
        load_space(bad)


def test_concurrency_leaves_a_cpu_for_reads_and_counts_gpus():
    cpu = TrainConfig(**{**BASE, "workers": 2})
    assert max_concurrent_trials(cpu, {"CPU": 2}) == 1
    assert max_concurrent_trials(cpu, {"CPU": 8}) == 7
    gpu = TrainConfig(**{**BASE, "workers": 1, "gpus_per_worker": 0.5, "cpus_per_worker": 2})
    assert max_concurrent_trials(gpu, {"CPU": 32, "GPU": 4}) == 8
    with pytest.raises(ValueError, match="one trial needs"):
        max_concurrent_trials(cpu, {"CPU": 1})
