"""The checkpoint of the data contract, and the resumable training state beside it.

A checkpoint directory holds ``model.pt`` (a plain state_dict) and ``model.json`` (backbone, finding
names, image size, normalisation, input handling, training summary): enough to predict without the
run that made it. Checkpoints written during training also hold ``train_state.pt`` (epoch,
optimizer, scheduler, seed: what a resumed run needs) and ``history.json`` (every epoch's metrics so
far). Everything is read back with ``torch.load(weights_only=True)``: no pickled code is executed.

A checkpoint is input like any other file: ``model.json`` is checked (backbone, findings, image size,
normalisation) before anything is built from it, and ``model.pt`` must be a plain state dict that
fits what ``model.json`` describes. Anything else is a ``CheckpointError`` naming the file and what
is wrong with it.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.errors import CxrError
from pipelines.imaging import MAX_IMAGE_SIZE
from pipelines.labels import FINDINGS
from pipelines.rundir import INFO_FILE, MODEL_FILE  # the checkpoint files are part of the run-directory contract
from trainers.inputs import standardize, to_unit
from trainers.models import BACKBONES, IN_CHANNELS, INPUT_HANDLING, build_model

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
FORMAT = "cxr-model/1"
MIN_IMAGE_SIZE = 8  # the smallest side preprocessing makes (--image-size, preprocess.image_size)


class CheckpointError(CxrError, ValueError):
    """A checkpoint file (``model.json``, ``model.pt``, ``train_state.pt``) that cannot be used; the
    message names the file and what is wrong with it."""


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
    """``model.json`` of a checkpoint directory, checked (``check_info``)."""
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a cxr checkpoint directory")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {err.start}): not a model.json") from None
    check_info(info, path)
    return info


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_info(info: Any, path: Path | str = INFO_FILE) -> None:
    """Raise CheckpointError naming ``path`` unless ``info`` describes a model this code can build
    and feed: a known backbone, a list of finding names, a sane image size, finite normalisation."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}")

    if not isinstance(info, dict):
        raise bad(f"expected a JSON object, got {type(info).__name__}")
    missing = [k for k in ("backbone", "findings", "image_size", "normalization") if k not in info]
    if missing:
        raise bad(f"missing key(s) {', '.join(map(repr, missing))}: not a cxr model.json (written by save_checkpoint)")
    backbone = info["backbone"]
    if backbone not in BACKBONES:
        raise bad(f"unknown backbone {backbone!r}: this build knows {', '.join(BACKBONES)}")
    findings = info["findings"]
    if (not isinstance(findings, list) or not findings or not all(isinstance(f, str) and f.strip() for f in findings)):
        raise bad(f"'findings' must be a non-empty list of finding names, got {findings!r}"[:300])
    if len(set(findings)) != len(findings):
        raise bad(f"'findings' names a finding twice: {sorted({f for f in findings if findings.count(f) > 1})}")
    size = info["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise bad(f"'image_size' must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {size!r}")
    norm = info["normalization"]
    if not isinstance(norm, dict) or not _finite(norm.get("mean")) or not _finite(norm.get("std")) or norm["std"] <= 0:
        raise bad(f"'normalization' must hold a finite 'mean' and a finite 'std' > 0, got {norm!r}"[:300])
    if info.get("in_channels", IN_CHANNELS) != IN_CHANNELS:
        raise bad(f"'in_channels' is {info['in_channels']!r}; this build's models take {IN_CHANNELS}")


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with a CheckpointError naming the file for anything that
    is not a PyTorch file of plain tensors and containers (pickled code is refused, never run)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {path.parent} is not a complete cxr checkpoint directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise CheckpointError(f"{path}: not a plain state dict: it holds pickled objects that safe loading "
                              f"(weights_only=True) refuses ({first[:200]})") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, zip errors ... for foreign files
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise CheckpointError(f"{path}: not a PyTorch file ({type(err).__name__}: {first[:200]})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's ``model.pt``: a plain mapping of parameter names to tensors, or CheckpointError."""
    state = _torch_load(Path(path))
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict (a mapping of parameter names to tensors)")
    return state


def _fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, info: dict) -> None:
    """Load ``state`` into ``model``, or a one-line CheckpointError saying how it does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} size mismatch(es), e.g. {k} is {list(state[k].shape)} in the file "
                         f"but {list(own[k].shape)} in the model")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise CheckpointError(f"{path}: does not fit a {info['backbone']} with {len(info['findings'])} finding(s) as "
                              f"{INFO_FILE} says: {'; '.join(parts)}")
    model.load_state_dict(state)


def read_train_state(directory: Path) -> dict:
    return _torch_load(Path(directory) / STATE_FILE)


def read_history(directory: Path) -> list[dict]:
    path = Path(directory) / HISTORY_FILE
    rows = json.loads(path.read_text()) if path.is_file() else []
    return [{k: (math.nan if v is None else v) for k, v in row.items()} for row in rows]


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """The model (eval mode, CPU) and its ``model.json`` from a checkpoint directory; a CheckpointError
    naming the file when ``model.json`` or ``model.pt`` cannot be used."""
    info = read_info(path)
    state = read_state_dict(Path(path) / MODEL_FILE)
    model = build_model(info["backbone"], num_classes=len(info["findings"]))
    _fit_state_dict(model, state, Path(path) / MODEL_FILE, info)
    return model.eval(), info


def input_scaling(info: dict) -> tuple[float, float]:
    """How the checkpoint scales its uint8 input: ``(mean, std)`` of ``(pixel / 255 - mean) / std``.
    The one place every scorer reads it (cxr predict, cxr score, evaluation), so another scaling
    recorded in ``model.json`` changes them all at once."""
    norm = info["normalization"]
    return float(norm["mean"]), float(norm["std"])


def prepare_input(images: torch.Tensor, info: dict) -> torch.Tensor:
    """uint8 images ``(n, S, S)`` of the checkpoint's size -> the model's input ``(n, 1, S, S)``."""
    size = info["image_size"]
    if tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"images are {tuple(images.shape[-2:])}, the model expects {size}x{size}")
    return standardize(to_unit(torch.as_tensor(images)), *input_scaling(info))
