"""Shared fixtures: the real NIH subset (skipped when absent) and a real local Ray.

`make test` runs two pytest-xdist workers with ``--dist loadfile``: each test module runs whole, in
order, on one worker, so module-scoped fixtures (a module's Ray, a run built test by test) hold. The
modules that read the evaluated phantom run are one unit (``pytest_xdist_make_scheduler`` below), so
that session fixture is built once, not once per worker; long modules are handed out first."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray waits 60 s for its dashboard, then fails ray.init: on 2 cores under other jobs' load the
# dashboard was seen taking longer (a solo test failed "Failed to start the dashboard")
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")

NIH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih"
NIH_CSV = NIH / "Data_Entry_2017_v2020.csv.gz"
NIH_IMAGES = NIH / "images"


# The modules that use the session fixture ``evaluated_run`` (tests/test_eval_fixtures.py: a phantom
# run trained, evaluated and explained, 2-3 minutes on 2 cores): one scheduling unit, one build.
EVALUATED_RUN_MODULES = ("test_eval_run", "test_external", "test_model_card", "test_report", "test_tracking")
# Modules that take minutes (--durations of `make test`, 2026-12-03), longest first. xdist hands a
# worker its next unit when it runs low, in collection order; by default it reorders units by
# test count, which put these few-test, long modules last and left one worker running them alone.
# Longest first (and --no-loadscope-reorder in the Makefile) lets the short ones fill in at the end.
LONG_MODULES = ("test_train_ray", "evaluated_run", "test_tune", "test_jobs", "test_cv", "test_real_nih",
                "test_eval_realdata", "test_atomic_outputs", "test_train_benchmarks", "test_xrv_weights",
                "test_scale_benchmark", "test_train_multinode", "test_serve", "test_score")


def _unit(module_path: str) -> str:
    """The scheduling unit of a test module: its file, or one shared unit for the evaluated-run modules."""
    module = Path(module_path).stem
    return "evaluated_run" if module in EVALUATED_RUN_MODULES else module


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist (-p no:xdist) still runs
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` with the evaluated-run modules as one unit. (xdist's ``loadgroup`` would
    say this with marks, but with pytest 9 it no longer sees them: it rewrites ``item._nodeid``,
    which pytest 9 does not read.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleUnits(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid.split("::", 1)[0])

    return ModuleUnits(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long units first; stable, so the order within a module is kept."""
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(_unit(str(item.path)), len(rank)))


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



@pytest.fixture
def two_node_cluster():
    """Two Ray nodes of 2 CPUs on this machine (Ray's own test utility), the driver connected."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 200 * 2**20, "include_dashboard": False})
    cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
