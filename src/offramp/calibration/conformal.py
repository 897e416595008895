"""Split conformal prediction: the finite-sample quantile and class-conditional prediction sets.

All calibrators follow scikit-learn: hyperparameters in ``__init__``, learned values (ending in
``_``) set by ``fit``, and an error if used before ``fit``.
"""

from __future__ import annotations

import math

import numpy as np


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal quantile: the k-th smallest score with k = ceil((n + 1)(1 - alpha)).

    Returns ``+inf`` when k > n (too few calibration points for the requested level). It is never
    clipped to the largest score: that would be anti-conservative.

    Args:
        scores: (n,) non-conformity scores of the calibration points.
        alpha: miscoverage level in (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = scores.size
    k = math.ceil((n + 1) * (1.0 - alpha))
    if k > n:
        return math.inf
    return float(scores[k - 1])


class ClassConditionalConformal:
    """Class-conditional (Mondrian over the true label) split conformal prediction sets.

    Calibration points of class c get the score ``1 - p_c``; ``q_c`` is the conformal quantile of
    those scores at level ``alpha``; the set of x is ``{c : 1 - p_c(x) <= q_c}``. For each class c,
    P(c in S(x) | y = c) >= 1 - alpha for points exchangeable with the calibration set.
    """

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha

    def fit(self, probs: np.ndarray, labels: np.ndarray) -> "ClassConditionalConformal":
        """probs: (n, c) predicted probabilities; labels: (n,) true classes."""
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels).astype(int)
        if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
            raise ValueError(f"probs must be (n, c) and labels (n,), got {probs.shape} and {labels.shape}")
        if labels.size == 0:
            raise ValueError("cannot calibrate on an empty set: pass at least one calibration point")
        if labels.min() < 0 or labels.max() >= probs.shape[1]:
            raise ValueError(f"labels must be in [0, {probs.shape[1]}), got range [{labels.min()}, {labels.max()}]")
        self.quantiles_ = np.array(
            [conformal_quantile(1.0 - probs[labels == c, c], self.alpha) for c in range(probs.shape[1])]
        )
        self.counts_ = np.bincount(labels, minlength=probs.shape[1])
        return self

    def predict_sets(self, probs: np.ndarray) -> np.ndarray:
        """(n, c) boolean membership matrix of the prediction sets."""
        if not hasattr(self, "quantiles_"):
            raise ValueError("ClassConditionalConformal is not fitted: call fit(probs, labels) first")
        probs = np.asarray(probs, dtype=np.float64)
        return (1.0 - probs) <= self.quantiles_[None, :]


def _check_probs_labels(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (n, c) probabilities and (n,) labels; return them as float64 / int64 arrays."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (n, c) and labels (n,), got {probs.shape} and {labels.shape}")
    if labels.size == 0:
        raise ValueError("cannot calibrate on an empty set: pass at least one calibration point")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be in [0, {probs.shape[1]}), got range [{labels.min()}, {labels.max()}]")
    return probs, labels


class MarginalConformal:
    """Marginal split conformal prediction sets with the score ``1 - p_y``.

    ``q`` is the conformal quantile of the calibration scores at level ``alpha``; the set of x is
    ``{c : 1 - p_c(x) <= q}``. P(y in S(x)) >= 1 - alpha for points exchangeable with calibration.
    """

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha

    def fit(self, probs: np.ndarray, labels: np.ndarray) -> "MarginalConformal":
        """probs: (n, c) predicted probabilities; labels: (n,) true classes."""
        probs, labels = _check_probs_labels(probs, labels)
        self.quantile_ = conformal_quantile(1.0 - probs[np.arange(labels.size), labels], self.alpha)
        return self

    def predict_sets(self, probs: np.ndarray) -> np.ndarray:
        """(n, c) boolean membership matrix of the prediction sets."""
        if not hasattr(self, "quantile_"):
            raise ValueError("MarginalConformal is not fitted: call fit(probs, labels) first")
        return (1.0 - np.asarray(probs, dtype=np.float64)) <= self.quantile_


