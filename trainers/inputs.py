"""Worker side of the input pipeline: uint8 batches -> standardised model input on the device,
and the in-memory batch source the ingest benchmark uses as its upper bound."""
from __future__ import annotations

import threading
from typing import Iterator

import numpy as np
import torch

from trainers.sampling import SamplingPlan, resample_rows


def memory_batches(
    arrays: dict[str, np.ndarray], plan: SamplingPlan, epoch: int, rank: int, world: int, batch_size: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of this worker's training batches from in-memory arrays: the same resampling as
    the Ray Data path, a (seed, epoch) permutation, an equal share per worker (so DDP ranks run the
    same number of steps) and full batches only."""
    epoch_rows = resample_rows(arrays, plan, epoch)
    order = np.random.default_rng([plan.seed, epoch]).permutation(len(epoch_rows["key"]))
    share = len(order) // world
    mine = order[rank * share:(rank + 1) * share]
    for start in range(0, len(mine) - batch_size + 1, batch_size):
        index = mine[start:start + batch_size]
        yield {name: torch.from_numpy(col[index]).to(device, non_blocking=True) for name, col in epoch_rows.items()}


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n, S, S)`` -> float ``(n, 1, S, S)`` in [0, 1] (augmentation works on this scale)."""
    return images.unsqueeze(1).float().div_(255.0)


def standardize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Standardise with the training split's intensity statistics (stats.json, 0..1 units)."""
    return (x - mean) / std


# How pixels become model input, as recorded in model.json's "normalization". Both schemes are the
# same formula (pixel / 255 - mean) / std, so one function (scale_input) feeds the model in
# training, validation, evaluation, prediction, Grad-CAM and external sets alike:
# - "train_stats": the training split's intensity mean and std (stats.json); today's behaviour, and
#   what a model.json without a "scheme" (written before schemes existed) means.
# - "xrv": torchxrayvision's models were trained on pixels in [-1024, 1024]
#   (xrv.utils.normalize: (2 * pixel / 255 - 1) * 1024), which is mean 0.5, std 1/2048: exactly,
#   as 1/2048 is a power of two.
TRAIN_STATS, XRV = "train_stats", "xrv"
SCALING_SCHEMES = (TRAIN_STATS, XRV)
XRV_MEAN, XRV_STD = 0.5, 1.0 / 2048.0
FORMULA = "(pixel / 255 - mean) / std"


def input_normalization(weights: str, train_mean: float, train_std: float) -> dict:
    """The ``normalization`` of model.json for a model started from ``weights``: torchxrayvision's
    scaling for ``xrv:NAME`` (the features expect it), else the training split's statistics."""
    if isinstance(weights, str) and weights.startswith("xrv:"):
        return {"scheme": XRV, "mean": XRV_MEAN, "std": XRV_STD, "formula": FORMULA,
                "range": [-1024.0, 1024.0], "why": "torchxrayvision's input scaling, which the xrv:NAME weights were trained with"}
    return {"scheme": TRAIN_STATS, "mean": float(train_mean), "std": float(train_std), "formula": FORMULA}


def scale_input(x: torch.Tensor, normalization: dict) -> torch.Tensor:
    """Float images in [0, 1] -> model input, per model.json's ``normalization``: the one function
    every path that feeds a model calls (the training loop with the dict it writes to model.json)."""
    return standardize(x, float(normalization["mean"]), float(normalization["std"]))


class StartedIterator:
    """Iterates ``iterable``, but pulls its first item in a background thread from construction on.

    Ray Data starts an epoch's execution (listing files, launching read tasks) when the first batch
    is asked for; the training loop builds the next epoch's iterator with this before it validates,
    so that start-up overlaps validation and checkpointing instead of stalling the next epoch.
    """

    _EMPTY = object()

    def __init__(self, iterable) -> None:
        self._iterator = iter(iterable)
        self._first, self._error = self._EMPTY, None
        self._thread = threading.Thread(target=self._pull, daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first = next(self._iterator)
        except StopIteration:
            pass
        except BaseException as err:  # re-raised in the consuming thread
            self._error = err

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not self._EMPTY:
            yield self._first
            yield from self._iterator
