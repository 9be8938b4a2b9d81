"""Every training knob in one validated dataclass (the CLI, Tune and the worker loop share it).

Inputs are checked where they enter, and each error names the bad value and the valid ones, so a
typo in a CLI flag or a Tune search space fails on the driver, not minutes later inside a worker.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from pipelines.errors import UserInputError
from pipelines.options import option
from trainers.xrv import check_name, xrv_name

BACKBONE_CHOICES = ("densenet121", "resnet18", "resnet34", "resnet50", "efficientnet_b0")
FREEZE_CHOICES = ("auto", "none", "partial", "backbone")
SEARCHED_FREEZES = FREEZE_CHOICES[1:]  # what `auto` resolves to, and what a search compares
LOSS_CHOICES = ("auto", "bce", "weighted")
SAMPLING_CHOICES = ("none", "over", "under")
UNCERTAIN_CHOICES = ("zeros", "ones", "ignore")
INGEST_CHOICES = ("ray_data", "memory")
PLACEMENT_CHOICES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
WEIGHTS_KEYWORDS = ("imagenet", "none")
# The strategies `cxr tune` searches by default (so not options of its own): resampling, loss, freezing, lr.
STRATEGY_AXES = ("sampling", "loss", "freeze", "lr")


def _choose(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserInputError(f"unknown {name} {value!r}: choose one of {', '.join(map(str, choices))}")


def _number(name: str, value: Any) -> None:
    """A real, finite number: NaN and infinity pass every ``<`` check, so they are refused here."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UserInputError(f"{name} must be a finite number, got {value!r}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    _number(name, value)
    if value < 0 or (value == 0 and not allow_zero):
        raise UserInputError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class TrainConfig:
    """Training settings. Defaults suit a few thousand chest X-rays at most (the NIH sample here):
    ImageNet-pretrained DenseNet121 (CheXNet), only its last dense block and the head trained,
    weighted loss against the heavy per-finding imbalance."""

    backbone: str = option("densenet121", "torchvision backbone", choices=BACKBONE_CHOICES)
    weights: str = option("imagenet", "'imagenet' (torchvision's, from the local cache offline), 'none', 'xrv:NAME' (torchxrayvision's "
                                      "chest X-ray models, e.g. xrv:densenet121-res224-all; needs the xrv extra), or the path of a local state_dict")
    weights_dir: str | None = option(None, "folder searched first for --weights xrv:NAME files (then $CXR_WEIGHTS_DIR, then "
                                           "torchxrayvision's cache)", metavar="DIR")
    freeze: str = option("auto", "none: fine-tune all; partial: last block + head; backbone: head only; auto: partial from pretrained "
                                 "weights, none from random ones (frozen random features learn nothing)", choices=FREEZE_CHOICES)
    loss: str = option("auto", "weighted BCE (per-finding, from the train split), plain bce, or auto (weighted unless resampling)", choices=LOSS_CHOICES)
    sampling: str = option("none", "over: repeat images with rare findings; under: drop all-negative images; per epoch", choices=SAMPLING_CHOICES)
    over_max_repeat: float = option(4.0, "with --sampling over: the most times one image is repeated per epoch")
    under_ratio: float = option(1.0, "with --sampling under: all-negative images kept per image with a finding")
    uncertain: str = option("zeros", "-1 labels: U-Zeros, U-Ones, or ignored in loss and AUROC", choices=UNCERTAIN_CHOICES)

    epochs: int = option(10, "epochs (the maximum per trial under tune)")
    patience: int | None = option(None, "stop early when validation mean AUROC has not improved for N epochs (unset: train every epoch)", metavar="N")
    batch_size: int = option(32, "images per worker per step")
    lr: float = option(3e-4, "AdamW learning rate (cosine schedule)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    amp: bool = option(True, "bf16 autocast + channels_last on GPU (--no-amp: full precision)")
    shuffle_buffer: int = option(512, "rows in each worker's local shuffle buffer")

    augment: bool = option(True, "train-split augmentation (rotation, shift, scale, contrast); --no-augment turns it off")
    rotate_deg: float = option(7.0, "augmentation: largest rotation in degrees")
    shift: float = option(0.05, "augmentation: largest shift, as a fraction of the image side")
    scale: float = option(0.1, "augmentation: zoom in [1 - scale, 1 + scale]")
    contrast: float = option(0.2, "augmentation: contrast factor in [1 - contrast, 1 + contrast]")
    hflip: bool = option(False, "augmentation: horizontal flips (off by default: a mirrored chest puts the heart on the wrong side)")

    # Regularisers for small data (trainers/regularize.py; measured in docs/small_data.md), all off by default.
    label_smoothing: float = option(0.0, "move training targets to y(1 - e) + e/2 (0: off): against noisy, report-mined labels", metavar="E")
    mixup: float = option(0.0, "mixup: blend image pairs and their labels with a Beta(a, a) weight (0: off; 0.2-0.4 typical)", metavar="A")
    dropout: float = option(0.0, "dropout on the features entering the 14-way head (0: off)", metavar="P")
    ema: float = option(0.0, "keep an exponential moving average of the weights with this per-step decay (0: off; e.g. 0.99); "
                              "validation and the checkpoint use the average", metavar="DECAY")

    workers: int = option(2, "Ray Train workers (DDP)")
    gpus_per_worker: float = option(0.0, "GPUs per worker (0: CPU; fractions allowed)")
    cpus_per_worker: float = option(0.5, "CPUs per worker (leave some for Ray Data reads)")
    placement_strategy: str = option("PACK", "Ray placement of the workers", choices=PLACEMENT_CHOICES)
    ingest: str = option("ray_data", "ray_data: stream the shards; memory: preload the train split into the object store", choices=INGEST_CHOICES)

    keep_checkpoints: int = option(2, "best N checkpoints kept, by validation mean AUROC")
    max_failures: int = option(2, "worker-group restarts from the last checkpoint before giving up")
    seed: int = option(0, "random seed")

    # Test-only fault injection: the last worker exits hard during epoch `fail_at_epoch` (1-based)
    # unless the file `fail_marker` exists; it creates that file first, so it fails exactly once.
    fail_at_epoch: int | None = option(None, cli=False)
    fail_marker: str | None = option(None, cli=False)

    def __post_init__(self) -> None:
        _choose("backbone", self.backbone, BACKBONE_CHOICES)
        _choose("freeze", self.freeze, FREEZE_CHOICES)
        _choose("loss", self.loss, LOSS_CHOICES)
        _choose("sampling", self.sampling, SAMPLING_CHOICES)
        _choose("uncertain policy", self.uncertain, UNCERTAIN_CHOICES)
        _choose("ingest", self.ingest, INGEST_CHOICES)
        _choose("placement_strategy", self.placement_strategy, PLACEMENT_CHOICES)
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise UserInputError("weights must be 'imagenet', 'none', 'xrv:NAME' or the path of a state_dict file")
        if xrv_name(self.weights) is not None:
            check_name(xrv_name(self.weights), self.backbone)
        if self.weights_dir is not None and (not isinstance(self.weights_dir, str) or not self.weights_dir.strip()):
            raise UserInputError(f"weights_dir must be the path of a folder, got {self.weights_dir!r}")
        for name in ("epochs", "batch_size", "workers", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"{name} must be an integer >= 1, got {value!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 1):
            raise UserInputError(f"patience must be an integer >= 1 (or unset: no early stopping), got {self.patience!r}")
        if not isinstance(self.max_failures, int) or isinstance(self.max_failures, bool) or self.max_failures < -1:
            raise UserInputError(f"max_failures must be an integer >= -1 (-1: retry forever), got {self.max_failures!r}")
        for name in ("lr", "cpus_per_worker"):
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "gpus_per_worker", "rotate_deg", "shift", "shuffle_buffer", "under_ratio", "mixup"):
            _positive(name, getattr(self, name), allow_zero=True)
        _number("over_max_repeat", self.over_max_repeat)
        if self.over_max_repeat < 1:
            raise UserInputError(f"over_max_repeat must be >= 1, got {self.over_max_repeat!r}")
        for name in ("scale", "contrast", "label_smoothing", "dropout", "ema"):
            value = getattr(self, name)
            _number(name, value)
            if not 0 <= value < 1:
                raise UserInputError(f"{name} must be in [0, 1), got {value!r}")
        if self.fail_at_epoch is not None and not self.fail_marker:
            raise UserInputError("fail_at_epoch needs fail_marker (the file that makes the failure happen once)")

    @property
    def effective_loss(self) -> str:
        """The loss actually used: 'auto' means weighted unless the data are already resampled."""
        if self.loss != "auto":
            return self.loss
        return "weighted" if self.sampling == "none" else "bce"

    @property
    def effective_freeze(self) -> str:
        """The freeze actually applied: 'auto' fine-tunes everything from random weights and trains the
        last block and the head on top of pretrained ones (ImageNet, torchxrayvision's, a file)."""
        if self.freeze != "auto":
            return self.freeze
        return "none" if self.weights == "none" else "partial"

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(f"unknown training option(s) {', '.join(unknown)}: valid ones are {', '.join(sorted(known))}")
        return cls(**values)

    def fingerprint(self) -> str:
        """A short stable hash of the settings: the default Ray Train run name, so re-running the
        same configuration resumes it and any change starts a new run."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]
