"""Exit classifiers: one per exit (PABEE) or one shared by all exits (PALBERT)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from offramp.backbones.base import first_token, masked_mean


class ExitClassifiers(nn.Module):
    """Pooling + dropout + classifier at each exit: linear, or an MLP with one hidden layer.

    Args:
        hidden_size: width of the backbone's hidden states.
        num_labels: classes (1 for regression).
        num_exits: number of exits.
        shared: one classifier for every exit instead of one per exit.
        pooling: "cls" (first token, through the backbone's pooler if ``pooler`` is given) or
            "mean" (masked mean over tokens).
        dropout: dropout before the linear layer.
        pooler: the backbone's pooler module (used with "cls"), or None.
        kind: "linear" or "mlp" (Linear, GELU, dropout, Linear: a small adapter that can read more
            of a shallow layer's state than a linear probe).
        mlp_hidden: the MLP's hidden width.
    """

    def __init__(self, hidden_size: int, num_labels: int, num_exits: int, *, shared: bool = False,
                 pooling: str = "cls", dropout: float = 0.1, pooler: nn.Module | None = None,
                 kind: str = "linear", mlp_hidden: int = 256) -> None:
        super().__init__()
        self.pooling = pooling
        self.shared = shared
        self.dropout = nn.Dropout(dropout)
        n = 1 if shared else num_exits

        def head() -> nn.Module:
            if kind == "mlp":
                return nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(mlp_hidden, num_labels))
            return nn.Linear(hidden_size, num_labels)

        self.linears = nn.ModuleList([head() for _ in range(n)])
        self._pooler = [pooler]  # kept out of this module's parameters: it belongs to the backbone

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:  # (b, t, d) -> (b, d)
        if self.pooling == "mean":
            return masked_mean(hidden, attention_mask)
        pooler = self._pooler[0]
        return pooler(hidden) if pooler is not None else first_token(hidden)

    def forward(self, index: int, pooled: Tensor) -> Tensor:  # (b, d) -> (b, c)
        return self.linears[0 if self.shared else index](self.dropout(pooled))

    def all_exits(self, pooled: Tensor) -> Tensor:  # (E, b, d) -> (E, b, c)
        if self.shared:
            return self.linears[0](self.dropout(pooled))
        return torch.stack([self(i, p) for i, p in enumerate(pooled)])
