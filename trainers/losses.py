"""Binary cross-entropy per finding, plain or weighted against class imbalance.

Targets hold 1, 0, or -1 for a label to ignore (the 'ignore' uncertainty policy); ignored entries
contribute nothing and the loss is the mean over the known ones. Known targets may also be soft, in
[0, 1] (label smoothing, mixup): the weighted form then weighs the positive and negative parts of
each term by their class, which for hard targets is exactly the weight of the target's class.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The course's weights from the TRAINING labels ``(n, findings)``: positives weighted by the
    negative frequency, negatives by the positive frequency. Then, per finding, the positives' total
    weight equals the negatives' (n_pos * f_neg = n * f_pos * f_neg = n_neg * f_pos), so rare and
    common findings pull equally. Returns (pos_weight, neg_weight), float32."""
    labels = np.asarray(labels)
    known = (labels >= 0).sum(axis=0)
    freq_pos = (labels == 1).sum(axis=0) / np.maximum(known, 1)
    return (1.0 - freq_pos).astype(np.float32), freq_pos.astype(np.float32)


class MultiLabelBCE(nn.Module):
    """Mean binary cross-entropy over the known labels, on logits (the sigmoid is inside, in the
    numerically stable form). With ``pos_weight``/``neg_weight`` each term is weighted by its class.
    ``smoothing`` eps moves known targets to ``y * (1 - eps) + eps / 2`` (a regulariser for noisy
    labels: NIH's were mined from report text)."""

    def __init__(self, pos_weight: np.ndarray | None = None, neg_weight: np.ndarray | None = None,
                 smoothing: float = 0.0) -> None:
        super().__init__()
        if (pos_weight is None) != (neg_weight is None):
            raise ValueError("give both pos_weight and neg_weight, or neither")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.weighted = pos_weight is not None
        if self.weighted:
            self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32))
            self.register_buffer("neg_weight", torch.as_tensor(neg_weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = (targets >= 0).float()
        y = targets.clamp(min=0).float()
        if self.smoothing:
            y = y * (1.0 - self.smoothing) + self.smoothing / 2
        logits = logits.float()
        if self.weighted:  # -(w+ y log p + w- (1 - y) log(1 - p)), log-sigmoid for stability
            per = -(self.pos_weight * y * F.logsigmoid(logits) + self.neg_weight * (1 - y) * F.logsigmoid(-logits))
        else:
            per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (per * known).sum() / known.sum().clamp(min=1.0)


def make_criterion(kind: str, train_labels: np.ndarray, smoothing: float = 0.0) -> MultiLabelBCE:
    """'bce' or 'weighted' (weights from ``train_labels``, the training split after the uncertainty policy)."""
    if kind == "bce":
        return MultiLabelBCE(smoothing=smoothing)
    if kind == "weighted":
        return MultiLabelBCE(*class_weights(train_labels), smoothing=smoothing)
    raise ValueError(f"unknown loss {kind!r}: choose bce or weighted")
