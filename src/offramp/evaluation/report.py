"""Reports a person would rather look at than read: Markdown table, JSON, and PNG plots.

``write_report`` writes into a folder: ``report.md`` (the numbers), ``report.json`` (everything),
``pareto.png`` (metric vs mean exit layer and vs FLOPs: every rule, its frontier, the oracles and
the full model), ``exit_histogram.png`` (where rows left, per rule) and ``reliability.png``
(confidence vs accuracy in 15 bins, with ECE). Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from offramp.evaluation.collect import replay  # noqa: E402
from offramp.evaluation.sweep import SweepPoint, SweepResult, pareto  # noqa: E402
from offramp.flops import ExitFlops  # noqa: E402
from offramp.utils import atomic_write_bytes, atomic_write_text  # noqa: E402


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> dict:
    """Equal-width confidence bins: per bin the count, mean confidence, accuracy; and the ECE."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.shape != ok.shape or conf.size == 0:
        raise ValueError("confidence and correct must be non-empty arrays of the same shape")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        acc = float(ok[sel].mean()) if n else None
        mc = float(conf[sel].mean()) if n else None
        if n:
            ece += n / conf.size * abs(acc - mc)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                     "confidence": mc, "accuracy": acc})
    return {"bins": bins, "ece": float(ece)}


def softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """(n,) max softmax probability of (n, c) logits."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(-1, keepdims=True)).max(-1)


# -------------------------------------------------------------------------------------------- plots
def _full_groups(result: SweepResult) -> list[tuple[SweepPoint, list[str]]]:
    """Each distinct full model of the sweep with the rules that ran on it."""
    groups: dict[int, tuple[SweepPoint, list[str]]] = {}
    for rule, point in result.full.items():
        groups.setdefault(id(point), (point, []))[1].append(rule)
    return list(groups.values())


def _metric_range(result: SweepResult) -> tuple[float, float]:
    """The y range of the rules and the full models (the oracles may lie far above it)."""
    values = [p.metric for p in result.points] + [p.metric for p in result.full.values()]
    lo, hi = min(values), max(values)
    pad = max(0.02 * (hi - lo), 1e-3) if hi > lo else 0.01
    return lo - pad, hi + 4 * pad


PROPORTIONS = ("accuracy", "agreement")  # metrics that are a share of rows: a standard error sqrt(p(1-p)/n)


def _rows(result: SweepResult) -> int:
    """How many rows (tokens) the sweep's points were measured on."""
    full = next(iter(result.full.values()), None) or (result.points[0] if result.points else None)
    return int(sum(full.exit_counts)) if full is not None else 0


def standard_error(result: SweepResult, value: float) -> float | None:
    """The standard error of a metric value of this sweep, where the metric is a share of rows."""
    n = _rows(result)
    if result.metric not in PROPORTIONS or n < 2:
        return None
    return math.sqrt(max(value * (1 - value), 0.0) / n)


def _where(result: SweepResult, split: str | None) -> str:
    n = _rows(result)
    return f"on the {split} split (n = {n})" if split else f"(n = {n})"


