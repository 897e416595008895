"""The exit's own confidence as the exit rule (CALM's learned classifier, DYNAMAX's exit classifier).

A token exit carries a small confidence classifier that reads the exit head's features and gives,
per row, the probability that the exit's top token is acceptable (trained with top-k-relaxed
targets, ``offramp.training.distill``). Engines pass it as ``ExitSignals.confidence``; the policy
exits where it reaches ``threshold``. It costs no full-vocabulary projection at exits not taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState, check_range, probability_grid


@dataclass(frozen=True)
class TokenConfidencePolicy(ExitPolicy):
    """Exit at the first exit whose confidence (a probability) is >= ``threshold``.

    Args:
        threshold: in [0, 1]; 1.0 exits only on certainty (use the ``never`` policy to never exit).
        min_exit: index of the first exit allowed to fire (0 = every exit).
    """

    threshold: float = 0.9
    min_exit: int = 0

    type: ClassVar[str] = "token_confidence"
    needs: ClassVar[tuple[str, ...]] = ("confidence",)
    threshold_field: ClassVar[str | None] = "threshold"
    higher_is_safer: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_range("token_confidence threshold", self.threshold, 0.0, 1.0)
        if not isinstance(self.min_exit, int) or self.min_exit < 0:
            raise ValueError(f"min_exit must be an integer >= 0, got {self.min_exit!r}")

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.confidence is None:
            raise ValueError("token_confidence reads ExitSignals.confidence (the exit's confidence classifier); "
                             "this model or trace has none")
        exit_now = signals.confidence >= self.threshold  # (b,)
        if index < self.min_exit:
            exit_now = exit_now & False
        return exit_now, state

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        return probability_grid()

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        return self._ordered(np.linspace(0.0, 1.0, num))
