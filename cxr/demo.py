"""``cxr demo``: a synthetic collection through every stage, on an embedded local Ray.

The demo is ``cxr run`` of :func:`demo_config` (``configs/demo.yaml`` is that config with the
defaults; a test keeps the two equal), so the two cannot drift apart.
"""
from __future__ import annotations

from cxr.settings import (
    CardSection, Config, DataSection, DemoSettings, EdaSection, EvaluateSection, ExplainSection, PreprocessSection, ReportSection, RunSection,
    SplitSection, TrainSection, TuneSection, ValidateSection,
)
from pipelines.rundir import RunDir
from trainers.config import TrainConfig

# Small enough for a 2-core laptop in a few minutes, large enough that every stage has work.
DEMO_TRAIN = dict(backbone="resnet18", weights="none", freeze="none", epochs=2, batch_size=16, lr=1e-3, workers=2, cpus_per_worker=0.5)
DEMO_TUNE = dict(sampling=["none", "under"], loss=["bce", "weighted"], freeze=["none"], lr=[3e-4, 3e-3])


def demo_config(run_dir: str, demo: DemoSettings | None = None) -> Config:
    """What ``cxr demo`` runs, as a Config: the synthetic collection and every stage the demo runs."""
    demo = demo or DemoSettings()
    return Config(
        run=RunSection(dir=run_dir),
        data=DataSection(source="phantoms", patients=demo.patients, phantom_size=256, seed=demo.seed),
        validate=ValidateSection(enabled=False),  # ingest and split run their suites themselves
        split=SplitSection(test_frac=0.2, val_frac=0.2, min_positives=5, seed=demo.seed),
        preprocess=PreprocessSection(image_size=demo.image_size),
        eda=EdaSection(sample_size=64, seed=demo.seed),
        train=TrainSection(config=TrainConfig(**DEMO_TRAIN, seed=demo.seed)),
        tune=TuneSection(enabled=demo.tune, base={"workers": 1}, num_samples=1, asha=True, grace_period=1, **DEMO_TUNE),
        evaluate=EvaluateSection(enabled=True),
        explain=ExplainSection(enabled=True),
        card=CardSection(enabled=True),
        report=ReportSection(enabled=True),
    )


def run_demo(run: RunDir, demo: DemoSettings | None = None, force: bool = True) -> str:
    from cxr.pipeline import run_pipeline

    summary = run_pipeline(demo_config(str(run.root), demo), force=force)
    return "\n".join(filter(None, [summary, serve_hint(run)]))


def serve_hint(run: RunDir) -> str:
    """The command that serves the demo's model over HTTP (``cxr serve``), or nothing without one."""
    checkpoint = run.find_best_checkpoint()
    if checkpoint is None:
        return ""
    images = run.root / "phantoms" / "images"
    example = min(images.glob("*.png"), default=images / "IMAGE.png")
    return (f"serve the model: cxr serve {checkpoint}\n"
            f"  then, from another terminal: curl --data-binary @{example} http://127.0.0.1:8000/predict")
