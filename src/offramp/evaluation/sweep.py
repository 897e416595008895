"""Every exit rule over a grid of its parameter on a stored trace: the quality-vs-compute trade-off.

``sweep`` replays each policy over an :class:`~offramp.evaluation.collect.ExitTrace` with the same
``decide`` the online engine calls (``replay``), so a point of the sweep is exactly what
``model.predict`` gives at that setting on the same inputs. It adds the two oracles (first correct
exit; first exit that agrees with the last), the lower bound on compute of any rule on these exits,
and finds the Pareto frontier of the metric against mean exit layer and against FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from offramp.evaluation.collect import replay, trace_signals
from offramp.flops import ExitFlops
from offramp.policies import POLICIES, ExitSpace, make_policy

ORACLE, CONSISTENCY_ORACLE = "oracle", "consistency oracle"
REGRESSION_TOL = 0.1
NOT_SWEPT = ("oracle", "never")  # the oracle is added as the oracle points; never is the full model


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---------------------------------------------------------------------------------------- metrics
def accuracy(pred_logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose argmax is the label."""
    return float((pred_logits.argmax(-1) == labels).mean())


def macro_f1(pred_logits: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean over classes of F1 (classes absent from both predictions and labels skipped)."""
    pred = pred_logits.argmax(-1)
    scores = []
    for c in range(pred_logits.shape[-1]):
        tp = np.sum((pred == c) & (labels == c))
        denom = np.sum(pred == c) + np.sum(labels == c)
        if denom:
            scores.append(2 * tp / denom)
    return float(np.mean(scores)) if scores else 0.0


def pearson(pred_logits: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation of a regression output with the targets (0 if either is constant)."""
    p, y = pred_logits.reshape(-1).astype(np.float64), labels.astype(np.float64)
    if p.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(p, y)[0, 1])


def neg_mse(pred_logits: np.ndarray, labels: np.ndarray) -> float:
    """Minus the mean squared error (so that higher is better, like the other metrics)."""
    return float(-np.mean((pred_logits.reshape(-1) - labels) ** 2))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "macro_f1": macro_f1, "pearson": pearson, "neg_mse": neg_mse}


def metric_fn(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The metric called ``name``; a ValueError lists the known ones."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {sorted(METRICS)}")
    return METRICS[name]


# ------------------------------------------------------------------------------------------ grids
def _classes(trace: Any) -> int:
    return int(trace.logits.shape[-1])


def exit_space(trace: Any) -> "ExitSpace":
    """The exits and output size of a trace: what a policy's default grid may depend on."""
    if hasattr(trace, "space"):
        return trace.space()
    return ExitSpace(tuple(int(x) for x in trace.exit_layers), _classes(trace), int(trace.num_layers))


# ------------------------------------------------------------------------------------------ points
@dataclass(frozen=True)
class SweepPoint:
    """One rule at one setting on a trace.

    Attributes:
        rule: the display name ("entropy", "PABEE", "oracle", ...).
        policy: the policy as a dict (``{"type": "entropy", "threshold": 0.3}``); {} for oracles.
        param: the swept field (None when the rule has none); value: its value.
        metric: the task metric at this setting (higher is better).
        mean_exit_layer: mean 1-based layer where rows left.
        mean_flops: mean FLOPs per example (None without a FLOPs count).
        speedup_layers: num_layers / mean_exit_layer (ideal, counted in layers).
        speedup_flops: full-model FLOPs / mean_flops (None without a FLOPs count).
        exit_counts: rows that left at each exit.
    """

    rule: str
    policy: dict
    param: str | None
    value: float | None
    metric: float
    mean_exit_layer: float
    mean_flops: float | None
    speedup_layers: float
    speedup_flops: float | None
    exit_counts: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def _point(rule: str, policy: dict, param: str | None, value: float | None, exit_index: np.ndarray,
           chosen: np.ndarray, trace: Any, metric: Callable, flops: ExitFlops | None) -> SweepPoint:
    layers = np.asarray(trace.exit_layers, dtype=np.float64)
    mean_layer = float(layers[exit_index].mean())
    mean_flops = flops.mean(exit_index) if flops is not None else None
    counts = np.bincount(exit_index, minlength=len(layers)).tolist()
    return SweepPoint(rule, policy, param, value, metric(chosen, _np(trace.labels)), mean_layer,
                      mean_flops, float(trace.num_layers) / mean_layer,
                      None if flops is None else flops.full / mean_flops, counts)


def oracle_exits(trace: Any, mode: str) -> np.ndarray:
    """(n,) exit index of the oracle: first correct exit (``mode="correct"``) or first exit agreeing
    with the last (``"consistent"``); the last exit when none does. Regression: |error| within that of
    the last exit / within 0.1 of the last exit's output."""
    logits, labels = _np(trace.logits), _np(trace.labels)  # (E, n, c), (n,)
    if logits.shape[-1] == 1:
        out = logits[..., 0]  # (E, n)
        ok = (np.abs(out - labels) <= np.abs(out[-1] - labels) if mode == "correct"
              else np.abs(out - out[-1]) < REGRESSION_TOL)
    else:
        pred = logits.argmax(-1)  # (E, n)
        ok = pred == (labels if mode == "correct" else pred[-1])
    ok[-1] = True
    return ok.argmax(0)


