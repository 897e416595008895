"""Token exit heads for decoder LMs, and the small confidence classifier that decides the exit.

An exit head turns the hidden state after layer k into *features* (b, t, d); the backbone's own
final norm and (tied) LM head then give the logits, so the full-vocabulary projection is shared
and run once per token, at the exit taken. The exit decision reads the features through a
``ConfidenceHead`` (d -> 64 -> 1), far cheaper than one layer.

Head types (``offramp.heads.LM_HEADS``):
- ``tied``: the features are the hidden state itself (no parameters; CALM's shared classifier);
- ``ffn``: CALM-style one-layer FFN, ``h + W act(h)``, zero-initialised so it starts as ``tied``;
- ``block``: transformer-block-style FFN, ``h + W2 act(W1 norm(h))`` with its own norm;
- ``mamba``: the DYNAMAX Mamba block (``offramp.heads.mamba_head``), recurrent across tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class LMExitHead(nn.Module):
    """Base class: hidden (b, t, d) -> features (b, t, d). Stateful heads read/write ``cache``."""

    type: ClassVar[str] = ""
    stateful: ClassVar[bool] = False

    def __init__(self, hidden_size: int, **kwargs: Any) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden: Tensor, cache: Any = None, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class TiedHead(LMExitHead):
    """The shared final norm + LM head on the raw hidden state."""

    type = "tied"

    def forward(self, hidden: Tensor, cache: Any = None, mask: Tensor | None = None) -> Tensor:
        return hidden


class FFNHead(LMExitHead):
    """CALM-style one-layer FFN adapter: ``h + W act(h)`` (W zero-initialised)."""

    type = "ffn"

    def __init__(self, hidden_size: int, **kwargs: Any) -> None:
        super().__init__(hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor, cache: Any = None, mask: Tensor | None = None) -> Tensor:
        return hidden + self.proj(nn.functional.gelu(hidden))


class BlockHead(LMExitHead):
    """Transformer-block-style FFN: ``h + W2 act(W1 norm(h))`` (W2 zero-initialised)."""

    type = "block"

    def __init__(self, hidden_size: int, intermediate_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(hidden_size)
        inner = intermediate_size or hidden_size
        self.norm = RMSNorm(hidden_size)
        self.up = nn.Linear(hidden_size, inner)
        self.down = nn.Linear(inner, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden: Tensor, cache: Any = None, mask: Tensor | None = None) -> Tensor:
        return hidden + self.down(nn.functional.gelu(self.up(self.norm(hidden))))


class ConfidenceHead(nn.Module):
    """P(exit is acceptable) from the exit features: norm -> Linear(d, 64) -> GELU -> Linear(64, 1)."""

    def __init__(self, hidden_size: int, inner: int = 64) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.up = nn.Linear(hidden_size, inner)
        self.out = nn.Linear(inner, 1)

    def forward(self, features: Tensor) -> Tensor:  # (b, t, d) -> (b, t) logit
        return self.out(nn.functional.gelu(self.up(self.norm(features))))[..., 0]
