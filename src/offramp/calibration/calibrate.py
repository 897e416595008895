"""Calibrate an exit rule on a trace, as ``offramp calibrate`` does: Learn-then-Test (a bound on
the risk the rule adds, with probability 1 - delta) or CATs (the max-prob threshold of a target
consistency), and optionally per-exit conformal prediction sets at level alpha."""

from __future__ import annotations

from offramp.calibration.conformal import PerExitConformal
from offramp.calibration.risk import CATsStopping, LearnThenTest, exit_losses
from offramp.evaluation.collect import replay
from offramp.names import RISKS, TOKEN_RISKS
from offramp.policies import make_policy


def calibrate(config, trace, *, policy: str | None = None, method: str = "ltt", risk: str = "disagree",
              delta: float = 0.05, epsilon: float = 0.05, pvalue: str = "hoeffding",
              grid: list[float] | None = None, alpha: float | None = None,
              tolerance: float = 0.0) -> tuple[dict | None, str, dict]:
    """Calibrate a rule on a trace: (policy dict or None, one-line bound, record for ``extra``)."""
    if method == "cats":
        if not hasattr(trace, "logits"):
            raise ValueError("the CATs rule needs per-exit class logits: it applies to classifiers; use --method ltt")
        rule = CATsStopping(epsilon).fit(trace.logits.numpy())
        chosen = rule.to_policy()
        text = (f"CATs: exit when max_prob > {rule.threshold_:.6g}: P(prediction == full model) >= "
                f"{1 - epsilon:g} (n={len(trace)})")
        record = {"method": "cats", "epsilon": epsilon, "threshold": rule.threshold_, "n": len(trace)}
    else:
        spec = policy or config.policy.get("type")
        base = dict(config.policy) if config.policy.get("type") == spec else {"type": spec}
        pol = make_policy(base)
        ltt = LearnThenTest(delta, epsilon, risk=risk, pvalue=pvalue, tolerance=tolerance).fit(pol, trace, grid)
        text = f"{pol.type}: {ltt.summary()}"
        if risk in TOKEN_RISKS:
            text += (" (token trace: exact for the generated text with greedy decoding and the catch_up cache)"
                     if risk == "sequence" and tolerance == 0 else
                     " (token trace, teacher-forced: calibrate without --trace to measure real generations)")
        chosen = ltt.policy_
        step = ltt.steps_[ltt.index_] if ltt.index_ >= 0 else None
        record = {"method": "ltt", "risk": risk, "delta": delta, "epsilon": epsilon, "pvalue": pvalue,
                  **({"tolerance": tolerance} if risk == "sequence" else {}),
                  "n": ltt.n_, "threshold": ltt.threshold_,
                  "empirical_risk": None if step is None else step.risk,
                  "mean_exit_layer": None if step is None else step.mean_exit_layer}
    if chosen is None:
        return None, text, record
    if record.get("mean_exit_layer") is not None:
        _say_what_was_certified(record, trace)
    record["policy"] = chosen.to_dict()
    record["bound"] = text
    if alpha is not None and getattr(trace, "labels", None) is not None:
        record["conformal"] = _conformal(chosen, trace, alpha)
    return chosen.to_dict(), text, record


def check_risk(policy, trace, *, risk: str, delta: float, epsilon: float) -> dict:
    """The realised risk of a certified classifier ``policy`` on another split's ``trace``, with its
    exact (Clopper-Pearson) binomial interval at level 1 - epsilon, and whether it is consistent
    with the bound "risk <= delta" (the interval reaches down to delta or below). A bound that the
    check contradicts says that the two splits differ in kind (the guarantee assumes they do not)."""
    from scipy.stats import binomtest  # scipy ships with scikit-learn, as the binomial p-value does

    if risk not in RISKS:
        raise ValueError(f"--check measures a classifier's 0/1 risk ({', '.join(RISKS)}), not {risk!r}")
    if risk == "wrong_when_full_right" and getattr(trace, "labels", None) is None:
        raise ValueError("the check split has no labels: wrong_when_full_right needs them; use --risk disagree")
    index, _ = replay(policy, trace)
    labels = None if trace.labels is None else trace.labels.numpy()
    losses = exit_losses(trace.logits.numpy(), labels, index.numpy().astype("int64"), risk)
    n, k = int(losses.size), int(round(float(losses.sum())))
    low, high = binomtest(k, n).proportion_ci(confidence_level=1 - epsilon, method="exact")
    layers = [trace.exit_layers[i] for i in index.tolist()]
    return {"n": n, "risk": k / n, "interval": [float(low), float(high)], "level": 1 - epsilon, "delta": delta,
            "consistent": bool(low <= delta), "mean_exit_layer": sum(layers) / n}


ASSUMPTION = ("the bound assumes the calibration rows and the rows the rule will see are alike "
              "(exchangeable): data of another kind (short phrases against full sentences, another "
              "domain) can break it; calibrate on data like what you will serve")


def _say_what_was_certified(record: dict, trace) -> None:
    """Add the certified rule's ideal speed-up to ``record``, and warn when it is a trivial rule:
    every row at the first exit (the bound then says only that the first exit is good enough on
    this data) or never exiting early (no speed-up)."""
    import warnings

    mean, first, last = float(record["mean_exit_layer"]), trace.exit_layers[0], trace.num_layers
    record["ideal_speedup"] = last / mean if mean > 0 else None
    if abs(mean - first) < 1e-9:
        warnings.warn(f"the certified rule is the trivial one: every row exits at the first exit (layer {first}). "
                      "Its bound holds because the first exit alone is within epsilon on this calibration data; "
                      "check that this data is like what you will serve, or lower --epsilon", stacklevel=3)
    elif abs(mean - last) < 1e-9:
        warnings.warn(f"the certified rule never exits before the last layer ({last}): it is safe and saves "
                      "nothing; raise --epsilon or --delta, or calibrate on more rows", stacklevel=3)


def _conformal(policy, trace, alpha: float) -> dict:
    index, _ = replay(policy, trace)
    probs = trace.logits.double().softmax(-1).numpy()
    cal = PerExitConformal(alpha).fit(probs, trace.labels.numpy(), index.numpy())
    return {"alpha": alpha, "quantiles": [float(q) for q in cal.quantiles_],
            "counts": cal.counts_.tolist(), "fallback": cal.fallback_.tolist()}
