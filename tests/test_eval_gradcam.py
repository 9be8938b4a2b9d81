"""Grad-CAM on every backbone (random weights, tiny images): the target layer resolves, the maps
have the input's size, and the logit target gives the sigmoid's map exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM

from evaluation.gradcam import TARGET_LAYERS, HeatmapMaker, target_layer
from pipelines.labels import FINDINGS
from tests.helpers import chest_like
from trainers.checkpoint import prepare_input
from trainers.models import BACKBONES, build_model


def _info(backbone: str, size: int) -> dict:
    return {"backbone": backbone, "image_size": size, "findings": list(FINDINGS),
            "normalization": {"mean": 0.4, "std": 0.25}}


def test_every_backbone_has_a_target_layer():
    assert set(TARGET_LAYERS) == set(BACKBONES)


@pytest.mark.parametrize("backbone", ["densenet121", "resnet18", "efficientnet_b0"])
def test_heatmaps_on_each_family(backbone):
    torch.manual_seed(0)
    size = 64
    model = build_model(backbone).eval()
    images = np.stack([chest_like(size, 0), chest_like(size, 1)])
    with HeatmapMaker(model, _info(backbone, size)) as maker:
        maps = maker.heatmaps(images, [0, 5])
    assert maps.shape == (2, size, size) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert not target_layer(model, backbone)._forward_hooks  # hooks removed on exit


def test_logit_target_equals_sigmoid_target():
    """The sigmoid's derivative is one positive factor per image, which the per-image
    normalisation removes: the cheaper, non-saturating logit target gives the same map."""
    torch.manual_seed(0)
    size, finding = 64, 2
    model = build_model("resnet18").eval()
    info = _info("resnet18", size)
    images = np.stack([chest_like(size, 3)])
    with HeatmapMaker(model, info) as maker:
        logit_map = maker.heatmaps(images, [finding])
    with GradCAM(model=model, target_layers=[target_layer(model, "resnet18")]) as cam:
        sigmoid_map = cam(input_tensor=prepare_input(torch.from_numpy(images), info),
                          targets=[lambda out: torch.sigmoid(out[..., finding])])
    np.testing.assert_allclose(logit_map, sigmoid_map, atol=1e-4)
