"""Learn-then-Test and CATs: guarantees hold on synthetic exchangeable data with known risk."""

import math

import numpy as np
import pytest

from offramp.calibration import CATsStopping, LearnThenTest, exit_losses
from offramp.calibration.risk import binomial_pvalue, fixed_sequence_test, hoeffding_bentkus_pvalue, hoeffding_pvalue

TRUE_RISK = np.linspace(0.0, 0.4, 81)  # candidate j has true risk TRUE_RISK[j]; most conservative first


def _losses(rng, n):
    """Nested 0/1 losses with known risk: candidate j fails a point iff u < TRUE_RISK[j]."""
    u = rng.random(n)
    return (u[None, :] < TRUE_RISK[:, None]).astype(float)  # (m, n)


def test_pvalues_match_formulas():
    assert hoeffding_pvalue(0.01, 100, 0.1) == pytest.approx(math.exp(-2 * 100 * 0.09**2))
    assert hoeffding_pvalue(0.2, 100, 0.1) == 1.0
    assert binomial_pvalue(0.0, 30, 0.1) == pytest.approx(0.9**30)
    kl = 0.05 * math.log(0.5) + 0.95 * math.log(0.95 / 0.9)  # the Hoeffding (relative entropy) term wins here
    assert hoeffding_bentkus_pvalue(0.05, 150, 0.1) == pytest.approx(math.exp(-150 * kl))
    assert hoeffding_bentkus_pvalue(0.0, 30, 0.1) == pytest.approx(0.9**30)  # exp(-n kl(0, d)) = (1-d)^n
    assert hoeffding_bentkus_pvalue(0.2, 100, 0.1) == 1.0
    risks = np.linspace(0.0, 0.1, 11)
    assert (hoeffding_bentkus_pvalue(risks, 150, 0.1) <= hoeffding_pvalue(risks, 150, 0.1)).all()
    assert hoeffding_bentkus_pvalue(0.05, 150, 0.1) < 0.1 < hoeffding_pvalue(0.05, 150, 0.1)
    assert fixed_sequence_test(np.array([0.01, 0.02, 0.5, 0.01]), 0.05) == 1  # stops at the first failure
    assert fixed_sequence_test(np.array([0.5, 0.01]), 0.05) == -1
    assert fixed_sequence_test(np.array([0.01, 0.01]), 0.05) == 1


@pytest.mark.parametrize("pvalue", ["hoeffding", "hoeffding_bentkus", "binomial"])
def test_ltt_violation_frequency_is_at_most_epsilon(pvalue):
    rng = np.random.default_rng(0)
    delta, epsilon, n, reps = 0.1, 0.1, 300, 600
    chosen = []
    for _ in range(reps):
        ltt = LearnThenTest(delta, epsilon, pvalue=pvalue).fit_losses(_losses(rng, n))
        chosen.append(ltt.index_)
    chosen = np.array(chosen)
    true_risk = np.where(chosen >= 0, TRUE_RISK[np.maximum(chosen, 0)], 0.0)
    violation = float((true_risk > delta).mean())
    assert violation <= epsilon + 3 * math.sqrt(epsilon * (1 - epsilon) / reps)
    assert (chosen > 0).mean() > 0.9  # not vacuous: it does pick aggressive thresholds
    # the naive rule (last candidate with empirical risk <= delta) violates about half the time
    naive = [int(np.flatnonzero(_losses(rng, n).mean(1) <= delta)[-1]) for _ in range(200)]
    assert (TRUE_RISK[naive] > delta).mean() > 2 * epsilon


def test_no_candidate_passes_with_too_few_points():
    ltt = LearnThenTest(0.02, 0.05).fit_losses(np.zeros((5, 100)))
    assert ltt.index_ == -1
    assert "no threshold passes" in ltt.summary()
    assert ltt.min_samples() == math.ceil(math.log(20) / (2 * 0.02**2))
    assert LearnThenTest(0.02, 0.05, pvalue="binomial").fit_losses(np.zeros((5, 200))).index_ == 4
    risky = LearnThenTest(0.1, 0.05).fit_losses(np.full((3, 500), 1.0))
    assert risky.index_ == -1 and "most conservative candidate" in risky.summary()


def test_exit_losses_both_risks():
    logits = np.zeros((2, 3, 2))
    logits[0, :, 0] = 1.0  # exit 0 predicts class 0 for all
    logits[1, :, 1] = 1.0  # the full model predicts class 1 for all
    labels = np.array([1, 0, 1])
    taken = np.array([0, 0, 1])
    assert exit_losses(logits, labels, taken, "disagree").tolist() == [1, 1, 0]
    assert exit_losses(logits, labels, taken, "wrong_when_full_right").tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="unknown risk"):
        exit_losses(logits, labels, taken, "mse")
    with pytest.raises(ValueError, match="classification"):
        exit_losses(np.zeros((2, 3, 1)), labels, taken, "disagree")


def _cats_draw(rng, n, num_exits=4, c=3):
    """Exit logits that drift towards a final prediction; early exits often disagree with it."""
    final = rng.normal(size=(n, c)) * 2.0
    out = [final * (e + 1) / num_exits + rng.normal(size=(n, c)) * (num_exits - e) / num_exits * 1.5
           for e in range(num_exits)]
    out[-1] = final
    return np.stack(out)  # (E, n, c)


@pytest.mark.parametrize("epsilon", [0.05, 0.1])
def test_cats_consistency_holds_over_fresh_draws(epsilon):
    rng = np.random.default_rng(3)
    n, n_test, reps = 200, 1000, 200
    consistent, early = [], []
    for _ in range(reps):
        z = _cats_draw(rng, n + n_test)
        rule = CATsStopping(epsilon).fit(z[:, :n])
        taken = rule.exit_index(z[:, n:])
        pred = z[taken, n + np.arange(n_test)].argmax(-1)
        consistent.append((pred == z[-1, n:].argmax(-1)).mean())
        early.append((taken < z.shape[0] - 1).mean())
    sd = math.sqrt((epsilon * (1 - epsilon) / (n + 2) + epsilon * (1 - epsilon) / n_test) / reps)
    assert np.mean(consistent) >= 1 - epsilon - 3 * sd
    assert np.mean(early) > 0.2  # the rule does exit early
    # with no early-exit rule the rate of inconsistency of exit 0 alone is far above epsilon
    z = _cats_draw(rng, 5000)
    assert (z[0].argmax(-1) != z[-1].argmax(-1)).mean() > 2 * epsilon


def test_cats_threshold_is_infinite_with_too_few_points():
    z = _cats_draw(np.random.default_rng(0), 5)
    rule = CATsStopping(0.05).fit(z)
    assert math.isinf(rule.threshold_)
    assert (rule.exit_index(z) == z.shape[0] - 1).all()
    with pytest.raises(ValueError, match="not fitted"):
        CATsStopping().exit_index(z)
