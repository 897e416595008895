"""DEER as an exit policy over cue events: a trial answer at each cue, exit when it is confident.

The "exits" of a chain of thought are its cue events. At each one the reasoning engine forces a
trial answer from the cached prefix and passes its mean token probability as ``ExitSignals.trial``
(-1 when the answer is empty or did not close), the same value a stored event dataset keeps, so
the same ``decide`` runs online and over stored events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState, check_range, probability_grid


@dataclass(frozen=True)
class DeerPolicy(ExitPolicy):
    """Exit at the first cue event whose trial answer's mean token probability is >= ``threshold``."""

    threshold: float = 0.95

    type: ClassVar[str] = "deer"
    needs: ClassVar[tuple[str, ...]] = ("trial",)
    threshold_field: ClassVar[str | None] = "threshold"

    def __post_init__(self) -> None:
        check_range("DEER threshold", self.threshold, 0.0, 1.0)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.trial is None:
            raise ValueError("the deer policy reads ExitSignals.trial (a forced trial answer's mean token "
                             "probability at a cue event); only the reasoning engine supplies it")
        return signals.trial >= self.threshold, state

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        return probability_grid()

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        return self._ordered(np.linspace(0.0, 1.0, num))
