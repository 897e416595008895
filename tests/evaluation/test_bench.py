"""The classification speed benchmark runs on a tiny model and reports consistent figures."""

from __future__ import annotations

from offramp import EarlyExitModel, OfframpConfig
from offramp.evaluation.bench import measure


def test_measure_reports_ratios_and_takes_assigned_depths(tiny_bert):
    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=2)).eval()
    r = measure(model, 4, num_rows=8, seq_len=8, repeats=1, clock="cpu")
    assert r["mean_exit_layer"] == 2.5 and abs(r["ideal_speedup"] - 4 / 2.5) < 1e-9  # depths 1..4 evenly
    for key in ("overhead", "realised_speedup", "realised_over_ideal"):
        assert r[key] > 0 and r[key] == r[f"{key}_cpu"]
    assert abs(r["realised_over_ideal"] * r["ideal_speedup"] - r["realised_speedup"]) < 1e-9


def test_the_shallow_case_sends_most_rows_to_the_first_two_exits(tiny_bert):
    import pytest

    from offramp.evaluation.bench import SHALLOW, assigned_depths

    depth = assigned_depths([1, 2, 3, 4], 20, "shallow", seed=0)
    assert sorted(depth.tolist()) == [1] * 12 + [2] * 6 + [4] * 2 and SHALLOW == (0.6, 0.3)
    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=2)).eval()
    r = measure(model, 4, num_rows=20, seq_len=8, repeats=1, clock="cpu", depths="shallow")
    assert r["mean_exit_layer"] == pytest.approx((12 + 12 + 8) / 20)  # the depths asserted taken inside measure
    with pytest.raises(ValueError, match="'mixed' or 'shallow'"):
        assigned_depths([1, 2], 4, "deep", seed=0)