def plot_pareto(result: SweepResult, path: str | Path, *, chosen: Mapping[str, SweepPoint] | None = None,
                split: str | None = None) -> Any:
    """Metric vs mean exit layer (and vs FLOPs when counted): every rule, frontiers, oracles, full.

    Each rule's swept settings are small dots and its frontier a line (one setting: a square); a
    star is its chosen setting, with ±1 standard error bars where the metric is a share of rows,
    and the full model is a grey line in a ±1 standard error band, so that a difference inside the
    band reads as noise. Oracles are bounds, not rules (they read the labels): a dotted line each,
    named with its value in the legend. The y axis spans the rules and the full models; an oracle
    above it is listed, not drawn. The legend sits under the plots in columns. Returns the figure."""
    from matplotlib.lines import Line2D

    by = ["mean_exit_layer"] + (["mean_flops"] if result.full_flops is not None else [])
    fig, axes = plt.subplots(1, len(by), figsize=(6.5 * len(by), 4.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lo, hi = _metric_range(result)
    fulls = _full_groups(result)
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for ax, key in zip(axes[0], by):
        scale = 1e9 if key == "mean_flops" else 1.0
        for i, rule in enumerate(result.rules):
            pts, col = result.of(rule), colors[i % len(colors)]
            xs = [getattr(p, key) / scale for p in pts]
            if len(pts) == 1:
                ax.scatter(xs, [pts[0].metric], s=45, marker="s", color=col, label=f"{rule} (one setting)",
                           zorder=4)
            else:
                ax.scatter(xs, [p.metric for p in pts], s=12, alpha=0.35, color=col)
                front = pareto(pts, by=key)
                ax.plot([getattr(p, key) / scale for p in front], [p.metric for p in front], "-o",
                        ms=3, color=col, label=rule)
            if chosen and rule in chosen and chosen[rule] is not None:
                c = chosen[rule]
                ax.errorbar([getattr(c, key) / scale], [c.metric], yerr=standard_error(result, c.metric),
                            fmt="*", ms=12, color=col, mec="black", ecolor=col, capsize=3, zorder=5)
        for k, (f, rules) in enumerate(fulls):
            label = "full model" if len(fulls) == 1 else f"full model ({', '.join(rules)})"
            ax.axhline(f.metric, color="gray", ls=styles[k % len(styles)], lw=1.0, label=label)
            se = standard_error(result, f.metric)
            if se is not None:
                ax.axhspan(f.metric - se, f.metric + se, color="gray", alpha=0.12, lw=0,
                           label="±1 standard error" if k == 0 else None)
        for o, ls in zip(result.oracles, [":", (0, (1, 3)), (0, (3, 1, 1, 1))]):
            label = f"{o.rule} (a bound, reads the labels): {result.metric} {o.metric:.3g}"
            if o.metric <= hi:
                ax.axhline(o.metric, color="black", ls=ls, lw=1.2, label=label)
            else:  # above the axis: listed, not drawn
                ax.plot([], [], color="black", ls=ls, lw=1.2, label=label + ", above this axis")
        ax.set_ylim(lo, hi)
        ax.set_xlabel("mean exit layer" if key == "mean_exit_layer" else "mean GFLOPs per example")
        ax.set_ylabel(result.metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker="o", ms=4, color="gray", alpha=0.5),
                Line2D([], [], ls="", marker="*", ms=10, color="gray", mec="black")]
    labels += ["every setting swept (the line: its frontier)", "chosen setting (±1 standard error)"]
    fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(3, len(labels)), frameon=False)
    fig.suptitle(f"{result.metric} vs compute {_where(result, split)}")
    _save_fig(fig, Path(path))
    return fig


def plot_exit_histograms(points: Mapping[str, SweepPoint], exit_layers: Sequence[int],
                         path: str | Path, *, metric: str = "accuracy", split: str | None = None) -> Any:
    """One bar chart per rule: the share of rows leaving at each exit layer, titled with the
    rule's setting, its metric and mean exit layer. An oracle's panel is hatched grey and says
    it is a bound (it reads the labels), not a rule to use. Returns the figure."""
    names = [k for k, v in points.items() if v is not None]
    if not names:
        raise ValueError("no points to draw exit histograms for")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        p = points[name]
        oracle = p.policy.get("type") == "oracle"
        counts = np.asarray(p.exit_counts, dtype=np.float64)
        ax.bar([str(x) for x in exit_layers], counts / max(1.0, counts.sum()),
               color="lightgray" if oracle else "tab:blue", hatch="//" if oracle else None,
               edgecolor="gray" if oracle else None)
        setting = "a bound, not a rule: it reads the labels" if oracle else \
            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in p.policy.items() if k != "type") or "no setting"
        ax.set_title(f"{name}: {setting}\n{metric} {p.metric:.3f}, mean exit layer {p.mean_exit_layer:.2f}",
                     fontsize=9)
        ax.set_xlabel("exit layer")
        ax.set_ylabel("share of rows")
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    n = int(sum(points[names[0]].exit_counts))
    fig.suptitle(f"where rows left, {'on the ' + split + ' split ' if split else ''}(n = {n})", fontsize=10)
    fig.tight_layout()
    _save_fig(fig, Path(path))
    return fig


