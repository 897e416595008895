from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState, check_range


@dataclass(frozen=True)
class QExitPolicy(ExitPolicy):
    """PALBERT's deterministic Q-exit: exit at the first exit whose CDF of the exit distribution > q.

    p_i = lambda_i * prod_{j<i} (1 - lambda_j); CDF_i = sum_{j<=i} p_j. q = 0.5 exits at the median
    of the exit distribution.
    """

    type = "q_exit"
    needs = ("halting",)
    threshold_field = "q"
    q: float = 0.5

    def __post_init__(self) -> None:
        check_range("q_exit q", self.q, 0.0, 1.0, low_open=True, high_open=True)

    def start(self, batch_size: int, num_exits: int, device: torch.device | str = "cpu") -> PolicyState:
        z = torch.zeros(batch_size, dtype=torch.float64, device=device)
        return PolicyState(num_exits, {"log_survival": z, "cdf": z.clone()})

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.halting is None:
            raise ValueError("the q_exit policy needs a halting layer: build the model with halting={...}")
        lam = signals.halting.double()
        log_surv = state.extra["log_survival"]
        cdf = state.extra["cdf"] + lam * log_surv.exp()
        log_surv = log_surv + torch.log1p(-lam.clamp(max=1 - 1e-12))
        return cdf > self.q, PolicyState(state.num_exits, {"log_survival": log_surv, "cdf": cdf})

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        return [round(float(x), 4) for x in np.linspace(0.05, 0.95, 19)]

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        return self._ordered(np.linspace(0.0, 1.0, num + 2)[1:-1])  # the open interval (0, 1)
