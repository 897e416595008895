"""The PonderNet / PALBERT loss: expected task loss under the exit distribution + beta * KL to a prior.

The KL term has two targets. ``"row"`` (PonderNet's and PALBERT's papers and code) pulls every row's
exit distribution to the geometric prior. ``"batch"`` pulls the batch's mean exit distribution to
it: the prior then sets the average depth while each row is free to differ. Deeper exits of an
encoder are at least as good as earlier ones on almost every row, so the task term only ever
pushes a row later; under ``"row"`` the prior is the only force toward early exits and it acts on
every row alike, so the halting probabilities settle on the prior's with little spread across
inputs (easy and hard rows exit alike). Under ``"batch"`` meeting the prior's average means some
rows must exit early, and the task term picks the rows that lose least by it: the easy ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from offramp.heads.halting import exit_log_distribution, geometric_prior, ponder_kl
from offramp.objectives.joint import per_exit_loss


def ponder_loss(exit_logits: Tensor, halting_logits: Tensor, labels: Tensor, *, beta: float = 0.5,
                lambda_p: float = 0.1, kl_direction: str = "prior_to_model", truncation: str = "force_last",
                epsilon: float = 0.05, kl_target: str = "batch", heads: float = 0.0) -> Tensor:
    """L = sum_i mean_b[p_i * L_i] + beta * KL (+ heads * mean_i mean_b L_i), p from the halting
    logits (b, E).

    KL is mean_b KL(p_b, prior) for ``kl_target="row"`` and KL(mean_b p_b, prior) for ``"batch"``.
    ``heads`` adds every exit's own loss, equally weighted: with a batch KL the halting sends most
    rows' weight to early exits, and without it the deeper heads (the last one included) learn
    from few rows.
    """
    per_exit = per_exit_loss(exit_logits, labels)  # (E, b)
    logp = exit_log_distribution(halting_logits.float(), truncation, epsilon)  # (b, E)
    task = (logp.exp().T * per_exit).sum(0).mean()
    if heads:
        task = task + heads * per_exit.mean()
    prior = geometric_prior(halting_logits.shape[1], lambda_p).to(logp.device)
    if kl_target == "batch":
        mean_logp = torch.logsumexp(logp, dim=0, keepdim=True) - math.log(logp.shape[0])  # (1, E)
        return task + beta * ponder_kl(mean_logp, prior, kl_direction).mean()
    if kl_target != "row":
        raise ValueError(f"kl_target must be 'row' or 'batch', got {kl_target!r}")
    return task + beta * ponder_kl(logp, prior, kl_direction).mean()