# ------------------------------------------------------------------------------------------ result
@dataclass
class SweepResult:
    """All points of a sweep, with the full model and the oracles for reference."""

    metric: str
    num_layers: int
    exit_layers: list[int]
    full: dict[str, SweepPoint]  # rule -> the model that rule ran on, run to its last exit
    points: list[SweepPoint] = field(default_factory=list)
    oracles: list[SweepPoint] = field(default_factory=list)
    full_flops: float | None = None

    @property
    def rules(self) -> list[str]:
        """Rule names in first-seen order."""
        return list(dict.fromkeys(p.rule for p in self.points))

    def of(self, rule: str) -> list[SweepPoint]:
        """Points of ``rule``."""
        return [p for p in self.points if p.rule == rule]

    def frontier(self, rule: str | None = None, by: str = "mean_exit_layer") -> list[SweepPoint]:
        """Pareto frontier (cost ascending, metric strictly rising) of one rule or of all rules."""
        return pareto(self.of(rule) if rule else self.points, by=by)

    def best_within(self, rule: str, tolerance: float = 0.01) -> SweepPoint | None:
        """The cheapest point of ``rule`` whose metric is within ``tolerance`` of its full model."""
        ref = self.full[rule].metric
        ok = [p for p in self.of(rule) if p.metric >= ref - tolerance - 1e-12]
        return min(ok, key=lambda p: (p.mean_exit_layer, -p.metric)) if ok else None

    def cheapest_within(self, rules: Sequence[str] | None = None, tolerance: float = 0.01) -> SweepPoint | None:
        """The cheapest point of any of ``rules`` (default: all) within ``tolerance`` of its full
        model: by mean FLOPs when counted, else by mean exit layer; ties go to the higher metric."""
        best = [p for p in (self.best_within(r, tolerance) for r in (rules or self.rules)) if p is not None]
        by = "mean_flops" if self.full_flops is not None else "mean_exit_layer"
        return min(best, key=lambda p: (getattr(p, by), -p.metric)) if best else None

    def selection(self, point: SweepPoint, *, tolerance: float, split: str, n: int,
                  rules: Sequence[str]) -> dict[str, Any]:
        """What a checkpoint stores (``extra.selected``) about a setting chosen from this sweep."""
        return {"rule": point.rule, "policy": point.policy, "split": split, "n": n, "metric": self.metric,
                "value": point.metric, "full_model": self.full[point.rule].metric, "tolerance": tolerance,
                "mean_exit_layer": point.mean_exit_layer, "speedup_flops": point.speedup_flops,
                "rules": list(rules)}

    def to_dict(self) -> dict:
        return {"metric": self.metric, "num_layers": self.num_layers, "exit_layers": self.exit_layers,
                "full_flops": self.full_flops,
                "full": {k: v.to_dict() for k, v in self.full.items()},
                "points": [p.to_dict() for p in self.points],
                "oracles": [p.to_dict() for p in self.oracles],
                "frontier_layers": [p.to_dict() for p in self.frontier()],
                "frontier_flops": ([p.to_dict() for p in self.frontier(by="mean_flops")]
                                   if self.full_flops is not None else None)}

    def merge(self, other: "SweepResult") -> "SweepResult":
        """Points of both sweeps in one result (e.g. rules on different models of one backbone)."""
        if other.num_layers != self.num_layers or other.metric != self.metric:
            raise ValueError("cannot merge sweeps of different depths or metrics")
        names = {p.rule for p in self.oracles}
        extra = [p for p in other.oracles if p.rule not in names]
        return SweepResult(self.metric, self.num_layers, sorted(set(self.exit_layers) | set(other.exit_layers)),
                           {**self.full, **other.full}, self.points + other.points,
                           self.oracles + extra, self.full_flops)


def pareto(points: Iterable[SweepPoint], by: str = "mean_exit_layer") -> list[SweepPoint]:
    """Points not dominated by a cheaper (or equally cheap) point with at least the same metric."""
    pts = sorted((p for p in points if getattr(p, by) is not None),
                 key=lambda p: (getattr(p, by), -p.metric))
    out: list[SweepPoint] = []
    for p in pts:
        if not out or p.metric > out[-1].metric:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------ sweep
def _signals(trace: Any) -> set[str]:
    if hasattr(trace, "signals"):
        return trace.signals()

    return trace_signals(trace)


def available_rules(trace: Any) -> list[str]:
    """Registered policies that can run on ``trace`` (its signals cover what they need)."""
    have = _signals(trace)
    return [name for name, cls in POLICIES.items() if name not in NOT_SWEPT and set(cls.needs) <= have]


def _as_spec(spec: str | Mapping[str, Any]) -> dict:
    return {"type": spec} if isinstance(spec, str) else dict(spec)


