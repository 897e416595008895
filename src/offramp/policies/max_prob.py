from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState, check_range


@dataclass(frozen=True)
class MaxProbPolicy(ExitPolicy):
    """Exit once the top softmax probability reaches ``threshold``."""

    type = "max_prob"
    needs = ("logits",)
    threshold_field = "threshold"
    threshold: float = 0.9

    def __post_init__(self) -> None:
        check_range("max_prob threshold", self.threshold, 0.0, 1.0)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        return signals.stat("max_prob") >= self.threshold, state

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        c = max(2, space.num_classes)  # below 1/c every row exits at the first exit
        base = [1 / c + (1 - 1 / c) * x for x in np.linspace(0.0, 1.0, 21)]
        return sorted({round(float(v), 4) for v in base} | {0.975, 0.99, 0.995, 0.999})

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        return self._ordered(np.linspace(0.0, 1.0, num))
