"""Starting and stopping Ray: the only place in the project that calls ``ray.init``."""
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


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to ``address`` (or ``RAY_ADDRESS``) when given, else start an embedded local Ray;
    shut down on exit so no raylet outlives the command."""
    import ray  # noqa: PLC0415 - verbs that need no Ray should not pay its import

    quiet_environment()
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Worker logs stay in Ray's log folder (per-batch and per-report lines would flood CI logs);
    # errors still reach the driver as exceptions with their tracebacks.
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
