"""Backbones, the grayscale stem, the 14-way head, initial weights and the freeze strategies.

Grayscale input: the first convolution is given ONE input channel. When RGB weights are loaded
(ImageNet), its three filters are summed over the colour axis. For a gray image x this is exactly
what repeating x to three channels would compute (conv(W, [x, x, x]) = conv(W_r + W_g + W_b, x)),
so the ImageNet features are kept, at a third of the stem's input bandwidth and memory, and a
checkpoint takes the 1-channel image the shards store without a conversion step to forget.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision import models

from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., nn.Module]  # torchvision constructor
    weights: str  # name of torchvision's weights enum, for --weights imagenet
    stem: str  # the first convolution
    head: str  # the final Linear layer (replaced by the 14-way head)
    last_blocks: tuple[str, ...]  # what --freeze partial trains besides the head


BACKBONES: dict[str, Backbone] = {
    "densenet121": Backbone(models.densenet121, "DenseNet121_Weights", "features.conv0", "classifier",
                            ("features.denseblock4", "features.norm5")),
    "resnet18": Backbone(models.resnet18, "ResNet18_Weights", "conv1", "fc", ("layer4",)),
    "resnet34": Backbone(models.resnet34, "ResNet34_Weights", "conv1", "fc", ("layer4",)),
    "resnet50": Backbone(models.resnet50, "ResNet50_Weights", "conv1", "fc", ("layer4",)),
    "efficientnet_b0": Backbone(models.efficientnet_b0, "EfficientNet_B0_Weights", "features.0.0", "classifier.1",
                                ("features.7", "features.8")),
}

IN_CHANNELS = 1
INPUT_HANDLING = "1-channel stem; RGB-pretrained stem filters summed over colour (= gray repeated to 3 channels)"

# Old torchvision DenseNet files name layers 'norm.1' where the modules are now 'norm1'.
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def build_model(backbone: str, num_classes: int = len(FINDINGS)) -> nn.Module:
    """A randomly initialised backbone with a 1-channel stem and a ``num_classes`` logit head
    (the sigmoid is applied in the loss and at prediction: one model, 14 binary tasks)."""
    spec = BACKBONES[backbone]
    model = spec.build(weights=None)
    stem: nn.Conv2d = model.get_submodule(spec.stem)
    _set_module(model, spec.stem, nn.Conv2d(
        IN_CHANNELS, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=stem.bias is not None))
    head: nn.Linear = model.get_submodule(spec.head)
    _set_module(model, spec.head, nn.Linear(head.in_features, num_classes))
    return model


def load_initial_weights(model: nn.Module, backbone: str, state: dict[str, torch.Tensor]) -> list[str]:
    """Load pretrained weights into ``model``: RGB stems are summed to one channel, a head of another
    shape (ImageNet's 1000 classes) is left freshly initialised. Returns the keys left out.

    Anything else that does not fit means the file is for another architecture: that is an error.
    """
    spec = BACKBONES[backbone]
    state = {(_DENSENET_OLD_KEY.sub(r"\1\2", k) if backbone.startswith("densenet") else k): v for k, v in state.items()}
    stem_key = f"{spec.stem}.weight"
    if stem_key in state and state[stem_key].ndim == 4 and state[stem_key].shape[1] == 3:
        state[stem_key] = state[stem_key].sum(dim=1, keepdim=True)
    own = model.state_dict()
    skipped = [k for k in state if k.startswith(spec.head + ".") and k in own and state[k].shape != own[k].shape]
    for k in skipped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise UserInputError(
            f"these weights do not fit a {backbone}: {len(missing)} missing key(s) (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); pass weights made for --backbone {backbone}"
        )
    return skipped


def trainable_prefixes(backbone: str, freeze: str) -> tuple[str, ...] | None:
    """Module prefixes that train under a freeze strategy (None: everything trains)."""
    spec = BACKBONES[backbone]
    if freeze == "none":
        return None
    if freeze == "partial":
        return (*spec.last_blocks, spec.head)
    return (spec.head,)


def apply_freeze(model: nn.Module, backbone: str, freeze: str) -> None:
    """Set ``requires_grad`` per the strategy: none (big data), partial (small), backbone (very small)."""
    prefixes = trainable_prefixes(backbone, freeze)
    for name, param in model.named_parameters():
        param.requires_grad = prefixes is None or any(name == p or name.startswith(p + ".") for p in prefixes)


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except batch norms whose parameters are frozen stay in eval mode: a frozen
    layer must not drift either, and its running statistics are part of what was frozen."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, for the log and model.json."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
