"""Risk-controlled exit thresholds: Learn-then-Test (CALM) and the CATs shared conformal rule.

Learn-then-Test works for ANY policy with a threshold (``policy.threshold_field``): candidate
thresholds are ordered from the most conservative (latest exits) to the most aggressive, the
empirical risk of each is measured on a calibration trace by replaying the policy (the same
``decide`` that inference runs), and fixed-sequence testing walks the order while the p-value of
"risk > delta" stays below epsilon. The last threshold passed satisfies P(R <= delta) >= 1 - epsilon
for test points exchangeable with the calibration points.

Risks (per-point losses in {0, 1}):

- ``disagree``: the early prediction differs from the full (last-exit) prediction.
- ``wrong_when_full_right``: the early prediction is wrong AND the full prediction is right; its
  mean bounds the accuracy lost to early exit (acc_full - acc_early <= R).

On a token trace (generation) the points are the generated sequences (prompts are exchangeable;
tokens of one sequence are not), with losses in [0, 1] (Hoeffding or Hoeffding-Bentkus):

- ``token``: the share of a sequence's tokens whose exit disagrees with the full model;
- ``sequence`` (CALM's textual consistency): 1 if that share exceeds ``tolerance``. With
  ``tolerance=0`` and greedy decoding with the exact ``catch_up`` cache this is exactly "the text
  differs from the full model's"; with the approximate caches it is the teacher-forced share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from offramp.calibration.conformal import conformal_quantile
from offramp.evaluation.collect import replay
from offramp.evaluation.sweep import exit_space
from offramp.evaluation.token_trace import TokenTrace, replay_tokens, sequence_disagreement
from offramp.names import PVALUES, RISKS, TOKEN_RISKS
from offramp.policies import ExitSpace, make_policy
from offramp.policies.base import distribution_stat

CONFIDENCES = ("max_prob", "margin")


def hoeffding_pvalue(risk_hat: np.ndarray | float, n: int, delta: float) -> np.ndarray:
    """Hoeffding p-value of the null "R > delta": exp(-2 n max(0, delta - R_hat)^2)."""
    gap = np.maximum(0.0, delta - np.asarray(risk_hat, dtype=np.float64))
    return np.exp(-2.0 * n * gap**2)


def binomial_pvalue(risk_hat: np.ndarray | float, n: int, delta: float) -> np.ndarray:
    """Exact binomial p-value P(Binom(n, delta) <= n R_hat) of "R > delta" (valid for 0/1 losses).

    Tighter than Hoeffding when the risk is small; offered as an option, Hoeffding is the default.
    """
    from scipy.stats import binom  # scipy ships with scikit-learn

    k = np.round(np.asarray(risk_hat, dtype=np.float64) * n)
    return binom.cdf(k, n, delta)


def hoeffding_bentkus_pvalue(risk_hat: np.ndarray | float, n: int, delta: float) -> np.ndarray:
    """Hoeffding-Bentkus p-value of "R > delta" for losses in [0, 1] (Learn-then-Test's own choice):
    min(exp(-n kl(min(R_hat, delta), delta)), e P(Binom(n, delta) <= ceil(n R_hat))), with kl the
    Bernoulli relative entropy. Valid for shares as well as 0/1 losses, and much tighter than
    ``hoeffding_pvalue`` when delta is small (n = 150, delta = epsilon = 0.1: it passes an empirical
    risk up to 0.05, Hoeffding only up to 0.012)."""
    from scipy.stats import binom

    r = np.minimum(np.asarray(risk_hat, dtype=np.float64), delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(r > 0, r * np.log(r / delta), 0.0) + (1 - r) * np.log((1 - r) / (1 - delta))
    hoeffding = np.exp(-n * kl)
    bentkus = math.e * binom.cdf(np.ceil(np.asarray(risk_hat, dtype=np.float64) * n - 1e-9), n, delta)
    return np.minimum(1.0, np.minimum(hoeffding, bentkus))


PVALUE_FUNCTIONS = {"hoeffding": hoeffding_pvalue, "hoeffding_bentkus": hoeffding_bentkus_pvalue,
                    "binomial": binomial_pvalue}


def fixed_sequence_test(pvalues: np.ndarray, epsilon: float) -> int:
    """Index of the last hypothesis rejected by fixed-sequence testing at level epsilon (-1: none)."""
    pvalues = np.asarray(pvalues, dtype=np.float64)
    failed = np.flatnonzero(~(pvalues < epsilon))
    return int(failed[0]) - 1 if failed.size else int(pvalues.size) - 1


def exit_losses(exit_logits: np.ndarray, labels: np.ndarray | None, exit_index: np.ndarray,
                risk: str) -> np.ndarray:
    """(n,) 0/1 losses of the predictions taken at ``exit_index`` under ``risk``.

    Args:
        exit_logits: (E, n, c) logits of every exit (the last exit is the full model).
        labels: (n,) true labels; needed for ``wrong_when_full_right``.
        exit_index: (n,) 0-based exit each point took.
        risk: one of ``RISKS``.
    """
    if risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}: choose one of {', '.join(RISKS)}")
    exit_logits = np.asarray(exit_logits)
    if exit_logits.ndim != 3 or exit_logits.shape[2] < 2:
        raise ValueError("risk control needs classification logits of shape (exits, n, classes >= 2), "
                         f"got {exit_logits.shape}")
    rows = np.arange(exit_logits.shape[1])
    early = exit_logits[np.asarray(exit_index, dtype=np.int64), rows].argmax(-1)  # (n,)
    full = exit_logits[-1].argmax(-1)  # (n,)
    if risk == "disagree":
        return (early != full).astype(np.float64)
    if labels is None:
        raise ValueError("risk 'wrong_when_full_right' needs labels: collect the trace on labelled data")
    labels = np.asarray(labels)
    return ((early != labels) & (full == labels)).astype(np.float64)


def default_candidates(policy, num_exits: int, num_classes: int, *, num: int = 201) -> np.ndarray:
    """The policy's own data-independent calibration grid (``ExitPolicy.candidates``), most
    conservative first; fixed before seeing the calibration data, so fixed-sequence testing stays
    valid. ``num_exits`` exits, ``num_classes`` outputs (the vocabulary for token exits)."""
    return policy.candidates(ExitSpace(tuple(range(1, num_exits + 1)), num_classes, num_exits), num)


@dataclass(frozen=True)
class LTTStep:
    """One candidate of a Learn-then-Test walk."""

    threshold: float
    risk: float
    pvalue: float
    mean_exit_layer: float


class LearnThenTest:
    """Learn-then-Test threshold selection with fixed-sequence testing.

    Args:
        delta: risk level to control (e.g. 0.02 = at most 2% disagreement).
        epsilon: tolerated probability that the chosen threshold's true risk exceeds delta.
        risk: one of ``RISKS``.
        pvalue: ``hoeffding`` (METHODS.md), ``hoeffding_bentkus`` (tighter, for any loss in [0, 1])
            or ``binomial`` (exact, the tightest, for 0/1 losses only).

    After ``fit``: ``index_`` (position of the chosen candidate, -1 if none passes),
    ``threshold_`` (None if none passes), ``policy_`` (the calibrated policy or None), ``steps_``
    (every candidate's risk, p-value and mean exit layer), ``n_``.
    """

    def __init__(self, delta: float, epsilon: float = 0.05, *, risk: str = "disagree",
                 pvalue: str = "hoeffding", tolerance: float = 0.0) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        if risk not in RISKS + TOKEN_RISKS:
            raise ValueError(f"unknown risk {risk!r}: choose one of {', '.join(RISKS + TOKEN_RISKS)}")
        if pvalue not in PVALUES:
            raise ValueError(f"unknown pvalue {pvalue!r}: choose one of {', '.join(PVALUES)}")
        if risk == "token" and pvalue == "binomial":
            raise ValueError("the token risk is a share in [0, 1], not a 0/1 loss: the binomial p-value does not "
                             "apply; use pvalue hoeffding_bentkus (or hoeffding), or risk sequence")
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
        self.delta, self.epsilon, self.risk, self.pvalue = delta, epsilon, risk, pvalue
        self.tolerance = tolerance

    def fit_losses(self, losses: np.ndarray) -> "LearnThenTest":
        """Select from precomputed losses (m, n): row j = the n calibration losses of candidate j."""
        losses = np.asarray(losses, dtype=np.float64)
        if losses.ndim != 2 or losses.shape[1] == 0:
            raise ValueError(f"losses must be (candidates, n) with n >= 1, got shape {losses.shape}")
        self.n_ = losses.shape[1]
        self.risks_ = losses.mean(axis=1)
        self.pvalues_ = PVALUE_FUNCTIONS[self.pvalue](self.risks_, self.n_, self.delta)
        self.index_ = fixed_sequence_test(self.pvalues_, self.epsilon)
        return self

    def fit(self, policy, trace, candidates: np.ndarray | list[float] | None = None) -> "LearnThenTest":
        """Calibrate ``policy``'s threshold on an ExitTrace by replaying it at every candidate.

        Args:
            policy: an ExitPolicy with a ``threshold_field``.
            trace: an ``offramp.evaluation.collect.ExitTrace`` of held-out calibration data.
            candidates: thresholds ordered from the most conservative to the most aggressive;
                ``default_candidates`` when None.
        """
        if policy.threshold_field is None:
            raise ValueError(f"policy {policy.type!r} has no threshold to calibrate: pick a threshold "
                             "policy (max_prob, entropy, margin, patience, q_exit, gate, token_confidence)")
        tokens = isinstance(trace, TokenTrace)
        if tokens != (self.risk in TOKEN_RISKS):
            raise ValueError(f"risk {self.risk!r} is for {'classification' if self.risk in RISKS else 'token'} "
                             f"traces and this is a {'token' if tokens else 'classification'} trace: use risk "
                             f"{' or '.join(TOKEN_RISKS if tokens else RISKS)}")
        if candidates is None:
            candidates = policy.candidates(exit_space(trace))
        candidates = np.asarray(candidates, dtype=np.float64)
        if candidates.ndim != 1 or candidates.size == 0:
            raise ValueError("candidates must be a non-empty 1-D list of thresholds")
        layers = np.asarray(list(trace.exit_layers) + ([trace.num_layers] if tokens else []), dtype=np.float64)
        if not tokens:
            logits = _numpy(trace.logits)  # (E, n, c)
            labels = None if trace.labels is None else _numpy(trace.labels)
        losses, mean_layers, policies = [], [], []
        for value in candidates:
            value = int(value) if isinstance(getattr(policy, policy.threshold_field), int) else float(value)
            candidate = policy.with_threshold(value)
            if tokens:
                exit_index = self._token_losses(candidate, trace, losses)
            else:
                exit_index = _numpy(replay(candidate, trace)[0]).astype(np.int64)
                losses.append(exit_losses(logits, labels, exit_index, self.risk))
            mean_layers.append(float(layers[exit_index].mean()))
            policies.append(candidate)
        self.fit_losses(np.stack(losses))
        self.candidates_ = candidates
        self.steps_ = [LTTStep(float(c), float(r), float(p), m)
                       for c, r, p, m in zip(candidates, self.risks_, self.pvalues_, mean_layers)]
        self.policy_ = policies[self.index_] if self.index_ >= 0 else None
        self.threshold_ = float(candidates[self.index_]) if self.index_ >= 0 else None
        return self

    def _token_losses(self, policy, trace, losses: list) -> np.ndarray:
        """Append the per-sequence losses of ``policy`` on a token trace; return its exit indices."""
        exit_index = replay_tokens(policy, trace)
        share = sequence_disagreement(trace, exit_index)
        losses.append(share if self.risk == "token" else (share > self.tolerance).astype(np.float64))
        return exit_index.numpy()

    def fit_sequential(self, policy, losses_of, candidates: np.ndarray | list[float]) -> "LearnThenTest":
        """Learn-then-Test where each candidate's losses cost a pass (real generation): fixed-sequence
        testing walks ``candidates`` (most conservative first) and stops at the first one whose
        p-value fails, so later candidates are never computed; the result equals ``fit_losses`` on
        all of them (a failed test ends the walk either way).

        Args:
            policy: an ExitPolicy with a ``threshold_field``.
            losses_of: candidate policy -> ((n,) losses in [0, 1], mean exit layer).
            candidates: thresholds, most conservative first.
        """
        if policy.threshold_field is None:
            raise ValueError(f"policy {policy.type!r} has no threshold to calibrate")
        if self.pvalue == "binomial" and self.risk == "token":
            raise ValueError("the token risk is a share, not a 0/1 loss: use pvalue hoeffding_bentkus or hoeffding")
        pfun = PVALUE_FUNCTIONS[self.pvalue]
        candidates = np.asarray(candidates, dtype=np.float64)
        steps, policies, risks, pvalues = [], [], [], []
        for value in candidates:
            value = int(value) if isinstance(getattr(policy, policy.threshold_field), int) else float(value)
            candidate = policy.with_threshold(value)
            losses, mean_layer = losses_of(candidate)
            losses = np.asarray(losses, dtype=np.float64)
            self.n_ = losses.size
            risk = float(losses.mean())
            pv = float(pfun(risk, self.n_, self.delta))
            steps.append(LTTStep(float(value), risk, pv, float(mean_layer)))
            policies.append(candidate)
            risks.append(risk)
            pvalues.append(pv)
            if not pv < self.epsilon:
                break
        self.risks_, self.pvalues_ = np.asarray(risks), np.asarray(pvalues)
        self.index_ = fixed_sequence_test(self.pvalues_, self.epsilon)
        self.candidates_, self.steps_ = candidates[:len(steps)], steps
        self.policy_ = policies[self.index_] if self.index_ >= 0 else None
        self.threshold_ = float(self.candidates_[self.index_]) if self.index_ >= 0 else None
        return self

    def min_samples(self) -> int:
        """Calibration points Hoeffding needs to pass even a zero-risk candidate."""
        return math.ceil(math.log(1.0 / self.epsilon) / (2.0 * self.delta**2))

    def summary(self) -> str:
        """One line stating the guarantee (or why there is none)."""
        if not hasattr(self, "index_"):
            raise ValueError("LearnThenTest is not fitted: call fit(policy, trace) first")
        if self.index_ < 0 and self.risks_[0] >= self.delta:
            first = getattr(self, "candidates_", None)
            where = f" (threshold={first[0]:g})" if first is not None else ""
            return (f"no threshold passes: even the most conservative candidate{where} has empirical risk "
                    f"{self.risks_[0]:.4f} >= delta={self.delta} on n={self.n_}; this rule cannot reach that "
                    "risk here: use a larger delta or another rule")
        if self.index_ < 0:
            return (f"no threshold passes: with n={self.n_} calibration points the {self.pvalue} test "
                    f"cannot certify risk <= {self.delta} at epsilon={self.epsilon} (Hoeffding needs "
                    f">= {self.min_samples()} points at zero risk); use more data, a larger delta, "
                    "or a tighter test (--pvalue hoeffding_bentkus; binomial for 0/1 losses)")
        value = getattr(self, "threshold_", None)
        step = f"threshold={value:g}" if value is not None else f"candidate {self.index_}"
        what = f"{self.risk} risk" + (f" (tolerance {self.tolerance:g})" if self.risk == "sequence" else "")
        return (f"{step}: P({what} <= {self.delta}) >= {1 - self.epsilon:g} "
                f"(empirical risk {self.risks_[self.index_]:.4f} on n={self.n_}, "
                f"p={self.pvalues_[self.index_]:.3g})")


def confidence(exit_logits: np.ndarray, kind: str = "max_prob") -> np.ndarray:
    """(E, n) confidence of every exit: max softmax probability or top-2 margin."""
    import torch

    if kind not in CONFIDENCES:
        raise ValueError(f"unknown confidence {kind!r}: choose one of {', '.join(CONFIDENCES)}")
    z = torch.as_tensor(np.asarray(exit_logits, dtype=np.float64))
    return np.stack([distribution_stat(zi, kind).numpy() for zi in z])  # the policies' own formula


class CATsStopping:
    """The CATs shared conformal stopping rule for consistency with the full model.

    Per calibration point, M = the largest confidence over the exits whose prediction differs from
    the last exit's (-inf if none); Q = the ceil((n+1)(1-epsilon))-th smallest of the M's with +inf
    appended. A point exits at the first exit whose confidence is > Q (else the last exit), so
    P(prediction == full prediction) >= 1 - epsilon for exchangeable points.
    """

    def __init__(self, epsilon: float = 0.05, confidence: str = "max_prob") -> None:
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        if confidence not in CONFIDENCES:
            raise ValueError(f"unknown confidence {confidence!r}: choose one of {', '.join(CONFIDENCES)}")
        self.epsilon, self.confidence = epsilon, confidence

    def fit(self, exit_logits: np.ndarray) -> "CATsStopping":
        """exit_logits: (E, n, c) logits of every exit on the calibration points."""
        exit_logits = np.asarray(exit_logits)
        if exit_logits.ndim != 3 or exit_logits.shape[1] == 0:
            raise ValueError(f"exit_logits must be (exits, n >= 1, classes), got {exit_logits.shape}")
        conf = confidence(exit_logits, self.confidence)  # (E, n)
        inconsistent = exit_logits.argmax(-1) != exit_logits[-1].argmax(-1)[None, :]  # (E, n)
        maxima = np.where(inconsistent, conf, -np.inf).max(axis=0)  # (n,)
        self.threshold_ = conformal_quantile(maxima, self.epsilon)
        return self

    def exit_index(self, exit_logits: np.ndarray) -> np.ndarray:
        """(n,) 0-based exit of each point: the first with confidence > Q, else the last."""
        if not hasattr(self, "threshold_"):
            raise ValueError("CATsStopping is not fitted: call fit(exit_logits) first")
        conf = confidence(exit_logits, self.confidence)  # (E, n)
        passes = conf > self.threshold_
        passes[-1] = True
        return passes.argmax(axis=0)

    def to_policy(self):
        """The equivalent registered policy (``conf >= nextafter(Q)``), or the never-exit policy."""
        if not hasattr(self, "threshold_"):
            raise ValueError("CATsStopping is not fitted: call fit(exit_logits) first")
        if not math.isfinite(self.threshold_) or self.threshold_ >= 1.0:
            return make_policy("never")
        value = max(0.0, float(np.nextafter(self.threshold_, np.inf)))
        return make_policy(self.confidence, threshold=value)


def _numpy(x) -> np.ndarray:
    """A CPU numpy view of a tensor or array."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
