"""Multi-label chest X-ray training on Ray Train: backbones, freeze strategies, imbalance remedies,
the per-worker loop and the TorchTrainer that runs it over the preprocessed shards."""
from trainers.checkpoint import load_checkpoint, prepare_input
from trainers.config import TrainConfig
from trainers.fit import TrainResult, build_trainer, fit, write_outputs
from trainers.loop import train_loop_per_worker
from trainers.weights import WeightsUnavailableError

__all__ = [
    "TrainConfig", "TrainResult", "WeightsUnavailableError", "build_trainer", "fit", "load_checkpoint",
    "prepare_input", "train_loop_per_worker", "write_outputs",
]
