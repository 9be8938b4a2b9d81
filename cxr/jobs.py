"""``cxr submit`` and ``cxr jobs``: ``cxr run`` as a Ray job, through the Ray Jobs API.

The job's entrypoint is the same ``cxr run CONFIG`` a laptop runs; inside a job Ray sets
``RAY_ADDRESS``, so the run joins the cluster instead of starting its own Ray. The working folder is
uploaded as the job's ``runtime_env`` working dir (data, run outputs and the virtualenv excluded),
so the config must lie inside it. The job server listens on the head's loopback only: reach it
through an SSH tunnel (``ray dashboard cluster.yaml``) or ``kubectl port-forward`` (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO

from cxr.config import is_uri, load_config, read_raw
from pipelines.errors import UserInputError

# Every job gets these (GX's offline switch, readable logs); --env adds or overrides.
DEFAULT_ENV = {"GX_ANALYTICS_ENABLED": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# Never uploaded with the working dir: environments, history, run outputs, data and weights
# (gitignore syntax; Ray caps a working dir at a few hundred MiB).
EXCLUDES = [
    ".git", ".venv", "venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", "benchmarks/out",
    "*.parquet", "*.pt", "*.pth", "*.ckpt", "*.png", "*.jpg", "*.jpeg", "*.dcm", "*.csv.gz", "*.zip", "*.tar*",
]


def client(address: str | None):
    """A Jobs API client; ``address`` None means RAY_ADDRESS (or a local head)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as err:
        raise ConnectionError(
            f"cannot reach the Ray job server at {address or 'RAY_ADDRESS'}: {err}\n"
            "  the job port (8265) is not open to the network: forward it first, e.g. `ray dashboard cluster.yaml` "
            "or `kubectl port-forward svc/<cluster>-head-svc 8265:8265`, then use --address http://127.0.0.1:8265"
        ) from None


def entrypoint(config: str, overrides: list[str] | tuple[str, ...] = (), force: bool = False) -> str:
    """The shell command the job runs: exactly what one would type on the head node."""
    args = ["cxr", "run", config, *(x for item in overrides for x in ("--set", item))]
    return shlex.join(args + (["--force"] if force else []))


