"""Is a halting layer's decision input-dependent? lambda's spread across inputs and the exit
distribution against the geometric prior, with a warning when the halting is degenerate.

A degenerate halting layer gives (nearly) every input the same halting probabilities: q_exit then
leaves every row at the same layer (a static exit in disguise) and ponder_sample exits at random
whatever the input. Two readings tell it:
- ``lambda_spread``: the largest, over the exits before the last, standard deviation of lambda
  across inputs;
- ``row_kl_to_prior``: the mean over inputs of KL(p_row || p_G), how far each input's exit
  distribution is from the prior (0: every row is the prior).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from offramp.heads.halting import exit_log_distribution, geometric_prior, ponder_kl

SPREAD_MIN = 0.03  # lambda std across inputs below this at every exit: the same decision for all
ROW_KL_MIN = 0.02  # nats: every row's exit distribution this close to the prior
HALTING_FIX = ("train it with objective kl_target='batch' (the default), a smaller beta (--beta) or more epochs; "
               "see the README, 'Halting that learns'")


@dataclass(frozen=True)
class HaltingReport:
    """Summary of halting probabilities lambda (n, E) over n inputs."""

    n: int
    lambda_mean: list[float]
    lambda_std: list[float]
    lambda_spread: float
    exit_distribution: list[float]
    prior: list[float]
    row_kl_to_prior: float
    mean_kl_to_prior: float
    degenerate: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def degenerate_message(what: str, reason: str) -> str:
    """The warning for a degenerate halting layer, naming the fix."""
    return (f"{what}: the halting layer is degenerate: {reason}, so q_exit leaves (almost) every input at the "
            f"same layer and ponder_sample exits at random whatever the input; {HALTING_FIX}")


def halting_report(halting: Tensor, lambda_p: float = 0.1) -> HaltingReport:
    """Spread of lambda (n, E) across inputs and its exit distribution against the prior."""
    lam = torch.as_tensor(halting).double()
    if lam.ndim != 2 or lam.shape[0] == 0:
        raise ValueError(f"halting must be lambda of shape (n, E) with n > 0, got {tuple(lam.shape)}")
    n, e = lam.shape
    std = lam.std(0, unbiased=False) if n > 1 else torch.zeros(e, dtype=torch.float64)
    spread = float(std[:-1].max()) if e > 1 else 0.0
    logp = exit_log_distribution(torch.logit(lam, eps=1e-12), "force_last")  # the training's own formula
    p = logp.exp()
    prior = geometric_prior(e, lambda_p).double()
    row_kl = float(ponder_kl(logp, prior, "model_to_prior").mean())  # KL(p_row || p_G)
    mean_kl = float(ponder_kl(p.mean(0, keepdim=True).clamp_min(1e-12).log(), prior, "model_to_prior").mean())
    reasons = []
    if e > 1 and spread < SPREAD_MIN:
        reasons.append(f"lambda hardly varies across inputs (std at most {spread:.3f} over the exits before the "
                       f"last, under {SPREAD_MIN})")
    if row_kl < ROW_KL_MIN:
        reasons.append(f"every input's exit distribution is within KL {row_kl:.3f} of the geometric prior "
                       f"(lambda_p {lambda_p:g})")
    return HaltingReport(n=n, lambda_mean=[round(float(x), 4) for x in lam.mean(0)],
                         lambda_std=[round(float(x), 4) for x in std], lambda_spread=round(spread, 4),
                         exit_distribution=[round(float(x), 4) for x in p.mean(0)],
                         prior=[round(float(x), 4) for x in prior], row_kl_to_prior=round(row_kl, 4),
                         mean_kl_to_prior=round(mean_kl, 4), degenerate=bool(reasons and n >= 20),
                         reason="; ".join(reasons))


def warn_degenerate_halting(halting: Tensor | None, lambda_p: float, what: str) -> HaltingReport | None:
    """Warn (and return the report) when the halting probabilities of ``what`` are degenerate."""
    if halting is None:
        return None
    report = halting_report(halting, lambda_p)
    if report.degenerate:
        warnings.warn(degenerate_message(what, report.reason), stacklevel=2)
    return report
