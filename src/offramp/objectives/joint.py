"""Joint training of all exits: weighted CE (uniform or PABEE weights) plus self-distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_exit_loss(exit_logits: Tensor, labels: Tensor) -> Tensor:  # (E, b, c), (b,) -> (E, b)
    """CE per exit and row (MSE for regression, one output)."""
    e, b, c = exit_logits.shape
    if c == 1:
        return (exit_logits[..., 0].float() - labels.float()[None, :]) ** 2
    return F.cross_entropy(exit_logits.reshape(e * b, c).float(), labels.repeat(e), reduction="none").view(e, b)


def exit_weights(num_exits: int, kind: str) -> Tensor:  # (E,)
    """"uniform": equal weights; "pabee": weight j for the j-th exit (PABEE: sum j L_j / sum j)."""
    if kind == "uniform":
        w = torch.ones(num_exits)
    elif kind == "pabee":
        w = torch.arange(1, num_exits + 1, dtype=torch.float32)
    else:
        raise ValueError(f"exit weights must be 'uniform' or 'pabee', got {kind!r}")
    return w / w.sum()


def self_distillation(exit_logits: Tensor, temperature: float = 1.0) -> Tensor:  # (E, b, c) -> scalar
    """Mean over the early exits of KL(teacher || exit), the teacher being the last exit (detached)."""
    if exit_logits.shape[0] < 2:
        return exit_logits.new_zeros(())
    t = temperature
    if exit_logits.shape[-1] == 1:
        return ((exit_logits[:-1] - exit_logits[-1:].detach()) ** 2).mean()
    teacher = (exit_logits[-1].detach().float() / t).log_softmax(-1)
    student = (exit_logits[:-1].float() / t).log_softmax(-1)
    kl = (teacher.exp()[None] * (teacher[None] - student)).sum(-1)  # (E-1, b)
    return kl.mean() * t * t


def convergence(pooled: Tensor) -> Tensor:  # (E, b, d) -> scalar
    """Mean over the early exits of 1 - cos(pooled state, the last exit's, detached): the exit-aware
    term of LEAP (arXiv 2605.01058), which pulls a fine-tuned backbone's middle layers towards what
    its last layer says, so that shallow exits can be right. Zero gradient with a frozen backbone."""
    if pooled.shape[0] < 2:
        return pooled.new_zeros(())
    target = pooled[-1].detach().float()
    return (1 - F.cosine_similarity(pooled[:-1].float(), target[None], dim=-1)).mean()


def joint_loss(exit_logits: Tensor, labels: Tensor, weights: str = "uniform", distill: float = 0.0,
               temperature: float = 1.0, converge: float = 0.0, pooled: Tensor | None = None) -> Tensor:
    """sum_j w_j mean_b L_j(b)  +  distill * self-distillation  +  converge * convergence(pooled)."""
    w = exit_weights(exit_logits.shape[0], weights).to(exit_logits.device)
    loss = (w * per_exit_loss(exit_logits, labels).mean(1)).sum()
    if distill:
        loss = loss + distill * self_distillation(exit_logits, temperature)
    if converge:
        if pooled is None:
            raise ValueError("objective.converge needs the exits' pooled states")
        loss = loss + converge * convergence(pooled)
    return loss
