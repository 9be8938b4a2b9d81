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


def init_local_ray(num_cpus: int | None = None) -> None:
    """Start an embedded local Ray the way every verb, test and benchmark wants it.

    The dashboard runs (on loopback only) because Ray Train V2 frees the workers of a Tune trial
    that early stopping killed through the state API it serves (ray-project/ray#54305): without it
    each stopped trial keeps its CPUs reserved until the search hangs.
    Worker logs stay in Ray's log folder (per-batch and per-report lines would flood CI logs);
    errors still reach the driver as exceptions with their tracebacks.
    """
    import ray  # noqa: PLC0415

    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False)


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
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        init_local_ray(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()