def plot_reliability(curves: Mapping[str, dict], path: str | Path, *, split: str | None = None) -> Any:
    """Reliability diagrams, one panel per curve (from reliability_bins): accuracy against
    confidence per bin, the full model's curve in grey in every other panel for reference, the
    number of examples per bin as bars on a second axis (a bin of 3 examples says little). The x
    axis starts at the lowest confidence any bin holds. Returns the figure."""
    names = list(curves)
    if not names:
        raise ValueError("no reliability curves to draw")
    lows = [b["low"] for rel in curves.values() for b in rel["bins"] if b["count"]]
    x0 = math.floor(min(lows) * 10 + 1e-9) / 10 if lows else 0.0
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    reference = curves.get("full model")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def points(rel: dict) -> tuple[list[float], list[float]]:
        kept = [b for b in rel["bins"] if b["count"]]
        return [b["confidence"] for b in kept], [b["accuracy"] for b in kept]

    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        rel = curves[name]
        ax.plot([x0, 1], [x0, 1], color="gray", ls="--", lw=0.8)
        if reference is not None and name != "full model":
            ax.plot(*points(reference), "-", color="gray", lw=1, alpha=0.7, label="full model")
        ax.plot(*points(rel), "-o", ms=3, color=colors[i % len(colors)], label=name)
        counts = ax.twinx()
        counts.bar([b["low"] for b in rel["bins"]], [b["count"] for b in rel["bins"]],
                   width=rel["bins"][0]["high"] - rel["bins"][0]["low"], align="edge", color="gray", alpha=0.15)
        counts.set_ylabel("examples per bin", fontsize=8)
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.set_title(f"{name} (ECE {rel['ece']:.3f})", fontsize=9)
        ax.set_xlim(x0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max softmax probability)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        if reference is not None and name != "full model":
            ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"reliability {'on the ' + split + ' split' if split else ''} (dashed: perfect calibration)",
                 fontsize=10)
    fig.tight_layout()
    _save_fig(fig, Path(path))
    return fig


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (floats shown with 4 significant decimals)."""
    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        if isinstance(v, dict):
            return ", ".join(f"{k}={fmt(x)}" for k, x in v.items() if k != "type") or "–"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def point_row(p: SweepPoint, metric: str, measured: Mapping[str, Any] | None = None) -> dict:
    """A table row for one point (measured speed-up from ``measured`` when given)."""
    setting = {p.param: p.value} if p.param else (p.policy or None)
    return {"rule": p.rule, "policy": p.policy.get("type", "–") if p.policy else "–",
            "setting": setting, metric: p.metric, "mean exit layer": p.mean_exit_layer,
            "layer speed-up": p.speedup_layers, "FLOPs speed-up": p.speedup_flops,
            "measured speed-up": (measured or {}).get("speedup")}


def write_report(out_dir: str | Path, result: SweepResult, *,
                 chosen: Mapping[str, SweepPoint | None] | None = None,
                 measured: Mapping[str, Mapping[str, Any]] | None = None,
                 reliability: Mapping[str, dict] | None = None, title: str = "offramp report",
                 notes: Sequence[str] = (), extra: Mapping[str, Any] | None = None,
                 tolerance: float = 0.01, split: str | None = None) -> dict[str, Path]:
    """Write report.md, report.json and the PNG plots of a sweep into ``out_dir``.

    Args:
        out_dir: the folder (created if needed).
        result: the sweep.
        chosen: rule -> its chosen point (default: the cheapest within 1 point of its full model).
        measured: rule -> measured timing (``{"speedup": ..., "wall_s": ...}``), shown in the table.
        reliability: curve name -> :func:`reliability_bins` output, for reliability.png.
        title: the Markdown title; notes: lines printed under it; extra: more keys for report.json.
        tolerance: how far below its full model a chosen setting may be (the default chooser's,
            and what the report says).
        split: the split the trace holds (named in the plots' titles).

    Returns:
        name -> path of each file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if chosen is None:
        chosen = {r: result.best_within(r, tolerance) for r in result.rules}
    m = result.metric
    cols = ["rule", "setting", m, "mean exit layer", "layer speed-up", "FLOPs speed-up"]
    if measured:  # only where real early exit was timed (a sweep replays, it measures nothing)
        cols.append("measured speed-up")
    rows = [point_row(next(iter(result.full.values())), m, (measured or {}).get("full"))] if result.full else []
    for r, p in chosen.items():  # every rule gets a row, also one with no setting within the tolerance
        rows.append(point_row(p, m, (measured or {}).get(r)) if p is not None else
                    {"rule": r, "policy": "–", "setting": "no setting within tolerance", m: None,
                     "mean exit layer": None, "layer speed-up": None, "FLOPs speed-up": None,
                     "measured speed-up": None})
    rows += [point_row(o, m) for o in result.oracles]
    front = [point_row(p, m) for p in result.frontier()]
    md = [f"# {title}", "", *[f"{n}  " for n in notes], "",
          f"Chosen setting per rule (the cheapest within {tolerance:g} of its full model's {m}), "
          f"{len(result.points)} settings swept:", "", markdown_table(rows, cols), "",
          "Pareto frontier over all rules (metric vs mean exit layer):", "",
          markdown_table(front, ["rule", "setting", m, "mean exit layer", "FLOPs speed-up"]), "",
          "![pareto](pareto.png)", "", "![exit layers](exit_histogram.png)", ""]
    paths = {"markdown": out / "report.md", "json": out / "report.json", "pareto": out / "pareto.png"}
    plot_pareto(result, paths["pareto"], chosen=chosen, split=split)
    hist_points = {r: p for r, p in chosen.items() if p is not None}
    hist_points.update({o.rule: o for o in result.oracles[:1]})
    paths["exit_histogram"] = out / "exit_histogram.png"
    plot_exit_histograms(hist_points, result.exit_layers, paths["exit_histogram"], metric=m, split=split)
    if reliability:
        paths["reliability"] = out / "reliability.png"
        plot_reliability(reliability, paths["reliability"], split=split)
        md += ["![reliability](reliability.png)", ""]
    payload = {"title": title, "sweep": result.to_dict(),
               "chosen": {r: (p.to_dict() if p else None) for r, p in chosen.items()},
               "measured": dict(measured or {}), "reliability": dict(reliability or {}),
               **dict(extra or {})}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=float))
    atomic_write_text(paths["markdown"], "\n".join(md))
    return paths


