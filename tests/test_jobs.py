"""``cxr submit`` / ``cxr jobs`` against a real Ray head started with ``ray start --head`` (dashboard
and job server on loopback), plus the parts that need no cluster.

The head gets its own ``--temp-dir`` and free ports, so it never touches another Ray on the machine,
and teardown stops exactly the processes that belong to it (matched by that temp dir), even when a
test fails."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cxr import jobs, stages

BIN = Path(sys.executable).parent  # the venv's bin: `cxr` and `ray` live beside this Python
LATER_STAGES = ("evaluate", "explain", "card", "report")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _head_processes(temp_dir: Path) -> list[psutil.Process]:
    """Every process of this head: those naming its temp dir on their command line, and their children
    (the job's `cxr run` is a child of the job supervisor)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(temp_dir) in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def _stop_head(temp_dir: Path) -> None:
    procs = _head_processes(temp_dir)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=8)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on loopback: ``ray start --head`` with the venv first on PATH (the raylet
    passes its environment to jobs, so the job finds the same `cxr`); yields the job server URL."""
    _require_run_verb()
    temp_dir = Path(tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dashboard, agent_http, agent_grpc, runtime_env, client_server, metrics = _free_ports(7)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "GX_ANALYTICS_ENABLED": "false",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           # The head is reachable from this machine only (loopback); token auth is a cluster's extra
           # layer (docs/cluster.md) and would tie the test to ~/.ray/auth_token.
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    command = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent_http}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
               f"--ray-client-server-port={client_server}", f"--metrics-export-port={metrics}", "--num-cpus=2", "--num-gpus=0",
               "--object-store-memory=400000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while True:  # the job server comes up a little after `ray start` returns
            try:
                jobs.client(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        yield address
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _write_config(folder: Path, values: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _job_id(text: str) -> str:
    return next(line.split()[2] for line in text.splitlines() if line.startswith("submitted job "))


def _require_run_verb() -> None:
    """The job's entrypoint is `cxr run`: without that verb in the CLI there is nothing to submit."""
    from cxr.cli import build_parser

    try:
        build_parser().parse_args(["run", "job.yaml"])
    except SystemExit:
        pytest.skip("`cxr run` is not wired into cxr/cli.py yet")


def _available_later_stages() -> dict[str, dict]:
    return {name: {"enabled": hasattr(stages, f"{name}_stage")} for name in LATER_STAGES}


