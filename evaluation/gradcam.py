"""Grad-CAM heatmaps with pytorch-grad-cam (a maintained library, not hand-written hooks).

Target layer: the last convolutional stage, whose maps still have spatial layout (DenseNet121:
``features.norm5``, the output of its last dense block; ResNet: ``layer4``; EfficientNet: the last
``features`` block). Target: the finding's **logit** (``ClassifierOutputTarget``). The model is
multi-label (one sigmoid per finding), so a softmax target, which mixes in the other findings,
would be wrong; and the sigmoid's derivative is one positive number per image, which scales a
map uniformly and vanishes in the library's per-image min-max normalisation, so the logit gives
the sigmoid's heatmap exactly and does not saturate for confident predictions.
"""
from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from trainers.checkpoint import prepare_input

TARGET_LAYERS = {
    "densenet121": "features.norm5",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "efficientnet_b0": "features.8",
}
BATCH_SIZE = 16


def target_layer(model: nn.Module, backbone: str) -> nn.Module:
    if backbone not in TARGET_LAYERS:
        raise ValueError(f"no Grad-CAM target layer known for backbone {backbone!r}: add it to TARGET_LAYERS")
    return model.get_submodule(TARGET_LAYERS[backbone])


class HeatmapMaker:
    """Grad-CAM for one checkpoint's model; use as a context manager to remove the hooks after."""

    def __init__(self, model: nn.Module, info: dict) -> None:
        self.info = info
        self.cam = GradCAM(model=model.eval(), target_layers=[target_layer(model, info["backbone"])])

    def __enter__(self) -> "HeatmapMaker":
        return self

    def __exit__(self, *exc) -> None:
        self.cam.activations_and_grads.release()

    def heatmaps(self, images: np.ndarray, findings: list[int]) -> np.ndarray:
        """Heatmaps ``(n, S, S)`` in [0, 1]: ``images[i]`` (uint8 ``(S, S)``) for finding index
        ``findings[i]``. Pairs are batched, so several findings of one image cost one pass."""
        out = []
        for start in range(0, len(findings), BATCH_SIZE):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + BATCH_SIZE]))
            targets = [ClassifierOutputTarget(int(j)) for j in findings[start:start + BATCH_SIZE]]
            out.append(self.cam(input_tensor=prepare_input(batch, self.info), targets=targets))
        size = self.info["image_size"]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, size, size), np.float32)
