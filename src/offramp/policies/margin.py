from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState, check_range


@dataclass(frozen=True)
class MarginPolicy(ExitPolicy):
    """Exit once the gap between the two top probabilities reaches ``threshold`` (CALM softmax response)."""

    type = "margin"
    threshold_field = "threshold"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        check_range("margin threshold", self.threshold, 0.0, 1.0)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        probs = signals.logits.softmax(-1)
        if probs.shape[-1] < 2:
            raise ValueError("the margin policy needs at least 2 classes; use patience for regression")
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1] >= self.threshold, state
