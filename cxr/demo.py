"""``cxr demo``: a synthetic collection through every stage, on an embedded local Ray."""
from __future__ import annotations

from pathlib import Path

from cxr import stages
from cxr.runtime import ray_session
from pipelines.rundir import RunDir


def run_demo(run: RunDir, patients: int = 120, image_size: int = 64, seed: int = 0) -> str:
    from pipelines.phantoms import make_collection  # noqa: PLC0415

    run.ensure()
    collection = make_collection(run.root / "phantoms", n_patients=patients, image_size=256, seed=seed)
    parts = [f"demo: {collection.n_images} synthetic images of {collection.n_patients} patients in {collection.root}"]
    parts.append(stages.ingest_stage(run, "nih", collection.labels_csv, collection.images))
    parts.append(stages.split_stage(run, test_frac=0.2, val_frac=0.2, min_positives=5, seed=seed))
    with ray_session():
        parts.append(stages.preprocess_stage(run, image_size))
    parts.append(stages.eda_stage(run, seed=seed))
    parts.append(f"demo outputs are in {run.root}: manifest.parquet, quarantine.parquet, splits.parquet, shards/, stats.json, validation/ (Data Docs), eda/")
    return "\n\n".join(parts)
