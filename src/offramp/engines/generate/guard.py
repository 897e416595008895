"""Check, in seconds, that a decoding mode pays before a long run, and say when it does not.

Exits fitted on too little data, a rule that exits on garbage, or self-speculation whose drafts
are rarely accepted all decode, but worse than the plain model: wrong text, or slower. A probe
decodes the first prompts (each alone, unpadded) for a few tokens twice with the plain model and
twice with the mode, and keeps the faster run of each; for a lossy mode it also reads, in one
teacher-forced pass of the full model, how many of the mode's tokens the full model would emit
after the same prefix (the token agreement). ``ProbeReport.fallback`` is True when the mode
decodes slower than plain decoding (by more than ``margin``) or, lossy, agrees below
``min_agreement``; plain greedy decoding is then the fastest correct mode known, and the caller
decodes with it.

    probe = probe_decoding(exits.backbone, prompts, lambda ids: exits.generate(ids, policy=rule,
                           max_new_tokens=16), lossy=True)
    if probe.fallback:
        print(probe.summary())   # and decode plainly
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from offramp.devices import synchronize
from offramp.engines.generate.engine import generate
from offramp.engines.generate.sampling import SamplingOptions
from offramp.outputs import GenerateOutput


@dataclass
class ProbeReport:
    """What the probe measured: tokens/s of plain decoding and of the mode, their ratio, the mode's
    token agreement with the full model (lossy modes; None otherwise) and the verdict."""

    mode: str
    rows: int
    tokens: int
    plain_tokens_per_s: float
    mode_tokens_per_s: float
    speedup: float
    agreement: float | None
    min_agreement: float
    margin: float
    fallback: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        agree = "" if self.agreement is None else f", agreement with the full model {self.agreement:.2f}"
        head = (f"probe of {self.mode} on {self.rows} prompt(s), {self.tokens} tokens: {self.speedup:.2f}x plain "
                f"decoding ({self.mode_tokens_per_s:.1f} against {self.plain_tokens_per_s:.1f} tokens/s){agree}")
        return f"{head}; {self.reason}"


def _timed(fn: Callable[[], GenerateOutput], device: Any) -> tuple[GenerateOutput, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def _emitted(out: GenerateOutput) -> int:
    return int((out.exit_layers > 0).sum())


@torch.no_grad()
def token_agreement(backbone: nn.Module, out: GenerateOutput) -> tuple[int, int]:
    """(tokens the full model would also emit after the same prefix, tokens) of one unpadded row:
    one teacher-forced pass over the prompt and the emitted tokens."""
    n = _emitted(out)
    if n == 0:
        return 0, 0
    seq = out.sequences[:, : out.sequences.shape[1] - out.new_tokens.shape[1] + n]
    p = seq.shape[1] - n
    logits = backbone(input_ids=seq, use_cache=False).logits
    pred = logits[0, p - 1: p - 1 + n].argmax(-1).to(seq.device)
    return int((pred == seq[0, p:]).sum()), n


@torch.no_grad()
def probe_decoding(backbone: nn.Module, prompts: Sequence[Tensor], run: Callable[[Tensor, int], GenerateOutput], *,
                   mode: str, lossy: bool, tokens: int = 16, min_agreement: float = 0.75, margin: float = 0.05,
                   sampling: SamplingOptions | None = None) -> ProbeReport:
    """Probe ``run`` (``run(input_ids, max_new_tokens)`` -> ``GenerateOutput``, the mode to check)
    against plain greedy ``generate`` of ``backbone`` on ``prompts`` (1-D token ids, each decoded
    alone for ``tokens`` tokens)."""
    if not prompts:
        raise ValueError("the probe needs at least one prompt")
    if tokens < 2:
        raise ValueError(f"the probe decodes at least 2 tokens, got {tokens}")
    if not 0.0 <= min_agreement <= 1.0 or not 0.0 <= margin < 1.0:
        raise ValueError(f"min_agreement must be in [0, 1] and margin in [0, 1), got {min_agreement}, {margin}")
    sampling = sampling or SamplingOptions.from_model(backbone)
    greedy = SamplingOptions(eos_token_id=sampling.eos_token_id, pad_token_id=sampling.pad_token_id)
    device = next(backbone.parameters()).device
    plain_s, mode_s, plain_n, mode_n, agree, seen = 0.0, 0.0, 0, 0, 0, 0
    for prompt in prompts:
        ids = torch.as_tensor(prompt).reshape(1, -1).to(device)
        best_plain = best_mode = float("inf")
        out = ref = None
        for _ in range(2):  # the faster of two runs each: the first also warms up
            ref, s = _timed(lambda ids=ids: generate(backbone, ids, max_new_tokens=tokens, sampling=greedy), device)
            best_plain = min(best_plain, s)
            out, s = _timed(lambda ids=ids: run(ids, tokens), device)
            best_mode = min(best_mode, s)
        plain_s, mode_s = plain_s + best_plain, mode_s + best_mode
        plain_n, mode_n = plain_n + _emitted(ref), mode_n + _emitted(out)
        if lossy:
            a, n = token_agreement(backbone, out)
            agree, seen = agree + a, seen + n
    plain_tps, mode_tps = plain_n / max(plain_s, 1e-9), mode_n / max(mode_s, 1e-9)
    speedup = mode_tps / max(plain_tps, 1e-9)
    agreement = round(agree / seen, 4) if lossy and seen else None
    if agreement is not None and agreement < min_agreement:
        fallback, reason = True, (f"its tokens agree with the full model's on {agreement:.0%}, below "
                                  f"{min_agreement:.0%}: the exits do not agree with the last layer often enough "
                                  f"for this rule (calibrate one with `offramp calibrate`, or train the model to "
                                  f"exit with `offramp train-lm --model`)")
    elif speedup < 1 - margin:
        fallback, reason = True, ("slower than plain decoding: its drafts or exits cost more than they save on "
                                  "this model and machine")
    else:
        fallback, reason = False, "it pays"
    return ProbeReport(mode=mode, rows=len(prompts), tokens=tokens, plain_tokens_per_s=round(plain_tps, 2),
                       mode_tokens_per_s=round(mode_tps, 2), speedup=round(speedup, 3), agreement=agreement,
                       min_agreement=min_agreement, margin=margin, fallback=fallback, reason=reason)


def unpadded_rows(input_ids: Tensor, attention_mask: Tensor, count: int) -> list[Tensor]:
    """The first ``count`` rows of a left-padded batch, each without its padding."""
    return [input_ids[r][attention_mask[r].bool()] for r in range(min(count, len(input_ids)))]
