"""The token-exit rule of the decoding engine, as an ``ExitPolicy``.

At each exit layer a small confidence classifier reads the exit head's features and gives, per
row, the probability that the exit's top token is acceptable (trained with top-k-relaxed targets,
``offramp.objectives.distill``). The engine passes it as ``ExitSignals.gate`` (b,); the policy
exits where it reaches ``threshold``. Being an ``ExitPolicy``, the same ``decide`` can be replayed
offline over stored confidences, and any other policy that reads ``gate`` can be plugged in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState, check_range


@dataclass(frozen=True)
class TokenConfidencePolicy(ExitPolicy):
    """Exit a token at the first exit whose confidence (probability) is >= ``threshold``.

    Args:
        threshold: in [0, 1]; 1.0 exits only on certainty, a value above 1 is refused (use
            ``threshold=None`` in the engine to never exit).
        min_exit: index of the first exit allowed to fire (0 = every exit).
    """

    threshold: float = 0.9
    min_exit: int = 0

    type: ClassVar[str] = "token_confidence"
    needs: ClassVar[tuple[str, ...]] = ("gate",)
    threshold_field: ClassVar[str | None] = "threshold"
    higher_is_safer: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_range("threshold", self.threshold, 0.0, 1.0)
        if self.min_exit < 0:
            raise ValueError(f"min_exit must be >= 0, got {self.min_exit}")

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.gate is None:
            raise ValueError("token_confidence needs ExitSignals.gate (the exit confidence)")
        exit_now = signals.gate >= self.threshold  # (b,)
        if index < self.min_exit:
            exit_now = exit_now & False
        return exit_now, state
