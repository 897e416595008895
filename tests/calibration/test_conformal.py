"""Split conformal: finite-sample coverage on synthetic exchangeable data (marginal, per exit)."""

import math

import numpy as np
import pytest

from offramp.calibration import (
    ClassConditionalConformal,
    MarginalConformal,
    PerExitConformal,
    conformal_quantile,
    mean_set_size,
    miscoverage,
)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _draw(rng, n, num_exits=3, c=5):
    """Exchangeable (exit probs, labels, exit index): exits get more accurate with depth; the early
    ones are over-confident, so coverage per exit is not automatic."""
    labels = rng.integers(0, c, n)
    signal = np.eye(c)[labels]  # (n, c)
    probs = []
    for e in range(num_exits):
        z = (2.0 + 0.5 * e) * signal + rng.normal(size=(n, c))
        probs.append(_softmax(z * (2.0 - 0.5 * e)))  # temperature < 1 early: over-confident
    probs = np.stack(probs)  # (E, n, c)
    conf = probs.max(-1)  # (E, n)
    passes = conf >= 0.9
    passes[-1] = True
    return probs, labels, passes.argmax(0)


def test_quantile_is_the_ceil_rank_and_never_clipped():
    scores = np.array([0.5, 0.1, 0.3, 0.2, 0.4])
    assert conformal_quantile(scores, 0.5) == 0.3  # k = ceil(6 * 0.5) = 3
    assert conformal_quantile(scores, 0.2) == 0.5  # k = ceil(4.8) = 5 = n
    assert math.isinf(conformal_quantile(scores, 0.1))  # k = 6 > n: +inf, not max(scores)


def test_marginal_coverage_holds_over_fresh_draws():
    """Mean coverage over repeated calibrations lies in [1 - a, 1 - a + 1/(n+1)] within 3 sd.

    n = 50 is small on purpose: the naive quantile (rank ceil(n(1 - a))) would cover only
    45/51 = 0.882 on average and fail the lower bound.
    """
    rng = np.random.default_rng(0)
    alpha, n, n_test, reps = 0.1, 50, 1000, 400
    cover, sizes = [], []
    for _ in range(reps):
        probs, labels, _ = _draw(rng, n + n_test)
        cal = MarginalConformal(alpha).fit(probs[1, :n], labels[:n])
        sets = cal.predict_sets(probs[1, n:])
        cover.append(1.0 - miscoverage(sets, labels[n:]))
        sizes.append(mean_set_size(sets))
    sd = math.sqrt((alpha * (1 - alpha) / (n + 2) + alpha * (1 - alpha) / n_test) / reps)
    assert np.mean(cover) >= 1 - alpha - 3 * sd
    assert np.mean(cover) <= 1 - alpha + 1 / (n + 1) + 3 * sd
    assert 1.0 < np.mean(sizes) < 5.0  # informative sets, not the trivial full set


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_per_exit_coverage_holds_for_each_exit(alpha):
    rng = np.random.default_rng(1)
    n, n_test, reps = 600, 3000, 120
    cover = {e: [] for e in range(3)}
    marginal_cover = []
    for _ in range(reps):
        probs, labels, exits = _draw(rng, n + n_test)
        cal = PerExitConformal(alpha).fit(probs[:, :n], labels[:n], exits[:n])
        taken = probs[exits, np.arange(n + n_test)]  # (n, c) probs at the exit taken
        sets = cal.predict_sets(taken[n:], exits[n:])
        marginal_cover.append(1.0 - miscoverage(sets, labels[n:]))
        for e in range(3):
            keep = exits[n:] == e
            if not cal.fallback_[e] and keep.sum() > 50:
                cover[e].append(1.0 - miscoverage(sets[keep], labels[n:][keep]))
    for e, values in cover.items():
        assert len(values) > reps // 2, f"exit {e} too rarely taken for the check"
        sd = math.sqrt(alpha * (1 - alpha) / 100 / len(values))  # >= 100 cal points per group here
        assert np.mean(values) >= 1 - alpha - 3 * sd, f"exit {e}: coverage {np.mean(values):.4f}"
    assert np.mean(marginal_cover) >= 1 - alpha - 0.01


def test_small_group_falls_back_to_all_scores_at_that_exit():
    rng = np.random.default_rng(2)
    probs, labels, _ = _draw(rng, 200)
    exits = np.zeros(200, dtype=int)
    exits[:15] = 1  # 15 <= 20 points exit at exit 1: fallback there
    exits[15:40] = 2  # 25 > 20: its own group
    cal = PerExitConformal(0.1).fit(probs, labels, exits)
    assert cal.fallback_.tolist() == [False, True, False]
    scores = 1.0 - probs[:, np.arange(200), labels]  # (E, n) brute force
    assert cal.quantiles_[1] == conformal_quantile(scores[1], 0.1)
    assert cal.quantiles_[2] == conformal_quantile(scores[2, 15:40], 0.1)
    assert cal.quantiles_[0] == conformal_quantile(scores[0, 40:], 0.1)
    # a calibration point at the quantile belongs to its own set
    sets = cal.predict_sets(probs[2], np.full(200, 2))
    assert sets[np.arange(200), labels][scores[2] <= cal.quantiles_[2]].all()


def test_class_conditional_matches_marginal_on_single_class():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    labels = np.array([0, 0, 0, 0])
    cc = ClassConditionalConformal(0.2).fit(probs, labels)
    mc = MarginalConformal(0.2).fit(probs, labels)
    assert cc.quantiles_[0] == mc.quantile_


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="alpha"):
        PerExitConformal(alpha=1.5)
    with pytest.raises(ValueError, match="not fitted"):
        PerExitConformal().predict_sets(np.ones((1, 2)) / 2, np.zeros(1))
    with pytest.raises(ValueError, match="exit_index"):
        PerExitConformal().fit(np.ones((2, 3, 2)) / 2, np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        MarginalConformal().fit(np.ones((3, 2)) / 2, np.array([0, 1, 2]))
