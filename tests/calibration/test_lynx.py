"""The LYNX probe: class-balanced MLP, conformal quantiles, the exit rule and its guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from offramp.calibration.conformal import ClassConditionalConformal, conformal_quantile
from offramp.calibration.lynx import LynxProbe, balanced_weights, first_exit, probe_policy
from offramp.policies.base import ExitSignals
from offramp.policies.probe import ProbeExitPolicy


def _events(rng: np.random.Generator, n: int, d: int = 8, shift: float = 1.5, p1: float = 0.4):
    """Exchangeable synthetic events: y ~ Bernoulli(p1), x ~ N(shift * y * e_0 + ..., I)."""
    y = (rng.random(n) < p1).astype(int)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] += shift * (2 * y - 1)
    x[:, 1] += 0.5 * shift * y
    return x, y


@pytest.fixture(scope="module")
def fitted():
    x, y = _events(np.random.default_rng(0), 400)
    return LynxProbe(hidden=(64, 16), epochs=100, seed=0).fit(x, y)


def test_balanced_weights():
    y = np.array([0, 0, 0, 1])
    assert balanced_weights(y).tolist() == [4 / 6, 4 / 2]
    with pytest.raises(ValueError, match="both classes"):
        balanced_weights(np.zeros(5, dtype=int))


def test_probe_learns_separable_events(fitted):
    x, y = _events(np.random.default_rng(1), 400)
    p = fitted.predict_proba(x)
    assert p.shape == (400, 2) and np.allclose(p.sum(1), 1)
    assert ((p[:, 1] > 0.5) == y).mean() > 0.85
    assert fitted.std_.min() > 0 and fitted.class_weights_.tolist() == balanced_weights(
        np.asarray(_events(np.random.default_rng(0), 400)[1])).tolist()


def test_quantile_matches_hand_computation(fitted):
    x, y = _events(np.random.default_rng(2), 60)
    probs = fitted.predict_proba(x)
    delta = 0.2
    probe = fitted.calibrate(x, y, delta=delta)
    for c in (0, 1):
        s = np.sort(1.0 - probs[y == c, c])
        n = s.size
        k = math.ceil((n + 1) * (1 - delta))
        want = s[k - 1] if k <= n else math.inf
        assert probe.conformal_.quantiles_[c] == pytest.approx(want)
    # the library quantile on a tiny hand example: n = 4, delta = 0.25 -> k = ceil(3.75) = 4
    assert conformal_quantile(np.array([0.4, 0.1, 0.3, 0.2]), 0.25) == pytest.approx(0.4)
    assert conformal_quantile(np.array([0.4, 0.1, 0.3, 0.2]), 0.1) == math.inf  # k = 5 > n


def test_too_few_calibration_points_never_exit(fitted):
    x, y = _events(np.random.default_rng(3), 200)
    keep = np.flatnonzero(y == 1).tolist() + np.flatnonzero(y == 0)[:3].tolist()  # 3 wrong events
    probe = fitted.calibrate(x[keep], y[keep], delta=0.1)  # k_0 = ceil(4 * 0.9) = 4 > 3
    assert probe.conformal_.quantiles_[0] == math.inf  # not clipped to the largest score
    assert not probe.accepts(x).any()  # class 0 is in every set: no exit


def test_exit_rule_is_set_exactly_one(fitted):
    x, y = _events(np.random.default_rng(4), 300)
    probe = fitted.calibrate(x[:150], y[:150], delta=0.2)
    sets = probe.prediction_sets(x[150:])
    acc = probe.accepts(x[150:])
    assert np.array_equal(acc, sets[:, 1] & ~sets[:, 0])
    assert acc.any() and not acc.all()
    assert first_exit(np.array([False, False, True, True])) == 2
    assert first_exit(np.zeros(3, dtype=bool)) is None


def test_errors(fitted):
    with pytest.raises(ValueError, match="not calibrated"):
        fitted.accepts(np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match="not fitted"):
        LynxProbe().predict_proba(np.zeros((1, 8)))
    with pytest.raises(ValueError, match="columns"):
        fitted.predict_proba(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="labels must be 0"):
        LynxProbe().fit(np.zeros((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="alpha"):
        fitted.calibrate(np.zeros((2, 8), np.float32), np.array([0, 1]), delta=1.5)


def test_save_load_round_trip(fitted, tmp_path):
    x, y = _events(np.random.default_rng(5), 100)
    probe = fitted.calibrate(x, y, delta=0.3)
    probe.save(tmp_path / "probe", extra={"reason_config": {"feature_layers": [1, -1]}})
    again = LynxProbe.load(tmp_path / "probe")
    assert np.allclose(again.predict_proba(x), probe.predict_proba(x))
    assert np.array_equal(again.accepts(x), probe.accepts(x))
    assert again.extra_["reason_config"]["feature_layers"] == [1, -1]
    with pytest.raises(ValueError, match="no LYNX probe"):
        LynxProbe.load(tmp_path / "nothing")


def test_policy_decide_equals_probe(fitted, tmp_path):
    x, y = _events(np.random.default_rng(6), 100)
    probe = fitted.calibrate(x, y, delta=0.3)
    policy = ProbeExitPolicy(probe=probe)
    out, _ = policy.decide(0, ExitSignals(logits=torch.zeros(100, 2), hidden=torch.from_numpy(x)),
                           policy.start(100, 1))
    assert out.dtype == torch.bool and np.array_equal(out.numpy(), probe.accepts(x))
    probe.save(tmp_path / "p")
    assert probe_policy(tmp_path / "p").to_dict() == {"type": "probe", "path": str(tmp_path / "p")}
    with pytest.raises(ValueError, match="calibrated probe"):
        ProbeExitPolicy()
    with pytest.raises(ValueError, match="not calibrated"):
        ProbeExitPolicy(probe=fitted)


@pytest.mark.parametrize("delta", [0.1, 0.3])
def test_premature_exit_rate_stays_below_delta(fitted, delta):
    """Over many seeded calibration draws, P(exit | forced answer wrong) <= delta (binomial slack)."""
    repeats, n_cal, n_test = 300, 80, 200
    rng = np.random.default_rng(1000)
    x, y = _events(rng, repeats * (n_cal + n_test))
    probs = fitted.predict_proba(x).reshape(repeats, n_cal + n_test, 2)
    y = y.reshape(repeats, n_cal + n_test)
    x0 = x.reshape(repeats, n_cal + n_test, -1)[0]
    # the vectorised replay below is the probe's own rule: check it on the first draw
    probe = fitted.calibrate(x0[:n_cal], y[0, :n_cal], delta=delta)
    rates, misses, n_wrong, exits_right, n0_min = [], [], 0, 0, n_cal
    for r in range(repeats):
        conf = ClassConditionalConformal(alpha=delta).fit(probs[r, :n_cal], y[r, :n_cal])
        sets = conf.predict_sets(probs[r, n_cal:])
        acc = sets[:, 1] & ~sets[:, 0]
        if r == 0:
            assert np.array_equal(acc, probe.accepts(x0[n_cal:]))
        yt = y[r, n_cal:]
        rates.append(acc[yt == 0].mean())
        misses.append((~sets[yt == 0, 0]).mean())  # class 0 left out of the set
        n0_min = min(n0_min, int((y[r, :n_cal] == 0).sum()))
        n_wrong += int((yt == 0).sum())
        exits_right += int(acc[yt == 1].sum())
    rate = float(np.mean(rates))
    slack = 3 * math.sqrt(delta * (1 - delta) / n_wrong) + 3 * float(np.std(rates)) / math.sqrt(repeats)
    assert rate <= delta + slack
    # class-conditional coverage is also tight from below: miscoverage >= delta - 1 / (n_0 + 1)
    assert float(np.mean(misses)) >= delta - 1 / (n0_min + 1) - 3 * float(np.std(misses)) / math.sqrt(repeats)
    assert rate <= float(np.mean(misses)) + 1e-12
    assert exits_right > 0


def _chains(rng: np.random.Generator, n_chains: int, length: int = 12, wrong: float = 0.0):
    """Exchangeable synthetic chains: the forced answer turns right at a random event and stays right
    (never, in a further share ``wrong`` of the chains: a model that gets that many problems wrong)."""
    xs, ys, gs = [], [], []
    for c in range(n_chains):
        turn = int(rng.integers(2, length + 4))  # >= length: never right in this chain
        if rng.random() < wrong:
            turn = length
        y = (np.arange(length) >= turn).astype(int)
        x, _ = _events(rng, length)
        x[:, 0] = rng.normal(size=length) + 1.5 * (2 * y - 1)
        xs.append(x)
        ys.append(y)
        gs.append(np.full(length, c))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)


def test_chain_threshold_is_the_conformal_quantile_of_each_chains_worst_wrong_event(fitted):
    x, y, g = _chains(np.random.default_rng(7), 30)
    probe = fitted.calibrate(x, y, delta=0.2, per="chain", groups=g)
    p1 = fitted.predict_proba(x)[:, 1]
    worst = sorted(max([p for p, yy, gg in zip(p1, y, g) if gg == c and yy == 0], default=-math.inf)
                   for c in range(30))
    k = math.ceil(31 * 0.8)  # 25th smallest of 30
    assert probe.chain_threshold_ == worst[k - 1] and probe.chain_count_ == 30
    assert np.array_equal(probe.accepts(x), p1 > worst[k - 1])
    few = fitted.calibrate(x[g < 3], y[g < 3], delta=0.2, per="chain", groups=g[g < 3])
    assert few.chain_threshold_ == math.inf and not few.accepts(x).any()  # k = 4 > 3 chains: never exit
    with pytest.raises(ValueError, match="needs groups"):
        fitted.calibrate(x, y, delta=0.2, per="chain")
    with pytest.raises(ValueError, match="'event' or 'chain'"):
        fitted.calibrate(x, y, delta=0.2, per="trace")


def test_chain_probe_save_load_keeps_the_rule(fitted, tmp_path):
    x, y, g = _chains(np.random.default_rng(8), 40)
    for n in (40, 3):  # a finite threshold, and +inf (too few chains)
        probe = fitted.calibrate(x[g < n], y[g < n], delta=0.3, per="chain", groups=g[g < n])
        probe.save(tmp_path / f"p{n}")
        again = LynxProbe.load(tmp_path / f"p{n}")
        assert again.per_ == "chain" and again.chain_threshold_ == probe.chain_threshold_
        assert np.array_equal(again.accepts(x), probe.accepts(x))


@pytest.mark.parametrize("delta", [0.1, 0.3])
def test_per_chain_premature_exit_rate_stays_below_delta(fitted, delta):
    """Per chain: P(first accepted event has a wrong forced answer) <= delta over seeded draws, and
    the rule still exits right on many chains (it is not trivially conservative)."""
    repeats, n_cal, n_test = 200, 40, 40
    rng = np.random.default_rng(2000)
    chain_rates, right_exits = [], []
    for _ in range(repeats):
        x, y, g = _chains(rng, n_cal + n_test)
        cal, test = g < n_cal, g >= n_cal
        probe = fitted.calibrate(x[cal], y[cal], delta=delta, per="chain", groups=g[cal])
        acc, bad, good = probe.accepts(x[test]), 0, 0
        for c in range(n_cal, n_cal + n_test):
            sel = g[test] == c
            i = first_exit(acc[sel])
            bad += int(i is not None and y[test][sel][i] == 0)
            good += int(i is not None and y[test][sel][i] == 1)
        chain_rates.append(bad / n_test)
        right_exits.append(good / n_test)
    rate = float(np.mean(chain_rates))
    assert rate <= delta + 3 * float(np.std(chain_rates)) / math.sqrt(repeats)
    assert float(np.mean(right_exits)) > 0.2


def _ends_right(y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(n,) whether each event's chain ends on a right forced answer (its full answer, here)."""
    last = {c: y[g == c][-1] for c in np.unique(g)}
    return np.array([bool(last[c]) for c in g])


