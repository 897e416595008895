from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, ExitSpace, PolicyState, check_range


@dataclass(frozen=True)
class SaturationPolicy(ExitPolicy):
    """Exit once cos(h_i, h_{i-1}) of the pooled hidden states reaches ``threshold`` (CALM)."""

    type = "saturation"
    needs = ("hidden",)
    threshold_field = "threshold"
    threshold: float = 0.99

    def __post_init__(self) -> None:
        check_range("saturation threshold", self.threshold, -1.0, 1.0)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.hidden is None:
            raise ValueError("the saturation policy needs pooled hidden states (signals.hidden)")
        h = signals.hidden.float()
        prev = state.extra.get("prev")
        if prev is None:
            out = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        else:
            out = torch.nn.functional.cosine_similarity(h, prev, dim=-1) >= self.threshold
        return out, PolicyState(state.num_exits, {"prev": h})

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        return sorted({round(float(x), 4) for x in np.linspace(0.8, 1.0, 21)} | {0.995, 0.999})

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        return self._ordered(np.linspace(-1.0, 1.0, num))
