"""Search spaces: the default grid over the course's strategies, or one read from a YAML file.

YAML form (any TrainConfig field may be searched; plain values are fixed)::

    sampling: {grid: [none, over, under]}
    loss: {grid: [bce, weighted]}
    freeze: {grid: [partial, backbone]}
    lr: {loguniform: [1.0e-4, 3.0e-3]}
    batch_size: 16
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml
from ray import tune

from pipelines.errors import UserInputError
from trainers.config import TrainConfig

DISTRIBUTIONS = {
    "grid": tune.grid_search,
    "choice": tune.choice,
    "loguniform": lambda bounds: tune.loguniform(*bounds),
    "uniform": lambda bounds: tune.uniform(*bounds),
}


def default_space(*, lr: tuple[float, float], sampling: Sequence[str], loss: Sequence[str], freeze: Sequence[str]) -> dict[str, Any]:
    """Grid over the categorical axes; the learning rate is drawn log-uniformly per sample. The
    default axes are ``TuneSection``'s (cxr/settings.py): the space is defined there, once."""
    return {
        "sampling": tune.grid_search(list(sampling)),
        "loss": tune.grid_search(list(loss)),
        "freeze": tune.grid_search(list(freeze)),
        "lr": tune.loguniform(*lr),
    }


def load_space(path: Path) -> dict[str, Any]:
    """Read a YAML search space; unknown parameters or distributions are errors naming the key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"search space file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise UserInputError(f"{path}: expected a mapping of parameter -> values, got {type(raw).__name__}")
    known = set(TrainConfig.__dataclass_fields__)
    space: dict[str, Any] = {}
    for key, spec in raw.items():
        if key not in known:
            raise UserInputError(f"{path}: unknown parameter {key!r}; valid ones are {', '.join(sorted(known))}")
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise UserInputError(f"{path}: {key} must be one of {', '.join(f'{{{d}: ...}}' for d in DISTRIBUTIONS)} or a plain value")
            kind, values = next(iter(spec.items()))
            space[key] = DISTRIBUTIONS[kind](values)
        else:
            space[key] = spec
    return space
