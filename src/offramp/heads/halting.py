"""PonderNet and PALBERT halting ("Lambda") layers and the exit-distribution math.

lambda_i = sigmoid(Lambda(x_i)) is the probability of halting at exit i given the model got there;
the exit distribution is p_i = lambda_i * prod_{j<i} (1 - lambda_j), computed in log space.
PonderNet's x_i is the current pooled state; PALBERT's "revisited" x_i is
[p_i + e_i || p_{i-1} + e_{i-1}] (or their difference, or an RNN state carried across exits),
with e_i an optional layer-position embedding. One Lambda layer is shared by all exits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _positions(kind: str, num_exits: int, hidden: int, seed: int = 0) -> Tensor:  # (E, d)
    if kind == "none":
        return torch.zeros(num_exits, hidden)
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(num_exits, hidden, generator=g) * 0.02
    pos = torch.arange(num_exits, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, hidden, 2, dtype=torch.float32) * (-math.log(10000.0) / hidden))
    pe = torch.zeros(num_exits, hidden)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : hidden // 2]
    return pe / 100.0


class HaltingLayer(nn.Module):
    """The Lambda layer: per exit, a halting logit from the pooled state (and its history).

    Args:
        hidden_size: width of the pooled states.
        num_exits: number of exits.
        type: "pondernet" (input: the current pooled state) or "palbert" (revisited input).
        variant: PALBERT input: "concat" (2H), "diff" (H) or "rnn" (a GRU cell across exits).
        num_layers: n in n x [Linear -> Tanh] -> Linear(., 1).
        position: layer-position embedding e_i: "none", "random" or "sinusoidal" (scaled 1/100).
        dropout: dropout on x_i.
        detach: detach x_i from the backbone (the halting loss then trains Lambda only).
    """

    def __init__(self, hidden_size: int, num_exits: int, *, type: str = "palbert", variant: str = "concat",
                 num_layers: int = 1, position: str = "sinusoidal", dropout: float = 0.1,
                 detach: bool = False, lr: float | None = None) -> None:
        super().__init__()
        self.kind, self.variant, self.detach = type, variant, detach
        self.register_buffer("pos", _positions(position if type == "palbert" else "none", num_exits, hidden_size))
        width = 2 * hidden_size if (type == "palbert" and variant == "concat") else hidden_size
        self.rnn = nn.GRUCell(hidden_size, hidden_size) if (type == "palbert" and variant == "rnn") else None
        self.dropout = nn.Dropout(dropout)
        blocks: list[nn.Module] = []
        for _ in range(num_layers):
            blocks += [nn.Linear(width, width), nn.Tanh()]
        self.mlp = nn.Sequential(*blocks, nn.Linear(width, 1))

    def start(self, pooled_like: Tensor) -> Tensor:  # (b, d) zeros: "previous state" before exit 0
        return torch.zeros_like(pooled_like)

    def step(self, index: int, pooled: Tensor, prev: Tensor) -> tuple[Tensor, Tensor]:
        """Halting logit (b,) at exit ``index`` and the state to carry to the next exit (b, d)."""
        p = pooled.detach() if self.detach else pooled
        cur = p + self.pos[index]
        if self.kind == "pondernet":
            x, carry = cur, cur
        elif self.variant == "concat":
            x, carry = torch.cat([cur, prev], dim=-1), cur
        elif self.variant == "diff":
            x, carry = cur - prev, cur
        else:
            x = carry = self.rnn(cur, prev)
        return self.mlp(self.dropout(x)).squeeze(-1), carry

    def forward(self, pooled: Tensor) -> Tensor:  # (E, b, d) -> halting logits (b, E)
        prev = self.start(pooled[0])
        logits = []
        for i in range(pooled.shape[0]):
            z, prev = self.step(i, pooled[i], prev)
            logits.append(z)
        return torch.stack(logits, dim=1)


def exit_log_distribution(halt_logits: Tensor, truncation: str = "force_last",
                          epsilon: float = 0.05) -> Tensor:  # (b, E) -> log p (b, E)
    """log p_i = log lambda_i + sum_{j<i} log(1 - lambda_j), from halting logits.

    ``force_last`` sets lambda_E = 1 so p sums to 1. ``epsilon`` (PALBERT's shipped code) keeps
    lambda_E as is, and once the CDF exceeds 1 - epsilon replaces every later p_i by epsilon / E.
    """
    log_halt = F.logsigmoid(halt_logits)
    log_cont = F.logsigmoid(-halt_logits)
    survive = torch.cumsum(log_cont, dim=1) - log_cont  # sum_{j<i}
    logp = log_halt + survive
    if truncation == "force_last":
        return torch.cat([logp[:, :-1], survive[:, -1:]], dim=1)
    if truncation != "epsilon":
        raise ValueError(f"truncation must be 'force_last' or 'epsilon', got {truncation!r}")
    cdf = torch.cumsum(logp.exp(), dim=1)
    passed = torch.cumsum((cdf > 1 - epsilon).to(torch.int64), dim=1)
    after = passed > 1  # strictly after the first exit whose CDF passed 1 - epsilon
    fill = torch.full_like(logp, math.log(epsilon / halt_logits.shape[1]))
    return torch.where(after, fill, logp)


def geometric_prior(num_exits: int, lambda_p: float) -> Tensor:  # (E,)
    """p_G(k) = lambda_p (1 - lambda_p)^(k-1) for k < E, the remainder on E."""
    k = torch.arange(num_exits - 1, dtype=torch.float64)
    head = lambda_p * (1 - lambda_p) ** k
    return torch.cat([head, (1 - head.sum()).reshape(1)]).to(torch.float32)


def ponder_kl(logp: Tensor, prior: Tensor, direction: str = "prior_to_model") -> Tensor:  # (b, E) -> (b,)
    """KL between the exit distribution and the geometric prior.

    ``prior_to_model`` is KL(p_G || p) (PALBERT's and labml's code); ``model_to_prior`` is
    KL(p || p_G) (the paper's text).
    """
    log_prior = prior.clamp_min(1e-12).log().to(logp.dtype)[None, :]
    if direction == "prior_to_model":
        return (prior.to(logp.dtype)[None, :] * (log_prior - logp)).sum(1)
    if direction == "model_to_prior":
        return (logp.exp() * (logp - log_prior)).sum(1)
    raise ValueError(f"kl_direction must be 'prior_to_model' or 'model_to_prior', got {direction!r}")
