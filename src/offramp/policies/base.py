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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

DISTRIBUTION_STATS = ("max_prob", "entropy", "margin", "top1")


def distribution_stat(logits: Tensor, name: str) -> Tensor:
    """One summary of the exit distribution softmax(logits) (b, c): max_prob, entropy (nats), margin
    (top-1 minus top-2 probability) or top1 (argmax). Engines, traces and policies all call this, so
    a value stored in a trace is bit-identical to the one the engine computes from the same logits."""
    if name == "max_prob":
        return logits.softmax(-1).amax(-1)
    if name == "entropy":
        logp = logits.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)
    if name == "margin":
        if logits.shape[-1] < 2:
            raise ValueError("the margin needs at least 2 classes; use patience for regression")
        top2 = logits.softmax(-1).topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if name == "top1":
        return logits.argmax(-1)
    raise ValueError(f"unknown distribution statistic {name!r}; known: {DISTRIBUTION_STATS}")


@dataclass
class ExitSignals:
    """What exit ``index`` produced for the rows still running (all tensors share dim 0 = rows).

    Attributes:
        logits: (b, c) exit logits (c = 1 for regression; c = vocabulary for token exits). None when
            a trace stores only ``stats`` (token traces keep summaries, not the vocabulary).
        layer: the 1-based backbone layer this exit sits after.
        halting: (b,) halting probability lambda of a PonderNet/PALBERT halting layer, if any.
        gate: (b,) exit-gate value of a JEI-DNN gate, if any.
        hidden: (b, h) pooled hidden state after the layer, if the policy asks for it.
        labels: (b,) true labels: only the oracle policy reads them (analysis only).
        confidence: (b,) the exit's own learned estimate that its answer is acceptable (a token
            exit's confidence classifier, a reasoning probe's P(right)), if the model has one.
        stats: precomputed ``distribution_stat`` values by name ((b,) each), used when ``logits``
            is None; values computed from ``logits`` are cached here too.
        trial: (b,) at a cue event of a chain of thought: the mean token probability of a trial
            answer forced there (-1 when it is empty or did not close); DEER reads it.
        row_key: (b,) int64 stable identity of each row (a hash of its token ids,
            ``offramp.policies.base.row_keys``): a policy that draws random numbers keys them on it.

    In a chain of thought the "exits" are its cue events: ``index`` is the event number, ``layer``
    the tokens generated before the event's fork point and ``hidden`` the (b, d) cue features.
    """

    logits: Tensor | None = None
    layer: int = 0
    halting: Tensor | None = None
    gate: Tensor | None = None
    hidden: Tensor | None = None
    labels: Tensor | None = None
    confidence: Tensor | None = None
    stats: dict[str, Tensor] | None = None
    trial: Tensor | None = None
    row_key: Tensor | None = None

    def stat(self, name: str) -> Tensor:
        """``distribution_stat(logits, name)`` (b,), from the stored stats or computed once."""
        if self.stats is not None and name in self.stats:
            return self.stats[name]
        if self.logits is None:
            raise ValueError(f"this exit has neither logits nor a stored {name!r}: the trace or engine does "
                             "not supply the exit distribution this policy reads")
        value = distribution_stat(self.logits, name)
        if self.stats is None:
            self.stats = {}
        self.stats[name] = value
        return value

    def _any(self) -> Tensor:
        for t in (self.logits, self.confidence, self.halting, self.gate, self.hidden, self.trial):
            if t is not None:
                return t
        if self.stats:
            return next(iter(self.stats.values()))
        raise ValueError("ExitSignals holds no tensor: give logits or another signal")

    @property
    def batch_size(self) -> int:
        return int(self._any().shape[0])

    @property
    def device(self) -> torch.device:
        return self._any().device


@dataclass(frozen=True)
class ExitSpace:
    """What a policy's default sweep grid and calibration candidates may depend on: the exits and
    the output size, never the data (so fixed-sequence testing stays valid).

    Attributes:
        exit_layers: 1-based layer of each exit.
        num_classes: classes of a classifier, the vocabulary of token exits (1 = regression).
        num_layers: layers of the backbone.
    """

    exit_layers: tuple[int, ...]
    num_classes: int
    num_layers: int

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)


