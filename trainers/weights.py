"""Where the initial weights come from: torchvision's ImageNet files, torchxrayvision's chest X-ray
models (``xrv:NAME``, trainers/xrv.py), a local state_dict, or none.

Resolved once on the driver, so a missing file fails before any worker starts, and the tensors
travel to the workers through the object store (a path on the driver need not exist on a node).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torchvision import models

from pipelines.errors import CxrError, UserInputError
from pipelines.rundir import MODEL_FILE
from trainers.models import BACKBONES
from trainers.xrv import check_name, locate, xrv_initial_state, xrv_name

logger = logging.getLogger(__name__)

OFFLINE_ENV = "CXR_OFFLINE"  # set to 1 to never try a download (air-gapped clusters, tests)


def offline() -> bool:
    """True when ``CXR_OFFLINE`` forbids downloads."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


class WeightsUnavailableError(CxrError, RuntimeError):
    """The requested pretrained weights cannot be had; the message says how to proceed."""


def imagenet_cache_file(backbone: str) -> Path:
    """Where torchvision keeps the ImageNet file of ``backbone`` ($TORCH_HOME/hub/checkpoints/...)."""
    weights = getattr(models, BACKBONES[backbone].weights).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file, or from a checkpoint directory's model.pt. Never unpickles code."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (pass a state_dict file, a checkpoint directory, 'imagenet' or 'none')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or unsafe files
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserInputError(f"{path} is not a plain state_dict loadable with weights_only=True: {first[:300]}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return state


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    cached = imagenet_cache_file(backbone)
    if cached.is_file():
        return read_state_dict(cached)
    how = (
        f"ImageNet weights for {backbone} are not cached at {cached} and cannot be downloaded "
        f"{{why}}. Either copy the file there (or set TORCH_HOME to a directory whose hub/checkpoints holds it), "
        f"or pass --weights PATH to a local state_dict file, or train from scratch with --weights none."
    )
    if offline():
        raise WeightsUnavailableError(how.format(why=f"({OFFLINE_ENV} is set)"))
    url = getattr(models, BACKBONES[backbone].weights).DEFAULT.url
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, progress=False)
    except OSError as err:  # URLError and socket errors are OSErrors
        raise WeightsUnavailableError(how.format(why=f"(download of {url} failed: {err})")) from err


def initial_state_dict(weights: str, backbone: str, weights_dir: str | None = None, seed: int = 0,
                       echo: Callable[[str], None] | None = None) -> dict[str, torch.Tensor] | None:
    """The state_dict to start from, per ``--weights``: 'imagenet', 'none' (None), 'xrv:NAME' (mapped
    onto ``backbone``, its fresh head rows drawn from ``seed``; ``weights_dir`` is searched first; the
    line saying how it mapped goes to ``echo``) or a path."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return imagenet_state_dict(backbone)
    name = xrv_name(weights)
    if name is not None:
        start = xrv_initial_state(name, backbone, weights_dir, seed)
        (echo or logger.info)(f"start: {start.describe()}")
        return start.state
    return read_state_dict(Path(weights))


def check_available(weights: str, backbone: str, weights_dir: str | None = None) -> None:
    """Fail now, on the driver and before Ray starts, when the starting weights cannot be had: a
    missing local file, an uncached ImageNet file while offline, an ``xrv:NAME`` file in none of
    the folders (downloaded here when online, so training finds it cached)."""
    if weights == "none":
        return
    if weights == "imagenet":
        if offline() and not imagenet_cache_file(backbone).is_file():
            imagenet_state_dict(backbone)  # raises WeightsUnavailableError with the instructions
        return
    name = xrv_name(weights)
    if name is not None:
        check_name(name, backbone)
        locate(name, weights_dir)
        return
    path = Path(weights).expanduser()
    if not (path / MODEL_FILE if path.is_dir() else path).is_file():
        read_state_dict(path)  # raises FileNotFoundError naming the path
