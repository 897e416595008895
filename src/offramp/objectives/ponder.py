"""The PonderNet / PALBERT loss: expected task loss under the exit distribution + beta * KL to a prior."""

from __future__ import annotations

from torch import Tensor

from offramp.heads.halting import exit_log_distribution, geometric_prior, ponder_kl
from offramp.objectives.joint import per_exit_loss


def ponder_loss(exit_logits: Tensor, halting_logits: Tensor, labels: Tensor, *, beta: float = 0.5,
                lambda_p: float = 0.1, kl_direction: str = "prior_to_model", truncation: str = "force_last",
                epsilon: float = 0.05) -> Tensor:
    """L = sum_i mean_b[p_i * L_i] + beta * mean_b KL, p from the halting logits (b, E)."""
    logp = exit_log_distribution(halting_logits.float(), truncation, epsilon)  # (b, E)
    task = (logp.exp().T * per_exit_loss(exit_logits, labels)).sum(0).mean()
    prior = geometric_prior(halting_logits.shape[1], lambda_p).to(logp.device)
    return task + beta * ponder_kl(logp, prior, kl_direction).mean()
