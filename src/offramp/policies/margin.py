from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState, check_range, probability_grid


@dataclass(frozen=True)
class MarginPolicy(ExitPolicy):
    """Exit once the gap between the two top probabilities reaches ``threshold`` (CALM softmax response)."""

    type = "margin"
    needs = ("logits",)
    threshold_field = "threshold"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        check_range("margin threshold", self.threshold, 0.0, 1.0)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        return signals.stat("margin") >= self.threshold, state

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        return probability_grid()

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        return self._ordered(np.linspace(0.0, 1.0, num))
