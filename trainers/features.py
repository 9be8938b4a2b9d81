"""One forward pass that gives both the finding probabilities and the penultimate-layer features
(the input of the finding head): the OOD statistics (trainers/ood.py) are fit on the features of
the very pass that scores, so training-time statistics and scoring-time distances agree."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trainers.models import BACKBONES

BATCH_SIZE = 64


def penultimate(model: nn.Module, info: dict, images: np.ndarray, batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities ``(n, findings)`` and head-input features ``(n, d)`` of uint8 images
    ``(n, S, S)`` at the checkpoint's size; ``model`` in eval mode, on the CPU or its device."""
    from trainers.checkpoint import prepare_input

    head = model.get_submodule(BACKBONES[info["backbone"]].head)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach().flatten(1)))
    device = next(model.parameters()).device
    probs, feats = [], []
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.array(images[start:start + batch_size], np.uint8))  # a writable copy
                captured.clear()
                logits = model(prepare_input(batch, info).to(device))
                probs.append(torch.sigmoid(logits).float().cpu().numpy())
                feats.append(captured[0].float().cpu().numpy())
    finally:
        hook.remove()
    if not probs:
        return np.zeros((0, len(info["findings"])), np.float32), np.zeros((0, head.in_features), np.float32)
    return np.concatenate(probs), np.concatenate(feats)
