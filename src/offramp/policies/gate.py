from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState, check_range


@dataclass(frozen=True)
class GatePolicy(ExitPolicy):
    """JEI-DNN's learned gates: exit at the first l with a_l >= ``threshold`` (0.5 in JEI-DNN).

    With g_k the gate values, P_l = max(0, min(g_l, 1 - sum_{k<l} g_k)) is the probability of
    exiting at l, and a_l = clip(P_l / prod_{k<l} (1 - a_k), 0, 1) the probability of exiting at l
    given the row got there. The per-row state carries sum_{k<l} g_k and prod_{k<l} (1 - a_k).
    """

    type = "gate"
    needs = ("gate",)
    threshold_field = "threshold"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        check_range("gate threshold", self.threshold, 0.0, 1.0)

    def start(self, batch_size: int, num_exits: int, device: torch.device | str = "cpu") -> PolicyState:
        z = torch.zeros(batch_size, dtype=torch.float64, device=device)
        return PolicyState(num_exits, {"sum_g": z, "survival": torch.ones_like(z)})

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.gate is None:
            raise ValueError("the gate policy needs exit gates: build the model with gate={'type': 'uncertainty'}")
        g = signals.gate.double()
        sum_g, survival = state.extra["sum_g"], state.extra["survival"]
        p_exit = torch.clamp(torch.minimum(g, 1.0 - sum_g), min=0.0)  # P_l
        a = torch.where(survival > 0, (p_exit / survival.clamp_min(1e-300)).clamp(0.0, 1.0), torch.ones_like(g))
        new = PolicyState(state.num_exits, {"sum_g": sum_g + g, "survival": survival * (1.0 - a)})
        return a >= self.threshold, new

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        return [round(float(x), 4) for x in np.linspace(0.05, 0.95, 19)]

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        return self._ordered(np.linspace(0.0, 1.0, num))
