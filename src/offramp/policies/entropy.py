from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState, check_range


@dataclass(frozen=True)
class EntropyPolicy(ExitPolicy):
    """Exit once the predictive entropy (nats) falls below ``threshold`` (DeeBERT)."""

    type = "entropy"
    needs = ("logits",)
    threshold_field = "threshold"
    higher_is_safer = False
    threshold: float = 0.3

    def __post_init__(self) -> None:
        check_range("entropy threshold", self.threshold, 0.0, math.inf)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        return signals.stat("entropy") < self.threshold, state

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        top = math.log(max(2, space.num_classes))
        return sorted({round(top * float(x), 4) for x in np.linspace(0.0, 1.0, 21)} | {0.001, 0.005, 0.01, 0.02})

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        return self._ordered(np.linspace(0.0, math.log(max(2, space.num_classes)), num))