@pytest.mark.ray
def test_submit_runs_the_pipeline_as_a_job_and_the_report_lands_in_the_run_dir(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    config = _write_config(tmp_path / "job", {
        "run": {"dir": str(run_dir)},
        "data": {"source": "phantoms", "patients": 30, "phantom_size": 64, "seed": 0},
        "split": {"test_frac": 0.2, "val_frac": 0.2, "min_positives": 2, "seed": 0},
        "preprocess": {"image_size": 32},
        "eda": {"sample_size": 16},
        "train": {"backbone": "resnet18", "weights": "none", "epochs": 1, "workers": 1, "batch_size": 8,
                  "cpus_per_worker": 0.5, "shuffle_buffer": 16},
        **_available_later_stages(),
    })
    out = io.StringIO()
    code = jobs.submit_and_follow(config, ray_head, working_dir=config.parent, env={"CXR_OFFLINE": "1"}, out=out)
    log = out.getvalue()
    assert code == 0, log[-3000:]
    job_id = _job_id(log)
    later = [name for name in LATER_STAGES if hasattr(stages, f"{name}_stage")]
    expected = ["ingest", "validate", "split", "preprocess", "eda", "train", *later]
    assert f"run: {len(expected)} stage(s) run ({', '.join(expected)})" in log
    assert f"job {job_id}: SUCCEEDED" in log
    if hasattr(stages, "report_stage"):
        assert (run_dir / "report.html").stat().st_size > 0
    else:  # the report stage is not in this build yet: the last artifact the pipeline makes is the checkpoint
        assert (run_dir / "train" / "best" / "model.json").exists()
    assert job_id in jobs.list_jobs(ray_head)
    assert "SUCCEEDED" in jobs.job_status(ray_head, job_id)
    assert "cxr run job.yaml" in jobs.job_status(ray_head, job_id)


@pytest.mark.ray
def test_a_failing_job_returns_non_zero_and_its_logs_name_the_error(ray_head, tmp_path):
    config = _write_config(tmp_path / "job", {
        "run": {"dir": str(tmp_path / "run")},
        "data": {"source": "nih", "csv": str(tmp_path / "missing" / "Data_Entry_2017.csv"), "images": str(tmp_path / "missing")},
        **{name: {"enabled": False} for name in ("preprocess", "eda", "train", *LATER_STAGES)},
    })
    out = io.StringIO()
    code = jobs.submit_and_follow(config, ray_head, working_dir=config.parent, out=out)
    log = out.getvalue()
    assert code == 1, log[-3000:]
    job_id = _job_id(log)
    assert f"job {job_id}: FAILED" in log
    logs = jobs.client(ray_head).get_job_logs(job_id)
    assert "ingest: failed after" in logs  # the stage that failed ...
    error = next(line for line in logs.splitlines() if line.startswith("cxr run: error:"))
    assert str(tmp_path / "missing") in error  # ... and why, naming the path at fault
    assert "FAILED" in jobs.job_status(ray_head, job_id)


# --------------------------------------------------------------------------- no cluster needed


def test_entrypoint_is_cxr_run_with_overrides_quoted():
    assert jobs.entrypoint("configs/nih.yaml", ["train.epochs=2", "run.dir=s3://b/my runs"], force=True) == (
        "cxr run configs/nih.yaml --set train.epochs=2 --set 'run.dir=s3://b/my runs' --force")


def test_env_pairs_and_upload_excludes():
    assert jobs.parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        jobs.parse_env(["oops"])
    assert {".venv", ".git", "runs", "*.parquet", "*.png"} <= set(jobs.EXCLUDES)
    assert jobs.DEFAULT_ENV["GX_ANALYTICS_ENABLED"] == "false"


def test_submit_checks_the_config_before_contacting_the_cluster(tmp_path):
    config = _write_config(tmp_path / "inside", {"run": {"dir": "runs/x"}, "data": {"source": "phantoms"}, "trian": {}})
    with pytest.raises(ValueError, match="unknown key 'trian'"):
        jobs.submit(config, "http://127.0.0.1:9", working_dir=config.parent)
    config.write_text(yaml.safe_dump({"run": {"dir": "runs/x"}, "data": {"source": "phantoms"}}))
    with pytest.raises(ValueError, match="outside the working dir"):
        jobs.submit(config, "http://127.0.0.1:9", working_dir=tmp_path / "elsewhere")
    assert "relative" in jobs.warnings_for(config)[0]
    assert jobs.warnings_for(config, ["run.dir=s3://bucket/runs"]) == []


def test_an_unreachable_job_server_says_how_to_reach_it():
    (port,) = _free_ports(1)
    with pytest.raises(ConnectionError, match="port-forward"):
        jobs.client(f"http://127.0.0.1:{port}")


def test_cli_wiring_of_submit_and_jobs():
    """The verbs the lead wires into cxr/cli.py parse into the names jobs.command reads."""
    from cxr.cli import build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(["submit", "c.yaml", "--address", "http://h:8265", "--env", "A=1", "--set", "train.epochs=1", "--no-wait"])
    except SystemExit:
        pytest.skip("cxr submit is not wired into cxr/cli.py yet")
    assert (args.verb, args.config, args.address, args.env, args.overrides, args.force, args.no_wait, args.working_dir) == (
        "submit", Path("c.yaml"), "http://h:8265", ["A=1"], ["train.epochs=1"], False, True, Path("."))
    args = parser.parse_args(["jobs", "logs", "raysubmit_1", "--follow"])
    assert (args.verb, args.jobs_verb, args.job_id, args.follow, args.address) == ("jobs", "logs", "raysubmit_1", True, None)
    assert isinstance(parser.parse_args(["jobs", "list"]), argparse.Namespace)
