"""Starting and stopping Ray: verbs, tests and benchmarks all start it through here."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator


def quiet_environment() -> None:
    """Settings every verb wants: GX offline, Ray Data progress bars only on a terminal."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


LOOPBACK = "127.0.0.1"
# Ray picks the node's address for every service it starts (GCS, raylet, object manager, workers,
# dashboard agent, runtime-env agent, metrics) and binds to all interfaces unless that address is
# loopback. On Linux `ray.init(_node_ip_address="127.0.0.1")` is not enough: Ray swaps a loopback
# address for the machine's routable one. The switch Ray itself uses for single-machine Ray on
# macOS/Windows (node address = loopback) is this variable, read when Ray is imported; the module
# attribute it sets is flipped too, for a process that imported Ray before this call.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_embedded = False  # whether the Ray this process is connected to is one it started (init_local_ray)


def embedded_ray() -> bool:
    """True when this process started the Ray it is connected to: everything on it ends with
    ``ray.shutdown()``. False on a cluster it joined, whose services outlive the command."""
    import ray

    return _embedded and ray.is_initialized()


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts: the node's address is loopback, so every service binds to 127.0.0.1."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_LOCAL_ONLY_ENV), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_LOCAL_ONLY_ENV] = "0"  # the processes Ray starts inherit it
    if saved_flag is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = saved_env


def init_local_ray(num_cpus: int | None = None) -> None:
    """Start an embedded local Ray the way every verb, test and benchmark wants it.

    Every service listens on loopback only (127.0.0.1): the GCS, the raylet and its object manager,
    the workers, the dashboard and its agent, the runtime-env agent and the metrics endpoints. An
    embedded Ray serves this process alone, so nothing on the network needs to reach it
    (tests/test_errors.py lists its listening sockets). A cluster (``ray_session(address=...)``)
    is left as the user configured it.

    The dashboard runs because Ray Train V2 frees the workers of a Tune trial that early stopping
    killed through the state API it serves (ray-project/ray#54305): without it each stopped trial
    keeps its CPUs reserved until the search hangs.
    ``address="local"``: without it ``ray.init`` joins the cluster a ``ray start`` on this machine
    recorded last (/tmp/ray/ray_current_cluster), even a test's or a stopped one, instead of starting
    the embedded Ray this function promises.
    Worker logs stay in Ray's log folder (per-batch and per-report lines would flood CI logs);
    errors still reach the driver as exceptions with their tracebacks.
    """
    import ray

    global _embedded
    _embedded = True
    with _loopback_node():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
                 logging_level=logging.WARNING, log_to_driver=False)
    quiet_ray_data_console()


class _DropProgressBarNotice(logging.Filter):
    """Ray Data warns on every dataset that its progress bars are off; cxr turns them off itself
    when the output is not a terminal (``quiet_environment``), so the notice is noise there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (each dataset's "Starting execution", its plan, "execution finished")
    stay in its log file (``logs/ray-data/`` of the Ray session) and out of the terminal, where cxr
    prints its own line per stage and epoch; Ray Data's warnings and errors still show. Its console
    handler is the one named ``console`` in Ray Data's logging config (``ray.data._internal.logging``)."""
    import ray.data  # noqa: F401  (configures the 'ray.data' logger and its handlers)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
            if not any(isinstance(f, _DropProgressBarNotice) for f in handler.filters):
                handler.addFilter(_DropProgressBarNotice())


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to ``address`` (or ``RAY_ADDRESS``) when given, else start an embedded local Ray;
    shut down on exit so no raylet outlives the command."""
    import ray  # verbs that need no Ray should not pay its import

    quiet_environment()
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        global _embedded
        _embedded = False
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        quiet_ray_data_console()
    else:
        init_local_ray(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()
