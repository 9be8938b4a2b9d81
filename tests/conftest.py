"""Shared fixtures: the real NIH subset (skipped when absent) and a real local Ray.

`make test` runs two pytest-xdist workers with ``--dist loadfile``: each test module runs whole, in
order, on one worker, so module-scoped fixtures (a module's Ray, a run built test by test) hold; a
session fixture (the evaluated phantom run) is built once per worker that needs it."""
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
