from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState


@dataclass(frozen=True)
class OraclePolicy(ExitPolicy):
    """Analysis only: exit at the first exit whose prediction equals ``signals.labels``.

    With the true labels this is the oracle (first correct exit), the lower bound on compute of
    any policy on these exits. Given the last exit's predictions as labels it is the consistency
    oracle (first exit that agrees with the full model); ``offramp.evaluation.collect.replay``
    does that for ``mode="consistent"``.
    """

    type = "oracle"
    needs = ("logits", "labels")
    mode: str = "correct"

    def __post_init__(self) -> None:
        if self.mode not in ("correct", "consistent"):
            raise ValueError(f"oracle mode must be 'correct' or 'consistent', got {self.mode!r}")

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.labels is None:
            raise ValueError("the oracle policy needs labels (signals.labels): pass labels to predict/replay")
        if signals.logits is not None and signals.logits.shape[-1] == 1:
            raise ValueError("the oracle policy is defined for classification only")
        return signals.stat("top1") == signals.labels, state
