"""The exit-policy protocol shared by the online engines and the offline sweep.

A policy is a small, pure, vectorised object. ``start`` makes the per-row state for a batch;
``decide`` looks at what one exit produced for the rows still running and returns, per row,
whether it exits there. The classify engine calls ``decide`` inside the forward pass (rows that
exit then leave the running batch, their state rows with them); ``replay`` calls the very same
``decide`` over a stored trace. So a threshold chosen on a trace gives, on the same inputs,
exactly the exits that inference takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class ExitSignals:
    """What exit ``index`` produced for the rows still running (all tensors share dim 0 = rows).

    Attributes:
        logits: (b, c) exit logits (c = 1 for regression).
        halting: (b,) halting probability lambda of a PonderNet/PALBERT halting layer, if any.
        gate: (b,) exit-gate value of a JEI-DNN gate, if any.
        hidden: (b, h) pooled hidden state after the layer, if the policy asks for it.
        labels: (b,) true labels: only the oracle policy reads them (analysis only).
        layer: the 1-based backbone layer this exit sits after.
    """

    logits: Tensor
    layer: int = 0
    halting: Tensor | None = None
    gate: Tensor | None = None
    hidden: Tensor | None = None
    labels: Tensor | None = None


@dataclass
class PolicyState:
    """Per-row state of a policy: every tensor field has the batch on dim 0.

    ``num_exits`` is the number of exits of the model; ``extra`` holds per-row tensors named by the
    policy (patience counters, log-survival, previous prediction, ...).
    """

    num_exits: int
    extra: dict[str, Tensor] = field(default_factory=dict)

    def select(self, rows: Tensor) -> "PolicyState":
        """The state of the rows ``rows`` (a (k,) index tensor), in that order."""
        return PolicyState(self.num_exits, {k: v.index_select(0, rows) for k, v in self.extra.items()})


class ExitPolicy:
    """Base class of exit policies. Subclasses are frozen dataclasses registered in ``POLICIES``.

    Attributes:
        type: the registry name ("entropy", "patience", ...), the same as the file name.
        needs: which optional ``ExitSignals`` fields the policy reads ("halting", "gate", "hidden",
            "labels"); the engine and the trace collector provide them.
        threshold_field: the name of the field a sweep or a calibrator moves (None if none).
        higher_is_safer: whether a larger value of that field makes exits later (more conservative).
    """

    type: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    threshold_field: ClassVar[str | None] = None
    higher_is_safer: ClassVar[bool] = True

    def start(self, batch_size: int, num_exits: int, device: torch.device | str = "cpu") -> PolicyState:
        """Fresh per-row state for ``batch_size`` rows of a model with ``num_exits`` exits."""
        return PolicyState(num_exits)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        """(b,) bool: which rows exit at exit ``index`` (0-based); and the updated state.

        The engines always take the last exit for rows still running; ``decide`` need not.
        """
        raise NotImplementedError

    def check_exits(self, exit_layers: list[int]) -> None:
        """Raise a ValueError before any work if this policy cannot act on a model with exits after
        ``exit_layers`` (1-based); the engines and ``replay`` call it once per batch."""

    def with_threshold(self, value: float) -> "ExitPolicy":
        """A copy of this policy with its threshold field set to ``value``."""
        if self.threshold_field is None:
            raise ValueError(f"policy {self.type!r} has no threshold to set")
        return replace(self, **{self.threshold_field: value})

    def to_dict(self) -> dict:
        out = {"type": self.type}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})  # type: ignore[arg-type]
        return out


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise a ValueError naming ``name`` if ``value`` is not a number in [low, high] (or open ends).

    NaN is refused: every comparison with it is false, so a NaN threshold would silently never exit.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")