def probability_grid() -> list[float]:
    """A grid over [0, 1], finer near 1 (the usual confidence thresholds of a sweep)."""
    return [round(float(x), 4) for x in np.linspace(0.0, 1.0, 21)] + [0.975, 0.99, 0.995, 0.999]


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
        needs: which ``ExitSignals`` the policy reads: "logits" (the exit distribution, or its stored
            stats), "confidence", "halting", "gate", "hidden", "labels"; an engine or trace that cannot
            supply one refuses the policy before any work (``require_signals``).
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

    def explain(self, index: int, signals: ExitSignals) -> dict:
        """What this policy saw at an exit, for logs (the reasoning engine's event log); {} by default."""
        return {}

    def check_exits(self, exit_layers: list[int]) -> None:
        """Raise a ValueError before any work if this policy cannot act on a model with exits after
        ``exit_layers`` (1-based); the engines and ``replay`` call it once per batch."""

    def sweep_grid(self, space: ExitSpace) -> list[float]:
        """The values of ``threshold_field`` a sweep tries by default. Policies with a threshold
        override it; a registered policy without one is refused by a test, not dropped by sweeps."""
        raise ValueError(f"policy {self.type!r} has no default sweep grid: pass one with --grid {self.type}=v1,v2")

    def candidates(self, space: ExitSpace, num: int = 201) -> np.ndarray:
        """Calibration thresholds, data-independent, ordered from the most conservative (latest
        exits) to the most aggressive, as Learn-then-Test's fixed-sequence testing walks them."""
        raise ValueError(f"no default calibration candidates for policy {self.type!r}: pass candidates=[...] "
                         "ordered from the most conservative to the most aggressive")

    def _ordered(self, grid: np.ndarray) -> np.ndarray:
        """``grid`` (ascending) ordered most conservative first."""
        grid = np.asarray(grid, dtype=np.float64)
        return grid[::-1].copy() if self.higher_is_safer else grid

    def with_threshold(self, value: float) -> "ExitPolicy":
        """A copy of this policy with its threshold field set to ``value``."""
        if self.threshold_field is None:
            raise ValueError(f"policy {self.type!r} has no threshold to set")
        return replace(self, **{self.threshold_field: value})

    def to_dict(self) -> dict:
        out = {"type": self.type}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})  # type: ignore[arg-type]
        return out


def require_signals(policy: ExitPolicy, available: tuple[str, ...] | set[str], where: str,
                    fix: str = "choose a policy that reads only those") -> None:
    """Raise a ValueError before any work if ``policy`` reads a signal that ``where`` (an engine or a
    trace) cannot supply; ``available`` lists the ones it can."""
    missing = [n for n in policy.needs if n not in available]
    if missing:
        raise ValueError(f"policy {policy.type!r} needs {', '.join(missing)}, which {where} does not supply "
                         f"(it supplies: {', '.join(sorted(available)) or 'nothing'}); {fix}")


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


FIRST_EXIT_SHARE = 0.95  # at or above this share of rows leaving at the first exit, say so
FIRST_EXIT_MIN_ROWS = 20


def warn_first_exit(exit_index: Sequence[int] | np.ndarray, exit_layers: Sequence[int], what: str,
                    fix: str) -> bool:
    """Warn when (almost) every row leaves at the first exit (the later exits then do nothing and
    the setting is likely too aggressive), or at any one exit before the last (the rule then
    treats every row alike). True when it warned."""
    index = np.asarray(exit_index, dtype=np.int64)
    if len(exit_layers) < 2 or len(index) < FIRST_EXIT_MIN_ROWS:
        return False
    counts = np.bincount(index, minlength=len(exit_layers))
    k = int(counts[:-1].argmax())  # leaving at the last exit is the full model: nothing to say
    share = float(counts[k] / len(index))
    if share < FIRST_EXIT_SHARE:
        return False
    if k == 0:
        warnings.warn(f"{what}: {share:.0%} of {len(index)} rows leave at the first exit (layer {exit_layers[0]}), "
                      f"so the exits after it are almost never used; {fix}", stacklevel=2)
    else:
        warnings.warn(f"{what}: {share:.0%} of {len(index)} rows leave at the same exit (layer {exit_layers[k]}): "
                      f"the rule does not tell easy rows from hard ones; {fix}", stacklevel=2)
    return True


# ------------------------------------------------------------------------------------- row keys
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wraps mod 2**64): a well-spread hash of each value."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def row_keys(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """A stable 63-bit identity of each row (b,) int64: a hash of its unpadded token ids in order.

    The same text gives the same key in any batch, at any position and with any padding (left or
    right), so a policy that draws random numbers per row (``ponder_sample``) can key them on it and
    take the same exits online and on a stored trace."""
    ids = input_ids.detach().cpu().numpy().astype(np.uint64)
    mask = (np.ones(ids.shape, dtype=bool) if attention_mask is None
            else attention_mask.detach().cpu().numpy().astype(bool))
    pos = np.cumsum(mask, axis=1, dtype=np.uint64) - np.uint64(1)  # position among the row's real tokens
    with np.errstate(over="ignore"):
        token = _mix64(ids * np.uint64(0x9E3779B97F4A7C15) + pos * np.uint64(0xD1B54A32D192ED03) + np.uint64(1))
        h = np.where(mask, token, np.uint64(0)).sum(axis=1, dtype=np.uint64)
        h = _mix64(h + mask.sum(axis=1).astype(np.uint64) * np.uint64(0x8CB92BA72F3D8DD7))
    return torch.from_numpy((h >> np.uint64(1)).astype(np.int64)).to(input_ids.device)


def keyed_uniform(keys: Tensor, seed: int, index: int) -> Tensor:
    """(b,) float64 uniforms in [0, 1), a function of (row key, seed, exit index) only."""
    k = keys.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        salt = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + index * 0xC2B2AE3D27D4EB4F + 0x165667B19E3779F9)
                                & _MASK64], dtype=np.uint64))
        x = _mix64(k ^ salt)
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / float(1 << 53)).to(keys.device)
