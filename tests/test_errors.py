"""User errors end as one line naming the file, key or option at fault (exit 1); bugs keep their
traceback; the embedded local Ray listens on loopback only.

Every case goes through ``cxr.cli.main`` as a user would type it, and reads what it printed."""
from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import pickle
import shutil
import subprocess
import threading
from ipaddress import ip_address
from pathlib import Path

import pytest
import yaml

from cxr.cli import main
from pipelines.errors import CxrError, UserInputError, describe_path_error
from tests.helpers import chest_like, write_png


def _one_line_error(capsys, verb: str) -> str:
    """What the failed command printed: exactly one line on stderr, ``cxr VERB: error: ...``."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"cxr {verb}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


# --------------------------------------------------------------------------- the error types


def test_the_project_error_types_are_cxr_errors_and_keep_their_old_bases():
    from cxr.config import ConfigError
    from pipelines.imaging import DecodeError
    from pipelines.manifest import ContractError
    from pipelines.split import LeakageError
    from trainers.checkpoint import CheckpointError
    from trainers.weights import WeightsUnavailableError
    from validation import ValidationFailed

    for cls, base in ((ConfigError, ValueError), (ContractError, ValueError), (DecodeError, ValueError),
                      (CheckpointError, ValueError), (UserInputError, ValueError), (LeakageError, RuntimeError),
                      (WeightsUnavailableError, RuntimeError), (ValidationFailed, Exception)):
        assert issubclass(cls, CxrError) and issubclass(cls, base), cls


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint as training writes it: resnet18, the 14 findings, 32x32 images."""
    from trainers.checkpoint import model_info, save_checkpoint
    from trainers.config import TrainConfig
    from trainers.models import build_model

    folder = tmp_path_factory.mktemp("ckpt") / "best"
    info = model_info(TrainConfig(backbone="resnet18", weights="none").to_dict(), 32, 0.45, 0.22, 1, {})
    save_checkpoint(folder, build_model("resnet18"), info)
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return write_png(tmp_path_factory.mktemp("img") / "chest.png", chest_like(40))


def _variant(checkpoint: Path, where: Path, info: dict | str | None = None, model_pt: bytes | None = None) -> Path:
    """A copy of ``checkpoint`` with ``model.json`` (a dict, or raw text) and/or ``model.pt`` replaced;
    an unchanged model.pt is linked, not copied (45 MB)."""
    where.mkdir(parents=True)
    original = json.loads((checkpoint / "model.json").read_text())
    text = info if isinstance(info, str) else json.dumps(original if info is None else info)
    (where / "model.json").write_text(text)
    if model_pt is None:
        (where / "model.pt").symlink_to(checkpoint / "model.pt")
    else:
        (where / "model.pt").write_bytes(model_pt)
    return where


def _torch_bytes(obj) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_good_checkpoint_predicts(checkpoint, image, capsys):
    assert main(["predict", str(checkpoint), str(image)]) == 0
    assert "Cardiomegaly" in capsys.readouterr().out


@pytest.mark.parametrize("change, expected", [
    ({"image_size": 200000}, "'image_size' must be an integer from 8 to 4096, got 200000"),
    ({"image_size": "224"}, "'image_size' must be an integer"),
    ({"backbone": "vgg16"}, "unknown backbone 'vgg16'"),
    ({"findings": "Cardiomegaly"}, "'findings' must be a non-empty list"),
    ({"normalization": {"mean": 0.5, "std": float("nan")}}, "'normalization' must hold a finite 'mean' and a finite 'std' > 0"),
    ({"normalization": {"mean": 0.5, "std": 0}}, "'normalization' must hold"),
])
def test_a_bad_model_json_value_is_one_line_naming_the_file(checkpoint, image, tmp_path, capsys, change, expected):
    """Checked before anything is built or any image resized: image_size 200000 would be a 40 GB resize."""
    info = {**json.loads((checkpoint / "model.json").read_text()), **change}
    bad = _variant(checkpoint, tmp_path / "ckpt", info)
    assert main(["predict", str(bad), str(image)]) == 1
    line = _one_line_error(capsys, "predict")
    assert str(bad / "model.json") in line and expected in line, line