def parse_env(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--env {item!r} must look like NAME=VALUE")
        env[key] = value
    return env


def warnings_for(config_path: Path, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Settings that mean something else on a cluster than on this machine."""
    run_dir = (read_raw(config_path, overrides).get("run") or {}).get("dir")
    if isinstance(run_dir, str) and not is_uri(run_dir) and not Path(run_dir).expanduser().is_absolute():
        return [f"run.dir {run_dir!r} is relative: in the job it resolves inside Ray's copy of the working dir on the head node, "
                "which Ray may delete later; use an absolute path on storage every node shares, or a URI (--set run.dir=s3://bucket/prefix)"]
    return []


def submit(config_path: Path, address: str | None = None, working_dir: Path = Path("."), env: dict[str, str] | None = None,
           overrides: list[str] | tuple[str, ...] = (), force: bool = False) -> str:
    """Check the config here (a typo fails now, not on the cluster), then submit ``cxr run`` as a job;
    returns the job (submission) id."""
    config_path, working_dir = Path(config_path).resolve(), Path(working_dir).resolve()
    load_config(config_path, overrides)
    try:
        relative = config_path.relative_to(working_dir).as_posix()
    except ValueError:
        raise UserInputError(f"the config {config_path} is outside the working dir {working_dir}: the job sees only the uploaded "
                             "working dir; move the config into it or pass --working-dir") from None
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": {**DEFAULT_ENV, **(env or {})}}
    return client(address).submit_job(entrypoint=entrypoint(relative, overrides, force), runtime_env=runtime_env,
                                      metadata={"cxr_config": relative})


def follow(address: str | None, job_id: str, out: TextIO = sys.stdout, poll_s: float = 1.0):
    """Stream the job's logs to ``out`` until it ends; returns its final JobStatus."""
    sdk = client(address)

    async def tail() -> None:
        async for chunk in sdk.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError):  # the websocket dropped: poll the full log instead
        shown = 0
        while True:
            logs = sdk.get_job_logs(job_id)
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
            if sdk.get_job_status(job_id).is_terminal():
                out.write(sdk.get_job_logs(job_id)[shown:])
                break
            time.sleep(poll_s)
    return wait(sdk, job_id, poll_s)


def wait(sdk, job_id: str, poll_s: float = 1.0):
    """The job's status once it is terminal (the status can trail the end of the log)."""
    while not (status := sdk.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    return status


def exit_status(status) -> int:
    return 0 if str(status) == "SUCCEEDED" else 1


def submit_and_follow(config_path: Path, address: str | None = None, working_dir: Path = Path("."), env: dict[str, str] | None = None,
                      overrides: list[str] | tuple[str, ...] = (), force: bool = False, wait_for_end: bool = True,
                      out: TextIO = sys.stdout) -> int:
    """``cxr submit``: submit, print the id, follow the logs; the exit status is the job's."""
    for warning in warnings_for(Path(config_path), overrides):
        print(f"cxr submit: warning: {warning}", file=sys.stderr)
    job_id = submit(config_path, address, working_dir, env, overrides, force)
    print(f"submitted job {job_id}\n  logs: cxr jobs logs {job_id} --follow    stop: cxr jobs stop {job_id}", file=out, flush=True)
    if not wait_for_end:
        return 0
    try:
        status = follow(address, job_id, out)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (cxr jobs stop {job_id} stops it)", file=out)
        raise
    print(f"job {job_id}: {status}{describe_end(address, job_id)}", file=out, flush=True)
    return exit_status(status)


def describe_end(address: str | None, job_id: str) -> str:
    info = client(address).get_job_info(job_id)
    return f" ({info.message})" if info.message and str(info.status) != "SUCCEEDED" else ""


def _time(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def list_jobs(address: str | None = None) -> str:
    """One line per job the cluster knows, newest first."""
    rows = sorted(client(address).list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    if not rows:
        return "no jobs"
    lines = [f"{'job':<28} {'status':<10} {'started':<19}  {'ended':<19}  entrypoint"]
    lines += [f"{(j.submission_id or j.job_id or '-'):<28} {str(j.status):<10} {_time(j.start_time):<19}  {_time(j.end_time):<19}  {j.entrypoint}" for j in rows]
    return "\n".join(lines)


def job_status(address: str | None, job_id: str) -> str:
    info = client(address).get_job_info(job_id)
    return "\n".join([
        f"job {job_id}: {info.status}",
        f"  entrypoint: {info.entrypoint}",
        f"  started {_time(info.start_time)}, ended {_time(info.end_time)}",
        *([f"  message: {info.message}"] if info.message else []),
    ])


def stop_job(address: str | None, job_id: str) -> str:
    stopped = client(address).stop_job(job_id)
    return f"job {job_id}: stop requested" if stopped else f"job {job_id} had already ended ({client(address).get_job_status(job_id)})"


def command(args: argparse.Namespace) -> int:
    """The ``submit`` and ``jobs`` verbs (see the parser in cxr/cli.py); prints as it goes, returns
    the exit status: the job's for ``submit``, 0 for a query that worked, 1 when the job server
    cannot be reached or refuses the request (the Jobs API raises RuntimeError for those: an
    unknown job id; AuthenticationError for a missing or wrong auth token)."""
    from ray.exceptions import AuthenticationError

    verb = args.verb if args.verb == "submit" else f"jobs {args.jobs_verb}"
    try:
        return _command(args)
    except AuthenticationError as err:
        print(f"cxr {verb}: error: {auth_error_message(err, args.address)}", file=sys.stderr)
        return 1
    except (ConnectionError, RuntimeError) as err:
        print(f"cxr {verb}: error: {err}", file=sys.stderr)
        return 1


def auth_error_message(err: Exception, address: str | None) -> str:
    """One line for a job server that wants a token (docs/cluster.md, "token authentication")."""
    server = address or os.environ.get("RAY_ADDRESS") or "the Ray job server"
    mode = os.environ.get("RAY_AUTH_MODE")
    refused = str(getattr(err, "message", "")).startswith("Authentication failed")  # HTTP 403: a token was sent, the wrong one
    if refused:
        return (f"{server} refused the auth token sent: set RAY_AUTH_TOKEN to the head's token "
                "(`ray exec cluster.yaml 'cat ~/.ray/auth_token'`) and retry; see docs/cluster.md")
    return (f"{server} requires token authentication and no token was sent "
            f"(RAY_AUTH_MODE is {'unset' if mode is None else repr(mode)}): "
            "`export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the head's token>` (the token: "
            "`ray exec cluster.yaml 'cat ~/.ray/auth_token'`), then retry; see docs/cluster.md")


def _command(args: argparse.Namespace) -> int:
    if args.verb == "submit":
        return submit_and_follow(args.config, args.address, args.working_dir, parse_env(args.env), args.overrides, args.force,
                                 wait_for_end=not args.no_wait)
    if args.jobs_verb == "logs" and args.follow:
        return exit_status(follow(args.address, args.job_id))
    text = {
        "list": lambda: list_jobs(args.address),
        "status": lambda: job_status(args.address, args.job_id),
        "logs": lambda: client(args.address).get_job_logs(args.job_id),
        "stop": lambda: stop_job(args.address, args.job_id),
    }[args.jobs_verb]()
    print(text, end="" if text.endswith("\n") else "\n")
    return 0
