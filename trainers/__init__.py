"""Multi-label chest X-ray training on Ray Train: backbones, freeze strategies, imbalance remedies,
the per-worker loop and the TorchTrainer that runs it over the preprocessed shards.

The names below are imported on first use: Ray Data's tasks import ``trainers.data`` in fresh
worker processes, and must not pay for torch, torchvision and Ray Train to read a block.
"""
from __future__ import annotations

from pipelines.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "trainers.config",
    "TrainResult": "trainers.trainer",
    "Selection": "trainers.data",
    "build_trainer": "trainers.trainer",
    "fit": "trainers.trainer",
    "write_outputs": "trainers.trainer",
    "train_loop_per_worker": "trainers.loop",
    "load_checkpoint": "trainers.checkpoint",
    "CheckpointError": "trainers.checkpoint",
    "prepare_input": "trainers.checkpoint",
    "WeightsUnavailableError": "trainers.weights",
}
__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