def trace_flops(trace: Any) -> Any:
    """The ExitFlops stored with a trace by `offramp collect`, or None."""
    f = trace.meta.get("flops") if isinstance(trace.meta, dict) else None
    if not f:
        return None
    return ExitFlops(tuple(f["exit_layers"]), np.asarray(f["per_exit"], dtype=np.float64), float(f["full"]),
                     float(f["embeddings"]), float(f["layer"]), float(f["head"]), float(f["extra"]))


def per_exit_metric(trace: Any) -> list[float] | None:
    """Accuracy of each exit over the trace (None for regression or without labels)."""
    if trace.labels is None or trace.logits.shape[-1] == 1:
        return None
    return [round(float(x), 4) for x in (trace.logits.argmax(-1) == trace.labels[None]).float().mean(1)]


def reliability_curves(trace: Any, chosen: dict[str, Any]) -> dict[str, dict] | None:
    """Reliability bins of the last exit and of each chosen rule's exits (classification only)."""
    if trace.labels is None or trace.logits.shape[-1] == 1:
        return None
    labels = trace.labels.numpy()
    curves = {}
    last = trace.logits[-1].numpy()
    curves["full model"] = reliability_bins(softmax_confidence(last), last.argmax(-1) == labels)
    for rule, point in chosen.items():
        if point is not None and point.policy:
            logits = replay(point.policy, trace)[1].numpy()
            curves[rule] = reliability_bins(softmax_confidence(logits), logits.argmax(-1) == labels)
    return curves
