"""Regularisers for training from little data: mixup, dropout before the head, and an exponential
moving average (EMA) of the weights. Each is off by default (TrainConfig: ``mixup``, ``dropout``,
``ema``); docs/small_data.md has the measurements that decide whether to turn them on.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.hooks import RemovableHandle

from trainers.models import BACKBONES


def mixup_batch(x: torch.Tensor, targets: torch.Tensor, alpha: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with another image of the batch, and the targets the same way (Zhang et al.
    2018: one lambda ~ Beta(alpha, alpha) per batch). Random numbers come from ``generator``, so an
    epoch's mixes are reproducible from its seed like its augmentations."""
    n = x.shape[0]
    if n < 2:
        return x, targets
    rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=generator)))
    return mix(x, targets, float(rng.beta(alpha, alpha)), torch.randperm(n, generator=generator).to(x.device))


def mix(x: torch.Tensor, targets: torch.Tensor, lam: float, partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i becomes ``lam * x[i] + (1 - lam) * x[partner[i]]``, its targets likewise. A label
    unknown (-1) in either image stays unknown in the mix, so the loss keeps ignoring it."""
    other = targets[partner]
    mixed_y = lam * targets.clamp(min=0).float() + (1.0 - lam) * other.clamp(min=0).float()
    mixed_y = torch.where((targets < 0) | (other < 0), torch.full_like(mixed_y, -1.0), mixed_y)
    return lam * x + (1.0 - lam) * x[partner], mixed_y


def add_head_dropout(model: nn.Module, backbone: str, p: float) -> RemovableHandle:
    """Dropout on the features entering the 14-way head, active in training mode only. A forward
    hook rather than a new layer: the state dict keeps its keys, so checkpoints load everywhere
    (evaluate, predict, Grad-CAM) without knowing that dropout was used."""
    head = model.get_submodule(BACKBONES[backbone].head)
    return head.register_forward_pre_hook(lambda module, args: (F.dropout(args[0], p, module.training),))


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """torch's EMA of ``model``'s parameters and buffers (batch-norm statistics included), updated
    after every optimizer step with ``update_parameters(model)``."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
