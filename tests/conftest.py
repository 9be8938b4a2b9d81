"""Shared fixtures: the real NIH subset (skipped when absent) and a real local Ray; how the tests
are shared between pytest-xdist workers (`make test` runs two)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

NIH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih"
NIH_CSV = NIH / "Data_Entry_2017_v2020.csv.gz"
NIH_IMAGES = NIH / "images"


@pytest.fixture(scope="session")
def nih() -> Path:
    """The real NIH ChestX-ray14 subset beside the checkout; the test skips when it is absent."""
    if not NIH_CSV.exists() or not NIH_IMAGES.is_dir():
        pytest.skip(f"real NIH data not found at {NIH}")
    return NIH


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for the module, shut down afterwards so no raylet outlives the tests."""
    import ray

    from cxr.runtime import init_local_ray

    if ray.is_initialized():
        ray.shutdown()
    init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


# Modules that share the session-scoped evaluated phantom run (tests/test_eval_fixtures.py, a few
# minutes to build): one xdist worker runs them all, so it is built once.
EVALUATED_RUN_MODULES = ("test_eval_run", "test_model_card", "test_report")


def pytest_collection_modifyitems(config, items) -> None:
    """Under ``pytest -n N --dist loadgroup`` each module runs whole on one worker (its module-scoped
    Ray starts once), and the modules that share the evaluated run run on the same worker. Most of a
    Ray test's wall time is waiting (start-up, shutdown, polling), so two workers on two cores
    overlap that waiting rather than compete for the CPU."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        group = "evaluated_run" if module in EVALUATED_RUN_MODULES else module
        item.add_marker(pytest.mark.xdist_group(group))
