"""ECE with 15 equal-width bins against a brute-force loop; reliability data."""

import numpy as np
import pytest

from offramp.calibration import expected_calibration_error, reliability
from offramp.calibration.ece import plot_reliability


def _brute_ece(probs, labels, n_bins=15):
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        keep = (conf > lo) & (conf <= hi) if i > 0 else (conf >= lo) & (conf <= hi)
        if keep.any():
            total += keep.mean() * abs((pred[keep] == labels[keep]).mean() - conf[keep].mean())
    return total


def test_ece_matches_brute_force():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.7, size=500)
    labels = rng.integers(0, 4, 500)
    assert expected_calibration_error(probs, labels) == pytest.approx(_brute_ece(probs, labels), abs=1e-12)


def test_calibrated_model_has_small_ece_and_overconfident_large():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=20000)
    labels = np.array([rng.choice(3, p=p) for p in probs])  # labels drawn from the model: calibrated
    assert expected_calibration_error(probs, labels) < 0.02
    sharp = probs**4 / (probs**4).sum(1, keepdims=True)  # same argmax, over-confident
    assert expected_calibration_error(sharp, labels) > 0.1


def test_bin_edges_and_counts(tmp_path):
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.6, 0.4]])
    rel = reliability(probs, np.array([0, 1, 1]), n_bins=2)
    assert rel.count.tolist() == [1, 2]  # 0.5 in (0, 0.5]; 0.6 and 1.0 in (0.5, 1]
    assert rel.accuracy[1] == 0.5
    assert rel.to_dict()["count"] == [1, 2]
    out = plot_reliability({"entropy": rel}, tmp_path / "rel.png")
    assert out.exists() and out.stat().st_size > 0
    with pytest.raises(ValueError, match="n_bins"):
        reliability(probs, np.array([0, 1, 1]), n_bins=0)
