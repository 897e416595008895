from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState


@dataclass(frozen=True)
class StaticPolicy(ExitPolicy):
    """Always exit at the first exit at or after layer ``layer`` (1-based): static truncation."""

    type = "static"
    threshold_field = "layer"
    layer: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"static policy: layer must be an integer >= 1, got {self.layer!r}")

    def check_exits(self, exit_layers: list[int]) -> None:
        if self.layer > exit_layers[-1]:
            raise ValueError(f"static policy: layer {self.layer} is past the last exit (layer {exit_layers[-1]}; "
                             f"exits at {list(exit_layers)}): no row would exit there. Use a layer in "
                             f"1..{exit_layers[-1]}")

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.layer < 1:
            raise ValueError("the static policy reads ExitSignals.layer (the 1-based layer of the exit); it is unset")
        return torch.full((signals.batch_size,), signals.layer >= self.layer, dtype=torch.bool,
                          device=signals.device), state

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        return [int(x) for x in space.exit_layers]
