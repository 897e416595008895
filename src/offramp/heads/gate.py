"""JEI-DNN exit gates: a logistic gate per exit on four DETACHED uncertainty features of pi.

u_l = [max pi, H(pi), pi_(1) - pi_(2), H(pi^2 / sum pi^2)] of the exit's softmax pi_l, detached
from the classifier and the backbone (the gate loss never reaches them); g_l = sigmoid(w_l^T u_l +
b_l). There is a gate on every exit but the last: the last exit always exits, so its gate logit
is +inf (g = 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from offramp.config import check_gate_config  # the gate config is validated with the checkpoint config

NUM_FEATURES = 4


def _entropy(p: Tensor) -> Tensor:  # (..., c) -> (...)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def uncertainty_features(logits: Tensor) -> Tensor:  # (..., c) -> (..., 4)
    """[max pi, H(pi), pi_(1) - pi_(2), H(pi^2 / sum pi^2)] of softmax(logits), detached."""
    if logits.shape[-1] < 2:
        raise ValueError("JEI-DNN gates need classification logits (num_labels >= 2); regression has no pi")
    p = logits.detach().float().softmax(-1)
    top2 = p.topk(2, dim=-1).values
    sq = p * p
    sharpened = sq / sq.sum(-1, keepdim=True)
    return torch.stack([top2[..., 0], _entropy(p), top2[..., 0] - top2[..., 1], _entropy(sharpened)], dim=-1)


class ExitGates(nn.Module):
    """One logistic gate per exit except the last.

    Args:
        num_exits: exits of the model (gates on the first num_exits - 1).
        init_bias: initial bias of every gate (negative: start by rarely exiting).
    """

    def __init__(self, num_exits: int, *, init_bias: float = 0.0, type: str = "uncertainty") -> None:
        super().__init__()
        if num_exits < 1:
            raise ValueError(f"num_exits must be >= 1, got {num_exits}")
        self.num_exits = num_exits
        self.weight = nn.Parameter(torch.zeros(max(num_exits - 1, 0), NUM_FEATURES))  # (E-1, 4)
        self.bias = nn.Parameter(torch.full((max(num_exits - 1, 0),), float(init_bias)))  # (E-1,)

    def logit(self, index: int, logits: Tensor) -> Tensor:  # (b, c) -> (b,)
        """Gate logit of exit ``index`` for one exit's classifier logits (+inf at the last exit)."""
        if index == self.num_exits - 1:
            return torch.full(logits.shape[:1], float("inf"), device=logits.device)
        return uncertainty_features(logits) @ self.weight[index] + self.bias[index]

    def forward(self, exit_logits: Tensor) -> Tensor:  # (E, b, c) -> (b, E)
        """Gate logits of every exit; the last column is +inf (the last exit always exits)."""
        e, b, _ = exit_logits.shape
        u = uncertainty_features(exit_logits[:-1])  # (E-1, b, 4)
        z = torch.einsum("ebf,ef->eb", u, self.weight) + self.bias[:, None]  # (E-1, b)
        last = torch.full((1, b), float("inf"), device=exit_logits.device, dtype=z.dtype)
        return torch.cat([z, last]).transpose(0, 1)

    def step(self, index: int, logits: Tensor, state: Any = None) -> tuple[Tensor, None]:
        """The engine's per-exit call: (g (b,), state). Gates are stateless."""
        return torch.sigmoid(self.logit(index, logits)), None


def build_gates(cfg: dict[str, Any], num_exits: int) -> ExitGates:
    """The gates described by ``OfframpConfig.gate``."""
    cfg = check_gate_config(cfg)
    return ExitGates(num_exits, init_bias=cfg["init_bias"])
