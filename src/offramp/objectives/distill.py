"""The losses of token exits (DYNAMAX / CALM): distillation towards the final layer, per-exit weights.

The training loop that uses them (data, top-k support, confidence classifiers) is
``offramp.training.distill``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def exit_weights(num_exits: int) -> Tensor:
    """Linearly decaying per-exit weights (first exit heaviest), summing to 1."""
    w = torch.arange(num_exits, 0, -1, dtype=torch.float32)
    return w / w.sum()


def distill_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over rows of KL(softmax(teacher/T) || softmax(student/T)) * T^2; both (n, k)."""
    t = teacher / temperature
    s = student / temperature
    p = t.softmax(-1)
    return (p * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean() * temperature ** 2
