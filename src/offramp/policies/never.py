from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState


@dataclass(frozen=True)
class NeverPolicy(ExitPolicy):
    """Never exit early: every row runs to the last exit (the full model)."""

    type = "never"

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        return torch.zeros(signals.batch_size, dtype=torch.bool, device=signals.device), state
