"""Preprocessing on a real two-node Ray cluster (Ray's own test utility, tests/conftest.py): the decode
tasks run on both nodes' CPUs, which is where Ray Data can pull ahead of a one-machine process pool.
Where each image was decoded is recorded inside the task; no timing assertion."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from pipelines.labels import FINDINGS
from pipelines.preprocess import preprocess
from tests.helpers import chest_like, write_png

pytestmark = pytest.mark.ray


def test_decode_tasks_use_both_nodes(two_node_cluster, tmp_path):
    import ray

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and ray.cluster_resources()["CPU"] == 4
    images, rows = tmp_path / "images", []
    for i in range(64):
        name = f"{i:08d}_000.png"
        write_png(images / name, chest_like(96, seed=i))
        rows.append({"image_id": name, "path": name, "patient_id": f"{i:08d}", **{f: int(i % 5 == 0) for f in FINDINGS}})
    manifest = pd.DataFrame(rows)
    splits = manifest[["image_id", "patient_id"]].assign(split=np.where(np.arange(len(manifest)) % 4 == 0, "val", "train"))

    def where_it_ran(batch: dict, image_size: int) -> dict:
        """Runs inside each decode task (preprocess's ``checks`` hook): the node, as a column."""
        time.sleep(0.2)  # a task long enough that the first node's workers cannot take every block before the second's start
        return {"node_id": np.array([ray.get_runtime_context().get_node_id()] * len(batch["image_id"]), dtype=object)}

    result = preprocess(manifest, splits, images, tmp_path / "shards", image_size=16, checks=where_it_ran)

    assert sum(result.written.values()) == len(manifest) and result.quarantine.empty
    shards = pd.read_parquet(tmp_path / "shards", columns=["image_id", "node_id"])
    assert sorted(shards["image_id"]) == sorted(manifest["image_id"])
    ran_on = shards.groupby("node_id")["image_id"].size()
    assert set(ran_on.index) == nodes, f"decoded on {dict(ran_on)}; nodes {nodes}"