def sweep_rule(trace: Any, rule: str, spec: str | Mapping[str, Any], *, metric: str = "accuracy",
               flops: ExitFlops | None = None, grid: Sequence[float] | None = None) -> list[SweepPoint]:
    """Points of one rule: its policy at every value of ``grid`` (default: the policy's own
    ``sweep_grid``)."""
    spec = _as_spec(spec)
    kind = spec.pop("type")
    base = make_policy(kind, **spec)
    missing = [n for n in base.needs if n not in _signals(trace)]
    if missing:
        raise ValueError(f"rule {rule!r} ({kind}) needs {missing} signals, which the trace does not "
                         "have: collect it from a model with a halting layer / gate")
    fn = metric_fn(metric)
    field_name = base.threshold_field
    if field_name is None:
        settings = [(base, None)]
    else:
        values = list(grid) if grid is not None else base.sweep_grid(exit_space(trace))
        settings = []
        for v in values:
            v = v.item() if isinstance(v, np.generic) else v  # plain numbers in policy dicts and JSON
            try:
                settings.append((base.with_threshold(v), v))
            except ValueError as e:
                if grid is not None:  # the user's own value: say so rather than drop it
                    raise ValueError(f"grid value {v!r} for rule {rule!r}: {e}") from None
                continue  # a default grid value outside this policy's range (e.g. max_prob below 1/c)
    points = []
    for pol, v in settings:
        exit_index, chosen = replay(pol, trace)
        points.append(_point(rule, pol.to_dict(), field_name, v, _np(exit_index).astype(np.int64),
                             _np(chosen), trace, fn, flops))
    return points


def sweep(trace: Any, rules: Sequence[str] | Mapping[str, str | Mapping[str, Any]] | None = None, *,
          metric: str = "accuracy", flops: ExitFlops | None = None,
          grids: Mapping[str, Sequence[float]] | None = None, oracle_label: str = "") -> SweepResult:
    """Replay every rule over a grid of its parameter on ``trace``.

    Args:
        trace: an ExitTrace (logits (E, n, c), labels (n,), exit_layers, num_layers, halting, gate).
        rules: policy names, or display name -> policy name / policy dict (e.g.
            ``{"PABEE": "patience"}``). None: every registered policy the trace supports.
        metric: ``accuracy`` | ``macro_f1`` (classification), ``pearson`` | ``neg_mse`` (regression).
        flops: per-exit FLOPs (see :func:`offramp.flops.exit_flops`) to add FLOPs costs.
        grids: display name or policy name -> values to sweep instead of the defaults.
        oracle_label: appended to the oracle names (to tell apart oracles of several models).

    Returns:
        SweepResult with all points, the full model (last exit) and the two oracles.
    """
    fn = metric_fn(metric)
    if metric in ("accuracy", "macro_f1") and _classes(trace) == 1:
        raise ValueError(f"metric {metric!r} needs classes; the trace is a regression: use pearson or neg_mse")
    if rules is None:
        rules = available_rules(trace)
    named = dict(rules) if isinstance(rules, Mapping) else {r: r for r in rules}
    grids = dict(grids or {})
    points = []
    for rule, spec in named.items():
        kind = _as_spec(spec)["type"]
        points += sweep_rule(trace, rule, spec, metric=metric, flops=flops,
                             grid=grids.get(rule, grids.get(kind)))
    logits = _np(trace.logits)
    n, last = logits.shape[1], len(trace.exit_layers) - 1
    full_pt = _point("full", {}, None, None, np.full(n, last), logits[-1], trace, fn, flops)
    if flops is not None:  # the plain model: every layer, one head, no exit heads on the way
        full_pt = replace(full_pt, mean_flops=flops.full, speedup_flops=1.0)
    oracles = []
    for name, mode in ((ORACLE, "correct"), (CONSISTENCY_ORACLE, "consistent")):
        idx = oracle_exits(trace, mode)
        label = f"{name} ({oracle_label})" if oracle_label else name
        oracles.append(_point(label, {"type": "oracle", "mode": mode}, None, None, idx,
                              logits[idx, np.arange(n)], trace, fn, flops))
    return SweepResult(metric, int(trace.num_layers), [int(x) for x in trace.exit_layers],
                       {r: full_pt for r in named}, points, oracles,
                       None if flops is None else flops.full)


def select_policy(trace: Any, rules: Sequence[str] | None = None, *, tolerance: float = 0.01,
                  metric: str = "accuracy", flops: ExitFlops | None = None) -> tuple[SweepPoint | None, SweepResult]:
    """The cheapest setting of any of ``rules`` within ``tolerance`` of the full model on ``trace``
    (a validation trace: choose there, measure elsewhere), and the sweep it came from.

    Cheapest is by mean FLOPs when ``flops`` is given, else by mean exit layer; ties go to the
    higher metric. None when no setting of any rule is within the tolerance."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    result = sweep(trace, rules, metric=metric, flops=flops)
    return result.cheapest_within(tolerance=tolerance), result
