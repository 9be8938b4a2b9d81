"""``cxr demo``: a synthetic collection through every stage, on an embedded local Ray.

The demo is ``cxr run`` of ``cxr.config.demo_config`` (``configs/demo.yaml``), so the two cannot
drift apart.
"""
from __future__ import annotations

from pipelines.rundir import RunDir

# Small enough for a 2-core laptop in a few minutes, large enough that every stage has work.
DEMO_TRAIN = dict(backbone="resnet18", weights="none", freeze="none", epochs=2, batch_size=16, lr=1e-3, workers=2, cpus_per_worker=0.5)
DEMO_TUNE = dict(sampling=("none", "under"), loss=("bce", "weighted"), freeze=("none",), lr=(3e-4, 3e-3))


def run_demo(run: RunDir, patients: int = 120, image_size: int = 112, seed: int = 0, tune: bool = True, force: bool = True) -> str:
    from cxr.config import demo_config  # noqa: PLC0415
    from cxr.pipeline import run_pipeline  # noqa: PLC0415

    return run_pipeline(demo_config(str(run.root), patients=patients, image_size=image_size, seed=seed, tune=tune), force=force)
