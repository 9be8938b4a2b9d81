"""Experiment tracking in MLflow (trainers/tracking.py, tuning/tracking.py): a real ``mlflow server``
on a free loopback port, and the embedded local store, read back through the MLflow client.

The runs are phantom collections (the demo's synthetic radiographs) written without Ray
(tests/test_eval_fixtures.py), then ``cxr train``, ``cxr tune`` and ``cxr evaluate`` through the CLI.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest

from cxr.cli import main
from tests.test_eval_fixtures import write_phantom_run
from trainers.tracking import Tracker, finite_metrics, flatten, headline_metrics, local_store

pytestmark = pytest.mark.ray
TRAIN_ARGS = ["--backbone", "resnet18", "--weights", "none", "--epochs", "1", "--batch-size", "8", "--workers", "1",
              "--cpus-per-worker", "0.5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, proxied artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"),
                            # tracking needs no job runner: without this the server forks a pool of huey consumers
                            # (7 processes here) that compete with the tests for the 2 CPUs
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A small phantom run (manifest, splits, shards at 32 px) shared by the module's trainings."""
    return write_phantom_run(tmp_path_factory.mktemp("tracked") / "run", n_patients=30, image_size=32)


def copy_run(phantom, tmp_path: Path) -> Path:
    """A fresh copy of the phantom run, so each test's MLflow records and outputs are its own."""
    target = tmp_path / "run"
    shutil.copytree(phantom.root, target, symlinks=True)
    return target


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_of(uri: str, experiment: str):
    c = client(uri)
    found = c.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} at {uri}"
    return c.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def artifact_paths(uri: str, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client(uri).list_artifacts(run_id, path)}


# --------------------------------------------------------------------------- no Ray


def test_flattening_and_metric_filtering_keep_only_finite_numbers():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": None}) == {"a.b": 1, "a.c.d": "x", "e": None}
    assert finite_metrics({"x": 1, "y": float("nan"), "z": "text", "w": True, "v": {"u": 2.5}}) == {"x": 1.0, "v.u": 2.5}
    metrics = {"mean": {"auroc": 0.71, "ci_low": 0.6, "ci_high": 0.8, "ap": 0.3}, "n_images": 40, "n_patients": 20,
               "per_finding": {"Mass": {"auroc": None, "ci_low": None, "ci_high": None, "ap": 0.1}},
               "baselines": {"metadata": {"mean_auroc": 0.55, "ci_low": 0.5, "ci_high": 0.6, "diff": 0.16, "diff_ci_low": 0.02, "diff_ci_high": 0.3}}}
    got = headline_metrics(metrics)
    assert got["mean_auroc"] == 0.71 and got["mean_auroc_ci_low"] == 0.6 and got["n_images"] == 40
    assert "Mass.auroc" not in got and got["Mass.ap"] == 0.1  # an undefined AUROC is left out, not logged as a number
    assert got["baseline.metadata.diff_ci_low"] == 0.02


def test_an_unreachable_server_warns_once_and_turns_tracking_off(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker.open(tmp_path, down, "cxr")
        run_id = tracker.start_run("train")
        tracker.log_metrics("some-run", {"x": 1.0})
    assert not tracker.enabled and run_id is None
    assert len([w for w in caught if "MLflow tracking is off" in str(w.message)]) == 1, [str(w.message) for w in caught]


def test_the_local_store_lives_in_the_run_directory(tmp_path):
    uri, artifacts = local_store(tmp_path)
    tracker = Tracker.open(tmp_path, None, "local")
    run_id = tracker.start_run("probe", {"cxr.stage": "test"})
    tracker.log_params(run_id, {"a": {"b": 1}, "long": "x" * 7000, **{f"p{i}": i for i in range(150)}})
    for step in (1, 2):
        tracker.log_metrics(run_id, {"val_mean_auroc": 0.5 + step / 10, "undefined": float("nan")}, step=step)
    tracker.end_run(run_id)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}" and (tmp_path / "mlflow.db").is_file()
    run = client(uri).get_run(run_id)
    assert run.data.params["a.b"] == "1" and len(run.data.params["long"]) == 6000 and run.data.params["p149"] == "149"
    history = client(uri).get_metric_history(run_id, "val_mean_auroc")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 0.6), (2, 0.7)]
    assert "undefined" not in run.data.metrics
    assert client(uri).get_experiment(run.info.experiment_id).artifact_location == artifacts


# --------------------------------------------------------------------------- real Ray, real server


