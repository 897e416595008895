from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState


@dataclass(frozen=True)
class PatiencePolicy(ExitPolicy):
    """PABEE: exit once the prediction has stayed the same for ``patience`` consecutive exits.

    cnt_1 = 0; cnt_i = cnt_{i-1} + 1 if the prediction at exit i equals the one at i - 1, else 0;
    exit at the first i with cnt_i = patience (the earliest exit is the (patience + 1)-th).
    Regression (one output): "the same" means |y_i - y_{i-1}| < ``regression_tol``. Decided per
    row (the reference code ANDs the counter over the batch, which is right only at batch size 1).
    """

    type = "patience"
    needs = ("logits",)
    threshold_field = "patience"
    patience: int = 2
    regression_tol: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {self.patience!r}")
        if not isinstance(self.regression_tol, (int, float)) or not self.regression_tol > 0:
            raise ValueError(f"regression_tol must be > 0, got {self.regression_tol}")

    def start(self, batch_size: int, num_exits: int, device: torch.device | str = "cpu") -> PolicyState:
        return PolicyState(num_exits, {"count": torch.zeros(batch_size, dtype=torch.long, device=device)})

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        logits = signals.logits
        count = state.extra["count"]
        first = "prev" not in state.extra
        if logits is not None and logits.shape[-1] == 1:
            pred = logits[:, 0].float()
            same = None if first else (pred - state.extra["prev"]).abs() < self.regression_tol
        else:
            pred = signals.stat("top1")
            same = None if first else pred == state.extra["prev"]
        count = torch.zeros_like(count) if same is None else torch.where(same, count + 1, torch.zeros_like(count))
        return count >= self.patience, PolicyState(state.num_exits, {"count": count, "prev": pred})

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        return list(range(1, space.num_exits))

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        return self._ordered(np.arange(1, max(space.num_exits, 2), dtype=np.float64))