def test_lost_risk_counts_only_chains_whose_full_answer_is_right(fitted, tmp_path):
    x, y, g = _chains(np.random.default_rng(9), 30)
    right = _ends_right(y, g)
    assert right.any() and (~right).any()
    probe = fitted.calibrate(x, y, delta=0.2, per="chain", groups=g, risk="lost", chain_right=right)
    p1 = fitted.predict_proba(x)[:, 1]
    worst = sorted(max([p for p, yy, gg, r in zip(p1, y, g, right) if gg == c and yy == 0 and r],
                       default=-math.inf) for c in range(30))
    assert probe.chain_threshold_ == worst[math.ceil(31 * 0.8) - 1]
    premature = fitted.calibrate(x, y, delta=0.2, per="chain", groups=g)
    assert probe.chain_threshold_ <= premature.chain_threshold_
    probe.save(tmp_path / "lost")
    again = LynxProbe.load(tmp_path / "lost")
    assert again.risk_ == "lost" and again.chain_threshold_ == probe.chain_threshold_
    with pytest.raises(ValueError, match="needs chain_right"):
        fitted.calibrate(x, y, delta=0.2, per="chain", groups=g, risk="lost")
    with pytest.raises(ValueError, match="per-chain risk"):
        fitted.calibrate(x, y, delta=0.2, risk="lost", chain_right=right)
    with pytest.raises(ValueError, match="risk must be one of"):
        fitted.calibrate(x, y, delta=0.2, per="chain", groups=g, risk="wrong")