class PerExitConformal:
    """Per-exit (Mondrian over the exit taken) split conformal sets, as in JEI-DNN.

    The score of a calibration point is ``1 - pi_y`` at the exit it took. For the points that exit
    at exit l, ``q_l`` is the conformal quantile of their scores; when n_l <= ``min_group`` (20 in
    JEI-DNN), ``q_l`` is instead the quantile of ALL calibration points' scores at exit l's
    classifier. The set of x that exits at l is ``{y : pi_y(x) >= 1 - q_l}``. For groups above
    ``min_group``: P(y in S(x) | x exits at l) >= 1 - alpha.

    Attributes (after ``fit``):
        quantiles_: (E,) q_l per exit.
        counts_: (E,) number of calibration points that exited at each exit.
        fallback_: (E,) bool, whether exit l used the all-points fallback.
    """

    def __init__(self, alpha: float = 0.1, min_group: int = 20) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if min_group < 0:
            raise ValueError(f"min_group must be >= 0, got {min_group}")
        self.alpha = alpha
        self.min_group = min_group

    def fit(self, exit_probs: np.ndarray, labels: np.ndarray, exit_index: np.ndarray) -> "PerExitConformal":
        """Calibrate from every exit's probabilities.

        Args:
            exit_probs: (E, n, c) probabilities of every exit for the n calibration points.
            labels: (n,) true classes.
            exit_index: (n,) 0-based exit each point took under the exit rule being calibrated.
        """
        exit_probs = np.asarray(exit_probs, dtype=np.float64)
        if exit_probs.ndim != 3:
            raise ValueError(f"exit_probs must be (exits, n, classes), got shape {exit_probs.shape}")
        num_exits = exit_probs.shape[0]
        _, labels = _check_probs_labels(exit_probs[0], labels)
        exit_index = np.asarray(exit_index).astype(np.int64)
        if exit_index.shape != labels.shape:
            raise ValueError(f"exit_index must be (n,) like labels, got {exit_index.shape}")
        if exit_index.min() < 0 or exit_index.max() >= num_exits:
            raise ValueError(f"exit_index must be in [0, {num_exits}), got range "
                             f"[{exit_index.min()}, {exit_index.max()}]")
        rows = np.arange(labels.size)
        scores = 1.0 - exit_probs[:, rows, labels]  # (E, n): score of every point at every exit
        self.counts_ = np.bincount(exit_index, minlength=num_exits)
        self.fallback_ = self.counts_ <= self.min_group
        self.quantiles_ = np.array([
            conformal_quantile(scores[e] if self.fallback_[e] else scores[e, exit_index == e], self.alpha)
            for e in range(num_exits)
        ])
        return self

    def predict_sets(self, probs: np.ndarray, exit_index: np.ndarray) -> np.ndarray:
        """(n, c) boolean sets for points with probabilities ``probs`` (n, c) at exits ``exit_index`` (n,)."""
        if not hasattr(self, "quantiles_"):
            raise ValueError("PerExitConformal is not fitted: call fit(exit_probs, labels, exit_index) first")
        probs = np.asarray(probs, dtype=np.float64)
        q = self.quantiles_[np.asarray(exit_index).astype(np.int64)]  # (n,)
        return (1.0 - probs) <= q[:, None]  # pi_y >= 1 - q_l, compared on the score scale


def miscoverage(sets: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of points whose true label is NOT in their prediction set (target: <= alpha)."""
    sets = np.asarray(sets, dtype=bool)
    labels = np.asarray(labels).astype(np.int64)
    if sets.ndim != 2 or sets.shape[0] != labels.shape[0]:
        raise ValueError(f"sets must be (n, c) and labels (n,), got {sets.shape} and {labels.shape}")
    if labels.size == 0:
        raise ValueError("miscoverage of an empty set of points is undefined: pass at least one point")
    return float(1.0 - sets[np.arange(labels.size), labels].mean())


def mean_set_size(sets: np.ndarray) -> float:
    """Average number of labels per prediction set."""
    sets = np.asarray(sets, dtype=bool)
    if sets.ndim != 2 or sets.shape[0] == 0:
        raise ValueError(f"sets must be a non-empty (n, c) boolean matrix, got shape {sets.shape}")
    return float(sets.sum(axis=1).mean())
