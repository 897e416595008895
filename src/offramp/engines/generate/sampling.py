"""Choosing the next token: greedy or sampling, temperature, top-p, repetition penalty, EOS.

The logits processors are HF's own (``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopPLogitsWarper``), so a setting means here what it means in ``model.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingOptions:
    """How the engine picks tokens.

    Args:
        do_sample: sample from the processed distribution instead of taking the argmax.
        temperature: > 0, divides the logits when sampling.
        top_p: in (0, 1], nucleus sampling mass.
        repetition_penalty: > 0; 1.0 is off (DYNAMAX generates with a penalty > 1).
        eos_token_id: one id or several; rows stop after emitting one. None: never stop early.
        pad_token_id: written after EOS (default: the first EOS id, or 0).
        seed: seeds the sampler (None: torch's global generator).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_model(cls, model: Any, **overrides: Any) -> "SamplingOptions":
        """Greedy defaults with the EOS and pad ids of ``model``'s generation config."""
        gc = getattr(model, "generation_config", None)
        eos = overrides.pop("eos_token_id", getattr(gc, "eos_token_id", None))
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        pad = overrides.pop("pad_token_id", getattr(gc, "pad_token_id", None))
        return cls(eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=pad, **overrides)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        return self.eos_ids[0] if self.eos_ids else 0

    def is_eos(self, tokens: Tensor) -> Tensor:  # (r,) -> (r,) bool
        if not self.eos_ids:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, torch.tensor(self.eos_ids, device=tokens.device))

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def next_tokens(logits: Tensor, input_ids: Tensor, opts: SamplingOptions,
                generator: torch.Generator | None = None) -> Tensor:
    """(r, V) logits and (r, t) tokens so far -> (r,) next tokens."""
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    input_ids = input_ids.to(scores.device)
    if opts.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(opts.repetition_penalty)(input_ids, scores)
    if not opts.do_sample:
        return scores.argmax(-1).to(input_ids.device)
    if opts.temperature != 1.0:
        scores = TemperatureLogitsWarper(opts.temperature)(input_ids, scores)
    if opts.top_p < 1.0:
        scores = TopPLogitsWarper(opts.top_p)(input_ids, scores)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(input_ids.device)


def sampling_probs(logits: Tensor, opts: SamplingOptions) -> Tensor:
    """(..., V) logits -> the distribution ``next_tokens`` samples from with ``opts`` (temperature,
    top-p; no repetition penalty), in float32."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    shape = logits.shape
    scores = logits.float().reshape(-1, shape[-1])
    dummy = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device)
    if opts.temperature != 1.0:
        scores = TemperatureLogitsWarper(opts.temperature)(dummy, scores)
    if opts.top_p < 1.0:
        scores = TopPLogitsWarper(opts.top_p)(dummy, scores)
    return scores.softmax(-1).reshape(shape)


def speculative_accept(drafts: Tensor, q: Tensor, p: Tensor, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Speculative sampling's acceptance rule (Leviathan et al. 2023; Chen et al. 2023).

    ``drafts`` (r, k) were drawn from ``q`` (r, k, V); ``p`` (r, k+1, V) is the target model's
    distribution at each draft position and after the last. Draft j is kept with probability
    min(1, p_j(x) / q_j(x)) while all before it were kept; at the first rejection the next token is
    drawn from the normalised max(0, p_j - q_j), after k acceptances from p_k. Every emitted token is
    then distributed exactly as the target model's sampling would draw it.

    Returns (tokens (r, k+1): the kept drafts then the drawn token, the rest unspecified;
    accepted (r,): the number of drafts kept).
    """
    r, k = drafts.shape
    dev = p.device
    if k:
        px = p[:, :k].gather(-1, drafts[..., None])[..., 0]
        qx = q.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(r, k, generator=generator, device=dev)
        keep = u * qx <= px  # u <= p/q without dividing (q(x) > 0: x was drawn from it)
        accepted = keep.long().cumprod(1).sum(1)
    else:
        accepted = torch.zeros(r, dtype=torch.long, device=dev)
    target = p.gather(1, accepted[:, None, None].expand(r, 1, p.shape[-1]))[:, 0]  # (r, V)
    if k:
        q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # after k acceptances: p_k itself
        qa = q_pad.gather(1, accepted[:, None, None].expand(r, 1, q.shape[-1]))[:, 0]
        residual = (target - qa).clamp_min(0)
        mass = residual.sum(-1, keepdim=True)
        target = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target)
    drawn = torch.multinomial(target, 1, generator=generator)[:, 0]
    tokens = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], dim=1) if k else drawn[:, None].clone()
    tokens.scatter_(1, accepted[:, None], drawn[:, None])
    return tokens, accepted