def test_a_missing_key_in_model_json_is_named(checkpoint, image, tmp_path, capsys):
    info = json.loads((checkpoint / "model.json").read_text())
    del info["findings"]
    bad = _variant(checkpoint, tmp_path / "ckpt", info)
    assert main(["predict", str(bad), str(image)]) == 1
    line = _one_line_error(capsys, "predict")
    assert str(bad / "model.json") in line and "missing key(s) 'findings'" in line


def test_malformed_model_json_names_the_file_and_the_place(checkpoint, image, tmp_path, capsys):
    text = (checkpoint / "model.json").read_text()
    bad = _variant(checkpoint, tmp_path / "ckpt", text[: len(text) // 2])  # cut short, as a failed copy leaves it
    assert main(["predict", str(bad), str(image)]) == 1
    line = _one_line_error(capsys, "predict")
    assert str(bad / "model.json") in line and "not valid JSON" in line and "line" in line


def test_a_findings_count_that_does_not_match_the_head_is_one_line(checkpoint, image, tmp_path, capsys):
    info = json.loads((checkpoint / "model.json").read_text())
    bad = _variant(checkpoint, tmp_path / "ckpt", {**info, "findings": info["findings"][:3]})
    assert main(["predict", str(bad), str(image)]) == 1
    line = _one_line_error(capsys, "predict")
    assert str(bad / "model.pt") in line and "resnet18 with 3 finding(s)" in line
    assert "size mismatch" in line and "fc.weight is [14, 512] in the file but [3, 512] in the model" in line


def test_weights_of_another_backbone_are_one_line(checkpoint, image, tmp_path, capsys):
    info = json.loads((checkpoint / "model.json").read_text())
    bad = _variant(checkpoint, tmp_path / "ckpt", {**info, "backbone": "resnet34"})  # resnet18 weights inside
    assert main(["predict", str(bad), str(image)]) == 1
    line = _one_line_error(capsys, "predict")
    assert str(bad / "model.pt") in line and "does not fit a resnet34" in line and "missing key(s)" in line


class _Exploit:
    """What a hostile model.pt carries: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_model_pt_with_pickled_code_is_refused_in_one_line_and_nothing_runs(checkpoint, image, tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = _variant(checkpoint, tmp_path / "ckpt", model_pt=_torch_bytes({"fc.weight": _Exploit(marker)}))
    assert main(["predict", str(bad), str(image)]) == 1
    line = _one_line_error(capsys, "predict")
    assert str(bad / "model.pt") in line and "not a plain state dict" in line and "weights_only" in line
    assert not marker.exists()


@pytest.mark.parametrize("content, expected", [
    (lambda: _torch_bytes([1, 2, 3]), "holds a list, not a state dict"),
    (lambda: _torch_bytes({"fc.weight": 3}), "holds a dict, not a state dict"),
    (lambda: b"this is not a PyTorch file\n", "not a PyTorch file"),
])
def test_a_model_pt_that_is_not_a_state_dict_is_one_line(checkpoint, image, tmp_path, capsys, content, expected):
    bad = _variant(checkpoint, tmp_path / "ckpt", model_pt=content())
    assert main(["predict", str(bad), str(image)]) == 1
    line = _one_line_error(capsys, "predict")
    assert str(bad / "model.pt") in line and expected in line, line


def test_a_checkpoint_folder_without_model_json_says_so(image, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), str(image)]) == 1
    assert "is not a cxr checkpoint directory" in _one_line_error(capsys, "predict")


# --------------------------------------------------------------------------- paths


@contextlib.contextmanager
def _read_only_folder(path: Path):
    """``path`` as a folder nothing can be written to: a read-only tmpfs mounted there when running as
    root (root writes through permission bits; CI runs as root), else a folder without write bits."""
    path.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "cxr-ro", str(path)], capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr.strip()}")
        try:
            yield "Read-only file system"
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    path.chmod(0o555)
    try:
        yield "Permission denied"
    finally:
        path.chmod(0o755)


def test_a_read_only_run_directory_is_one_line_naming_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    with _read_only_folder(run) as why:
        assert main(["report", "--run", str(run)]) == 1
        line = _one_line_error(capsys, "report")
    assert str(run / "report.html") in line and why in line


def test_path_errors_read_as_what_went_wrong_where():
    assert describe_path_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/x/manifest.parquet")) == (
        "cannot write /runs/x/manifest.parquet: Read-only file system")
    assert describe_path_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/shards")) == (
        "cannot write /runs/x/shards: No space left on device")
    assert describe_path_error(PermissionError(errno.EACCES, "Permission denied", "/runs/x")).startswith(
        "cannot access /runs/x: Permission denied")
    assert describe_path_error(IsADirectoryError(errno.EISDIR, "Is a directory", "/runs/x/stats.json")) == (
        "/runs/x/stats.json: Is a directory")
    # pyarrow names the file in the message and leaves filename empty
    assert describe_path_error(PermissionError(errno.EACCES, "Failed to open local file '/r/m.parquet'. Detail: [errno 13] Permission denied")) == (
        "Failed to open local file '/r/m.parquet'. Detail: [errno 13] Permission denied")
    assert describe_path_error(FileNotFoundError("config file not found: x.yaml")) == "config file not found: x.yaml"


def test_a_missing_input_file_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 1
    assert str(tmp_path / "nope.yaml") in _one_line_error(capsys, "run")


# --------------------------------------------------------------------------- config values and --set


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "run")}, "data": {"source": "phantoms"}}))
    return path


def test_a_python_tag_in_set_is_one_line_and_nothing_runs(config_file, tmp_path, capsys):
    marker = tmp_path / "pwned"
    value = f'!!python/object/apply:os.system ["touch {marker}"]'
    assert main(["run", str(config_file), "--dry-run", "--set", f"train.lr={value}"]) == 1
    line = _one_line_error(capsys, "run")
    assert line.startswith("cxr run: error: --set train.lr: ") and "python/object/apply:os.system" in line
    assert not marker.exists()


@pytest.mark.parametrize("override, expected", [
    ("train.lr=nan", "train.lr must be a finite number, got 'nan'"),
    ("train.lr=.nan", "train.lr must be a finite number, got nan"),
    ("train.lr=.inf", "train.lr must be a finite number, got inf"),
    ("train.lr=-0.001", "train.lr must be > 0, got -0.001"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.epochs=0", "train.epochs must be an integer >= 1, got 0"),
    ("train.batch_size=-8", "train.batch_size must be an integer >= 1, got -8"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0"),
    ("train.contrast=nan", "train.contrast must be a finite number"),
    ("split.test_frac=nan", "split.test_frac must be a finite number"),
    ("tune.base={lr: -1}", "tune.base.lr must be > 0"),
    ("preprocess.image_size=200000", "preprocess.image_size must be between 8 and 4096, got 200000"),
])
def test_a_bad_config_value_is_rejected_naming_the_key(config_file, capsys, override, expected):
    assert main(["run", str(config_file), "--dry-run", "--set", override]) == 1
    line = _one_line_error(capsys, "run")
    assert str(config_file) in line and expected in line, line


def test_train_config_refuses_nan_and_infinity_directly():
    from trainers.config import TrainConfig

    for field, value in (("lr", float("nan")), ("lr", float("inf")), ("weight_decay", float("nan")),
                         ("over_max_repeat", float("nan")), ("cpus_per_worker", float("inf"))):
        with pytest.raises(UserInputError, match=f"{field} must be a finite number"):
            TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="lr must be > 0"):  # still a ValueError for existing callers
        TrainConfig(lr=-1.0)


def test_a_bad_option_of_a_verb_is_one_line(tmp_path, capsys):
    assert main(["tune", "--run", str(tmp_path / "run"), "--lr-range", "a,b"]) == 1
    assert "--lr-range expects comma-separated numbers" in _one_line_error(capsys, "tune")


# --------------------------------------------------------------------------- bugs keep their traceback


@pytest.mark.parametrize("bug", [ValueError("an internal invariant broke"), KeyError("image_id"), TypeError("bad call")])
def test_a_genuine_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys, bug):
    from cxr import stages

    def broken(run):
        raise bug

    monkeypatch.setattr(stages, "report_stage", broken)
    with pytest.raises(type(bug)) as raised:
        main(["report", "--run", str(tmp_path / "run")])
    assert raised.value is bug
    assert "error:" not in capsys.readouterr().err  # not dressed up as a user error


def test_an_oserror_that_is_no_path_error_keeps_its_traceback(tmp_path, monkeypatch):
    from cxr import stages

    def broken(run):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(stages, "report_stage", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["report", "--run", str(tmp_path / "run")])


def test_user_errors_raised_inside_ray_are_still_user_errors():
    """A Ray task re-raises its exception as a RayTaskError keeping it as ``cause``; Ray Train keeps
    each worker's exception in ``WorkerGroupError.worker_failures``."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from cxr.cli import user_error_message

    cause = UserInputError("no full training batch of 32 reached the workers: lower --batch-size")
    wrapped = RayTaskError("train_loop", "Traceback (most recent call last):\n  ...", cause).as_instanceof_cause()
    assert user_error_message(wrapped) == str(cause)
    assert user_error_message(WorkerGroupError("rank 0 failed:\n...", {0: cause, 1: cause})) == str(cause)
    assert user_error_message(WorkerGroupError("rank 0 failed", {0: cause, 1: ValueError("a bug")})) is None
    assert user_error_message(pickle.UnpicklingError("Weights only load failed.\nlong explanation")).endswith(
        "Weights only load failed.")


# --------------------------------------------------------------------------- the job server wants a token


@contextlib.contextmanager
def _job_server_requiring_a_token():
    """An HTTP server on loopback answering every request as Ray's job server does when token
    authentication is on and the request carries no token: 401."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            body = b"Unauthorized: Missing authentication token"
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_job_server_wanting_a_token_says_what_to_set(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    config = tmp_path / "job" / "job.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"run": {"dir": "/tmp/cxr-job-run"}, "data": {"source": "phantoms"}}))
    with _job_server_requiring_a_token() as address:
        assert main(["submit", str(config), "--address", address, "--working-dir", str(config.parent), "--no-wait"]) == 1
        line = _one_line_error(capsys, "submit")
        assert address in line and "RAY_AUTH_MODE is unset" in line and "export RAY_AUTH_MODE=token" in line
        assert "docs/cluster.md" in line
        assert main(["jobs", "list", "--address", address]) == 1
        assert "export RAY_AUTH_MODE=token" in _one_line_error(capsys, "jobs list")


# --------------------------------------------------------------------------- the embedded Ray listens on loopback only


def _is_loopback(host: str) -> bool:
    address = ip_address(host.split("%", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


@pytest.mark.ray
def test_the_embedded_local_ray_listens_on_loopback_only(ray_local):
    """Every TCP socket that a process of the embedded Ray listens on (GCS, raylet and object
    manager, dashboard and its agent, runtime-env agent, metrics, autoscaler monitor, the workers and
    this driver's own core worker) is bound to 127.0.0.1 / ::1: nothing is reachable from the network.

    Every Ray 2.60 service can be: none is exempt. Not Ray's and not covered here: while `cxr train`
    runs, rank 0's torch.distributed rendezvous store (TCPStore, started by Ray Train's torch backend)
    listens on all interfaces, because torch offers no bind address for it (only a pre-bound
    ``master_listen_fd``, which Ray Train's process-group setup does not expose)."""
    import time

    import psutil

    ray = ray_local

    @ray.remote
    def pid() -> int:
        return os.getpid()

    ray.get([pid.remote() for _ in range(4)])  # workers up, each with its gRPC server
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    me = psutil.Process()
    wanted = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}
    deadline = time.monotonic() + 60
    while True:  # the agents come up a moment after ray.init returns
        procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
        names = {}
        for p in procs.values():
            with contextlib.suppress(psutil.Error):
                names[p.pid] = p.name()
        listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in procs]
        seen = {names.get(c.pid, "?") for c in listening}
        if wanted <= seen or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert wanted <= seen, f"expected Ray's services among the listeners, saw {sorted(seen)}"
    exposed = [f"{names.get(c.pid, c.pid)} on {c.laddr.ip}:{c.laddr.port}" for c in listening if not _is_loopback(c.laddr.ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert len(listening) >= 8  # GCS, raylet x2, dashboard, agent x3, runtime-env agent, workers ...
