from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState


@dataclass(frozen=True)
class PonderSamplePolicy(ExitPolicy):
    """PonderNet's stochastic rule: at each exit draw Bernoulli(lambda_i) and exit on 1.

    The uniforms of all exits are drawn per row when the batch starts, from a generator seeded
    with ``seed``, so replaying a trace in the same row order takes the same exits.
    """

    type = "ponder_sample"
    needs = ("halting",)
    seed: int = 0

    def start(self, batch_size: int, num_exits: int, device: torch.device | str = "cpu") -> PolicyState:
        g = torch.Generator().manual_seed(self.seed)
        u = torch.rand(batch_size, num_exits, generator=g, dtype=torch.float64).to(device)
        return PolicyState(num_exits, {"uniform": u})

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.halting is None:
            raise ValueError("the ponder_sample policy needs a halting layer: build the model with halting={...}")
        return state.extra["uniform"][:, index] < signals.halting.double(), state
