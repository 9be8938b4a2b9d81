"""The checkpoint of the data contract, and the resumable training state beside it.

A checkpoint directory holds ``model.pt`` (a plain state_dict) and ``model.json`` (backbone, finding
names, image size, normalisation, input handling, training summary): enough to predict without the
run that made it. Checkpoints written during training also hold ``train_state.pt`` (epoch,
optimizer, scheduler, seed: what a resumed run needs) and ``history.json`` (every epoch's metrics so
far). Everything is read back with ``torch.load(weights_only=True)``: no pickled code is executed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.labels import FINDINGS
from trainers.inputs import standardize, to_unit
from trainers.models import IN_CHANNELS, INPUT_HANDLING, build_model

MODEL_FILE = "model.pt"
INFO_FILE = "model.json"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
FORMAT = "cxr-model/1"


def _json_safe(value: Any) -> Any:
    """NaN (an undefined AUROC) as null, so the files are strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def model_info(train_config: dict, image_size: int, mean: float, std: float, epoch: int, metrics: dict) -> dict:
    return {
        "format": FORMAT,
        "backbone": train_config["backbone"],
        "findings": list(FINDINGS),
        "image_size": int(image_size),
        "in_channels": IN_CHANNELS,
        "input_handling": INPUT_HANDLING,
        "normalization": {"mean": float(mean), "std": float(std), "formula": "(pixel / 255 - mean) / std"},
        "outputs": "one logit per finding; sigmoid gives the probability",
        "epoch": int(epoch),
        "metrics": metrics,
        "train_config": train_config,
    }


def save_checkpoint(directory: Path, model: nn.Module, info: dict, train_state: dict | None = None,
                    history: list[dict] | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / MODEL_FILE)
    (directory / INFO_FILE).write_text(json.dumps(_json_safe(info), indent=2))
    if train_state is not None:
        torch.save(train_state, directory / STATE_FILE)
    if history is not None:
        (directory / HISTORY_FILE).write_text(json.dumps(_json_safe(history), indent=1))


def read_info(directory: Path) -> dict:
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a cxr checkpoint directory")
    return json.loads(path.read_text())


def read_train_state(directory: Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def read_history(directory: Path) -> list[dict]:
    path = Path(directory) / HISTORY_FILE
    rows = json.loads(path.read_text()) if path.is_file() else []
    return [{k: (math.nan if v is None else v) for k, v in row.items()} for row in rows]


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """The model (eval mode, CPU) and its ``model.json`` from a checkpoint directory."""
    info = read_info(path)
    model = build_model(info["backbone"], num_classes=len(info["findings"]))
    model.load_state_dict(torch.load(Path(path) / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval(), info


def prepare_input(images: torch.Tensor, info: dict) -> torch.Tensor:
    """uint8 images ``(n, S, S)`` of the checkpoint's size -> the model's input ``(n, 1, S, S)``."""
    size = info["image_size"]
    if tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"images are {tuple(images.shape[-2:])}, the model expects {size}x{size}")
    norm = info["normalization"]
    return standardize(to_unit(torch.as_tensor(images)), norm["mean"], norm["std"])