def test_train_logs_to_a_server_and_registers_a_version_that_predicts_the_same(ray_local, server, phantom, tmp_path, capsys):
    run = copy_run(phantom, tmp_path)
    assert main(["train", "--run", str(run), *TRAIN_ARGS, "--tracking-uri", server, "--experiment", "served",
                 "--register", "cxr-phantom"]) == 0
    out = capsys.readouterr().out
    (train,) = runs_of(server, "served")
    assert train.info.status == "FINISHED" and train.data.tags["cxr.stage"] == "train"
    assert f"MLflow: run {train.info.run_id}" in out and "registered as cxr-phantom version 1" in out
    params = train.data.params
    assert params["backbone"] == "resnet18" and params["epochs"] == "1" and params["lr"]
    assert int(params["data.manifest_rows"]) > 0 and len(params["data.splits_sha256"]) == 64 and params["code_version"].startswith("cxr ")
    history = client(server).get_metric_history(train.info.run_id, "val_mean_auroc")
    assert [m.step for m in history] == [1]  # one point per epoch, logged as it ended
    assert {"best_checkpoint/model.pt", "best_checkpoint/model.json"} <= artifact_paths(server, train.info.run_id, "best_checkpoint")
    assert {"history.csv", "config.json"} <= artifact_paths(server, train.info.run_id)

    # The registered version downloads to a checkpoint that predicts exactly what the run's own does.
    import mlflow

    from evaluation.predict import predict_images

    version = client(server).get_model_version("cxr-phantom", "1")
    assert version.run_id == train.info.run_id
    source = client(server).get_model_version_download_uri("cxr-phantom", "1")
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "dl"), tracking_uri=server))
    images = sorted((run / "phantoms" / "images").glob("*.png"))[:3]
    ours = predict_images(run / "train" / "best", images)
    theirs = predict_images(downloaded, images)
    probs = [c for c in ours.columns if c.startswith("prob_")]
    np.testing.assert_allclose(theirs[probs].to_numpy(float), ours[probs].to_numpy(float), atol=1e-6)

    # Evaluating that checkpoint logs its own run, linked to the training, and tags the registered version.
    assert main(["evaluate", "--run", str(run), "--bootstrap", "20", "--no-robustness", "--tracking-uri", server, "--experiment", "served"]) == 0
    evaluation = [r for r in runs_of(server, "served") if r.data.tags.get("cxr.stage") == "evaluate"][0]
    assert evaluation.data.tags["cxr.trained_by"] == train.info.run_id
    import json

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluation.data.metrics["mean_auroc"] == pytest.approx(metrics["mean"]["auroc"])
    assert "metrics.json" in artifact_paths(server, evaluation.info.run_id)
    assert any(p.startswith("figures/") for p in artifact_paths(server, evaluation.info.run_id, "figures"))
    tags = client(server).get_model_version("cxr-phantom", "1").tags
    assert float(tags["test_mean_auroc"]) == pytest.approx(metrics["mean"]["auroc"])
    assert main(["report", "--run", str(run)]) == 0  # the report joins the evaluation's run
    assert "report.html" in artifact_paths(server, evaluation.info.run_id)


def test_tune_trials_nest_under_one_parent_run(ray_local, server, phantom, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = copy_run(phantom, tmp_path)
    assert main(["tune", "--run", str(run), "--backbone", "resnet18", "--weights", "none", "--epochs", "1", "--batch-size", "8",
                 "--workers", "1", "--cpus-per-worker", "0.5", "--sampling-grid", "none", "--loss-grid", "bce,weighted",
                 "--freeze-grid", "none", "--no-asha", "--tracking-uri", server, "--experiment", "search"]) == 0
    # Ray's callback sets the process's MLFLOW_TRACKING_URI; it must not leak into later stages of the process
    assert "MLFLOW_TRACKING_URI" not in __import__("os").environ
    runs = runs_of(server, "search")
    (parent,) = [r for r in runs if r.data.tags.get("cxr.stage") == "tune"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2 and all(t.data.tags["cxr.stage"] == "tune-trial" for t in trials)
    assert {t.data.params["loss"] for t in trials} == {"bce", "weighted"}  # each trial's own effective config
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert [m.step for m in client(server).get_metric_history(trial.info.run_id, "val_mean_auroc")] == [1]
        assert "best_checkpoint/model.pt" in artifact_paths(server, trial.info.run_id, "best_checkpoint")
    assert "best_checkpoint/model.pt" in artifact_paths(server, parent.info.run_id, "best_checkpoint")
    assert {"results.csv", "results.md"} <= artifact_paths(server, parent.info.run_id)
    assert parent.data.metrics["trials"] == 2


def test_the_embedded_local_store_is_the_default(ray_local, phantom, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = copy_run(phantom, tmp_path)
    assert main(["train", "--run", str(run), *TRAIN_ARGS]) == 0
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in capsys.readouterr().out
    uri, _ = local_store(run)
    (train,) = runs_of(uri, "cxr")
    assert [m.step for m in client(uri).get_metric_history(train.info.run_id, "val_loss")] == [1]
    assert "best_checkpoint/model.pt" in artifact_paths(uri, train.info.run_id, "best_checkpoint")
    assert (run / "mlartifacts").is_dir()


def test_training_completes_with_a_warning_when_the_server_is_down(ray_local, phantom, tmp_path, capsys):
    run = copy_run(phantom, tmp_path)
    down = f"http://127.0.0.1:{free_port()}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--run", str(run), *TRAIN_ARGS, "--tracking-uri", down]) == 0
    assert (run / "train" / "best" / "model.pt").is_file() and not (run / "train" / "tracking.json").exists()
    assert len([w for w in caught if "MLflow tracking is off" in str(w.message)]) == 1
    assert "MLflow: off" in capsys.readouterr().out


def test_no_tracking_leaves_no_store(ray_local, phantom, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = copy_run(phantom, tmp_path)
    assert main(["train", "--run", str(run), *TRAIN_ARGS, "--no-tracking"]) == 0
    assert not (run / "mlflow.db").exists() and not (run / "train" / "tracking.json").exists()


def test_cxr_run_ends_with_the_ui_command_of_the_local_store(tmp_path, monkeypatch):
    from cxr.demo import demo_config
    from cxr.pipeline import _tracking_line
    from pipelines.rundir import RunDir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = demo_config(str(tmp_path / "demo"))
    run = RunDir(tmp_path / "demo").ensure()
    assert config.tracking.enabled and _tracking_line(config, run) == []  # nothing logged yet
    Tracker.open(run.root, None, "cxr")  # what the first tracked stage does
    assert _tracking_line(config, run) == [f"MLflow runs: mlflow ui --backend-store-uri sqlite:///{run.root.resolve() / 'mlflow.db'} --port 5000"
                                           "  (then open http://127.0.0.1:5000)"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert _tracking_line(config, run) == ["MLflow runs: experiment 'cxr' at http://mlflow.internal:5000"]
