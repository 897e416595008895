from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState, check_range


@dataclass(frozen=True)
class EntropyPolicy(ExitPolicy):
    """Exit once the predictive entropy (nats) falls below ``threshold`` (DeeBERT)."""

    type = "entropy"
    threshold_field = "threshold"
    higher_is_safer = False
    threshold: float = 0.3

    def __post_init__(self) -> None:
        check_range("entropy threshold", self.threshold, 0.0, math.inf)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        logp = signals.logits.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1) < self.threshold, state
