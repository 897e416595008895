"""Reports: Markdown table rows, JSON schema, non-empty PNGs, reliability bins."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from offramp.evaluation.report import markdown_table, reliability_bins, softmax_confidence, write_report
from offramp.evaluation.sweep import sweep


class _Trace:
    """A synthetic trace: 4 exits, confidence and accuracy rising with depth."""

    def __init__(self, n: int = 200, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        onehot = torch.nn.functional.one_hot(self.labels, 3).float()
        self.logits = torch.stack([torch.randn(n, 3, generator=g) + (k + 1) * 0.8 * onehot for k in range(4)])
        self.exit_layers, self.num_layers = [1, 2, 3, 4], 4
        self.halting = self.gate = self.hidden = None


@pytest.fixture(scope="module")
def result():
    return sweep(_Trace(), ["entropy", "max_prob", "patience", "static"])


def test_write_report_files(tmp_path, result):
    logits = _Trace().logits[-1].numpy()
    labels = _Trace().labels.numpy()
    rel = {"full model": reliability_bins(softmax_confidence(logits), logits.argmax(-1) == labels)}
    paths = write_report(tmp_path, result, measured={"entropy": {"speedup": 1.7}}, reliability=rel,
                         title="test report")
    for key in ("markdown", "json", "pareto", "exit_histogram", "reliability"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    for png in ("pareto", "exit_histogram", "reliability"):
        assert paths[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    assert md.startswith("# test report")
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows]
    for rule in ("full", "entropy", "max_prob", "patience", "static", "oracle", "consistency oracle"):
        assert rule in names
    entropy_row = next(r for r in rows if r.split("|")[1].strip() == "entropy")
    assert entropy_row.rstrip(" |").endswith("1.7")
    data = json.loads(paths["json"].read_text())
    assert set(data) >= {"title", "sweep", "chosen", "measured", "reliability"}
    sw = data["sweep"]
    assert set(sw) >= {"metric", "num_layers", "exit_layers", "full", "points", "oracles", "frontier_layers"}
    assert len(sw["points"]) == len(result.points)
    assert set(sw["points"][0]) >= {"rule", "policy", "param", "value", "metric", "mean_exit_layer",
                                    "speedup_layers", "exit_counts"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_rule_without_a_setting_within_tolerance_is_listed(tmp_path, result):
    rule = result.rules[0]
    paths = write_report(tmp_path, result, chosen={rule: None})
    assert f"| {rule} | no setting within tolerance |" in paths["markdown"].read_text()


def test_reliability_bins_and_ece():
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    ok = np.array([1, 1, 1, 0])
    rel = reliability_bins(conf, ok, n_bins=10)
    counted = [b for b in rel["bins"] if b["count"]]
    assert [b["count"] for b in counted] == [2, 2]
    assert counted[0]["accuracy"] == 0.5 and counted[1]["accuracy"] == 1.0
    assert rel["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)
    with pytest.raises(ValueError):
        reliability_bins(np.array([]), np.array([]))


def test_markdown_table_format():
    md = markdown_table([{"a": 1.23456, "b": None, "c": {"type": "x", "t": 0.5}}], ["a", "b", "c"])
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1.235 | – | t=0.5 |"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    from offramp.utils import atomic_write_bytes

    target = tmp_path / "r.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, 3.0)  # type: ignore[arg-type]
    assert target.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


def test_the_plots_say_what_they_show_and_how_sure_it_is(tmp_path, result):
    """Pareto: the split and n in the title, a legend under the plots, the full model in a ±1
    standard error band, chosen settings with error bars, oracles as bounds; histograms: each
    panel's setting and metric, the oracle's panel a bound; reliability: a panel per curve and
    an x axis that starts where the bins do."""
    from matplotlib.patches import Rectangle

    from offramp.evaluation.report import plot_exit_histograms, plot_pareto, plot_reliability, standard_error

    chosen = {r: result.best_within(r, 0.01) for r in result.rules}
    fig = plot_pareto(result, tmp_path / "p.png", chosen=chosen, split="validation")
    assert fig._suptitle.get_text() == "accuracy vs compute on the validation split (n = 200)"
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert "±1 standard error" in texts and any("a bound, reads the labels" in t for t in texts)
    assert "every setting swept (the line: its frontier)" in texts
    ax = fig.axes[0]
    full = next(iter(result.full.values())).metric
    se = standard_error(result, full)
    assert se == pytest.approx((full * (1 - full) / 200) ** 0.5)
    bands = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert any(np.isclose(b.get_y(), full - se) and np.isclose(b.get_height(), 2 * se) for b in bands)
    assert len(ax.containers) == sum(p is not None for p in chosen.values())  # an error bar per chosen setting
    hist = {**{r: p for r, p in chosen.items() if p is not None}, result.oracles[0].rule: result.oracles[0]}
    fig = plot_exit_histograms(hist, result.exit_layers, tmp_path / "h.png", split="validation")
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert any(t.startswith("entropy: threshold=") and "accuracy 0." in t for t in titles)
    assert any("a bound, not a rule" in t for t in titles)
    conf = np.array([0.6, 0.7, 0.95, 0.99])
    curves = {"full model": reliability_bins(conf, np.array([1, 0, 1, 1])),
              "entropy": reliability_bins(conf, np.array([1, 1, 1, 0]))}
    fig = plot_reliability(curves, tmp_path / "r.png", split="test")
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title().split(" (")[0] for a in panels] == ["full model", "entropy"]
    assert panels[0].get_xlim()[0] == pytest.approx(0.5)  # the lowest bin holding an example starts at 0.53