def test_per_chain_lost_rate_stays_below_delta_and_stops_more_chains(fitted):
    """Per chain with risk 'lost': P(stop at a wrong answer where the full chain is right) <= delta
    over seeded draws, and it stops more chains than the premature rule at the same delta."""
    repeats, n_cal, n_test, delta = 200, 40, 40, 0.1
    rng = np.random.default_rng(3000)
    lost, exits_lost, exits_premature = [], [], []
    for _ in range(repeats):
        x, y, g = _chains(rng, n_cal + n_test, wrong=0.4)
        right = _ends_right(y, g)
        cal, test = g < n_cal, g >= n_cal
        rule = fitted.calibrate(x[cal], y[cal], delta=delta, per="chain", groups=g[cal], risk="lost",
                                chain_right=right[cal])
        strict = fitted.calibrate(x[cal], y[cal], delta=delta, per="chain", groups=g[cal])
        acc, acc_strict, bad, n_exit, n_strict = rule.accepts(x[test]), strict.accepts(x[test]), 0, 0, 0
        for c in range(n_cal, n_cal + n_test):
            sel = g[test] == c
            i = first_exit(acc[sel])
            n_exit += i is not None
            n_strict += first_exit(acc_strict[sel]) is not None
            bad += int(i is not None and y[test][sel][i] == 0 and right[test][sel][0])
        lost.append(bad / n_test)
        exits_lost.append(n_exit / n_test)
        exits_premature.append(n_strict / n_test)
    assert float(np.mean(lost)) <= delta + 3 * float(np.std(lost)) / math.sqrt(repeats)
    assert float(np.mean(exits_lost)) > float(np.mean(exits_premature)) + 0.15
