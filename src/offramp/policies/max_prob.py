from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState, check_range


@dataclass(frozen=True)
class MaxProbPolicy(ExitPolicy):
    """Exit once the top softmax probability reaches ``threshold``."""

    type = "max_prob"
    threshold_field = "threshold"
    threshold: float = 0.9

    def __post_init__(self) -> None:
        check_range("max_prob threshold", self.threshold, 0.0, 1.0)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        return signals.logits.softmax(-1).amax(-1) >= self.threshold, state
