"""``cxr demo``: a synthetic collection through every stage, on an embedded local Ray."""
from __future__ import annotations

from cxr import stages
from cxr.runtime import ray_session
from pipelines.rundir import RunDir

# Small enough for a 2-core laptop in a few minutes, large enough that every stage has work.
DEMO_TRAIN = dict(backbone="resnet18", weights="none", freeze="none", epochs=2, batch_size=16, lr=1e-3, workers=2, cpus_per_worker=0.5)
DEMO_TUNE = dict(sampling=("none", "over"), loss=("bce", "weighted"), freeze=("none",), lr=(3e-4, 3e-3))


def run_demo(run: RunDir, patients: int = 120, image_size: int = 64, seed: int = 0, tune: bool = True) -> str:
    from pipelines.phantoms import make_collection  # noqa: PLC0415
    from trainers import TrainConfig  # noqa: PLC0415
    from tuning import default_space  # noqa: PLC0415

    run.ensure()
    collection = make_collection(run.root / "phantoms", n_patients=patients, image_size=256, seed=seed)
    parts = [f"demo: {collection.n_images} synthetic images of {collection.n_patients} patients in {collection.root}"]
    parts.append(stages.ingest_stage(run, "nih", collection.labels_csv, collection.images))
    parts.append(stages.split_stage(run, test_frac=0.2, val_frac=0.2, min_positives=5, seed=seed))
    with ray_session():
        parts.append(stages.preprocess_stage(run, image_size))
        parts.append(stages.eda_stage(run, seed=seed))
        base = TrainConfig(**DEMO_TRAIN, seed=seed)
        parts.append(stages.train_stage(run, base))
        if tune:
            tune_base = TrainConfig(**{**DEMO_TRAIN, "workers": 1}, seed=seed)  # one worker per trial: two trials fit beside the reads
            parts.append(stages.tune_stage(run, tune_base, default_space(**DEMO_TUNE), num_samples=1, asha=True, resume=False))
    parts.append(f"demo outputs are in {run.root}: manifest.parquet, quarantine.parquet, splits.parquet, shards/, stats.json, validation/ (Data Docs), eda/, train/, tune/")
    return "\n\n".join(parts)
