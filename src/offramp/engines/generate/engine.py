"""Token-level early-exit decoding for decoder transformers and Mamba (DYNAMAX, CALM).

At each decoding step every running row starts at layer 0 with its new token. At each exit layer
a small confidence classifier decides per row; rows that exit leave the running batch (their
logits come from their exit head: one full-vocabulary LM head per token, at the exit taken), and
the layers they skip are never run for them. What those layers store for later tokens is the
cache strategy:

- ``copy_kv`` (DYNAMAX): skipped layers get the key/value of the last computed layer;
- ``propagate`` (CALM): skipped layers get keys/values projected from the exit hidden state;
- ``catch_up`` (FREE/DEED, exact): nothing is written; when a later token of that row goes
  deeper, the skipped layers run for the pending tokens together with it, from their exit hidden
  states, so deep tokens see exactly the cache of the full model;
- ``freeze`` (Mamba): skipped layers keep their conv/SSM states;
- ``update`` (Mamba): skipped layers run their state update on the exit hidden state;
- ``catch_up`` (Mamba, exact): as for transformers, the skipped layers run for the pending tokens
  together with the next token that goes deep, one multi-token pass that continues their states.

Stateful (Mamba-block) exit heads deeper than a token's exit follow the same rule: with
``copy_kv`` / ``freeze`` they keep their state, with ``propagate`` / ``catch_up`` / ``update``
they run their state update on the exit hidden state.

The exit decision is any registered ``ExitPolicy`` (``offramp.policies``): its state starts once
per decoding step and follows the rows across that token's exits, as in the classify engine.

With no exit model (or ``threshold=None``, or the ``never`` policy) no row ever exits and greedy decoding reproduces HF
``generate(do_sample=False)`` token for token, ragged left-padded batches included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from offramp.backbones import adapter_for
from offramp.engines.generate.run import DecodeRun, check_inputs
from offramp.engines.generate.sampling import SamplingOptions, next_tokens
from offramp.outputs import GenerateOutput, GenerateReport
from offramp.policies import ExitPolicy, make_policy, require_signals
from offramp.policies.token_confidence import TokenConfidencePolicy

# what token exits give a policy: the exit's LM distribution, its confidence, its features (hidden)
SIGNALS = ("logits", "confidence", "hidden")

@dataclass(frozen=True)
class TokenStep:
    """The tokens one decoding step gave: ``rows`` (r,) got ``tokens`` (r,), each computed by
    ``exit_layers`` (r,) layers; ``index`` is the position among the new tokens (0 = first);
    ``finished`` (r,) is True where the token ended its row (EOS, or the last of max_new_tokens)."""

    index: int
    rows: Tensor
    tokens: Tensor
    exit_layers: Tensor
    finished: Tensor


class _Decoding:
    """One call of ``generate`` / ``stream_generate``: iterating it decodes, one ``TokenStep`` per
    new-token position; ``output()`` then gives the whole ``GenerateOutput``."""

    def __init__(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, *,
                 threshold: float | None, policy: str | dict | ExitPolicy | None, cache_strategy: str | None,
                 max_new_tokens: int, sampling: SamplingOptions | None, tokenizer: Any, output_logits: bool,
                 return_cache: bool, record_signals: bool) -> None:
        exit_model = model if hasattr(model, "exit_layers") else None
        backbone = exit_model.backbone if exit_model is not None else model
        adapter = exit_model.adapter if exit_model is not None else adapter_for(backbone, role="decoder")
        sampling = sampling or SamplingOptions.from_model(backbone)
        if policy is None and threshold is not None:
            policy = TokenConfidencePolicy(threshold=threshold)
        if policy is not None:
            policy = make_policy(policy)
            if exit_model is None and policy.type != "never":
                raise ValueError("exits need a DecoderExitModel (backbone + trained exit heads), not a plain backbone")
            if exit_model is not None:
                require_signals(policy, set(SIGNALS), "token-exit generation",
                                "use one of max_prob, entropy, margin, patience, saturation, static, token_confidence")
                policy.check_exits(exit_model.exit_layers)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        strategy = cache_strategy or ("copy_kv" if adapter.kind == "attention" else "freeze")
        check_inputs(adapter, input_ids, attention_mask, max_new_tokens, strategy)
        self.adapter, self.exit_model, self.policy, self.strategy = adapter, exit_model, policy, strategy
        self.sampling, self.tokenizer, self.max_new = sampling, tokenizer, max_new_tokens
        self.output_logits, self.return_cache, self.record = output_logits, return_cache, record_signals
        dev = adapter.layer_device(0)
        self.ids, self.attn = input_ids.to(dev), attention_mask.to(dev)
        b, p = self.ids.shape
        self.seq = torch.cat([self.ids, torch.full((b, max_new_tokens), sampling.pad_id, dtype=self.ids.dtype,
                                                   device=dev)], 1)
        self.exits = torch.zeros(b, max_new_tokens, dtype=torch.long, device=dev)
        self.kept: list[Tensor] = []
        self.n, self.wall, self.run = 0, 0.0, None

    def __iter__(self):
        start = time.perf_counter()
        ids, seq, sampling = self.ids, self.seq, self.sampling
        self.run = run = DecodeRun(self.adapter, self.exit_model, self.policy, self.strategy, ids, self.attn,
                              self.max_new, record=self.record)
        b, p = ids.shape
        dev = ids.device
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        gen = sampling.generator(dev)
        logits = run.prefill(ids, self.attn)
        alive, exit_at = torch.arange(b, device=dev), torch.full((b,), run.num_layers, device=dev)
        for i in range(self.max_new):
            col = p + i
            tok = next_tokens(logits, seq.index_select(0, alive)[:, :col], sampling, gen)
            seq[alive, col], self.exits[alive, i], self.n = tok, exit_at, i + 1
            if self.output_logits:
                full_logits = torch.zeros(b, logits.shape[-1], dtype=logits.dtype, device=logits.device)
                full_logits[alive] = logits
                self.kept.append(full_logits)
            eos = sampling.is_eos(tok)
            done[alive] = eos
            last = i == self.max_new - 1
            self.wall += time.perf_counter() - start
            yield TokenStep(i, alive, tok, exit_at, eos | last)
            start = time.perf_counter()
            if last:
                break
            alive = (~done).nonzero()[:, 0]  # the step's one host synchronisation: which rows go on
            if alive.numel() == 0:
                break
            logits, exit_at = run.step(seq[alive, col], alive, col)
        self.wall += time.perf_counter() - start

    def output(self) -> GenerateOutput:
        run, p, n = self.run, self.ids.shape[1], self.n
        new = self.seq[:, p:p + n]
        counted = self.exits[:, :n][self.exits[:, :n] > 0]
        report = GenerateReport(new_tokens=int(counted.numel()), layer_rows=run.layer_rows,
                                fill_layer_rows=run.fill_rows, num_layers=run.num_layers, wall_s=self.wall,
                                extra_head_rows=run.head_rows,
                                mean_exit_layer=float(counted.float().mean()) if counted.numel() else 0.0)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True) if self.tokenizer is not None else None
        extra: dict[str, Any] = {}
        if self.return_cache:
            extra.update(cache=run.kv if self.adapter.kind == "attention" else run.ssm, head_states=run.head_states)
        if run.records is not None:
            extra["signals"] = {"records": run.records, "exit_layers": list(self.exit_model.exit_layers),
                                "num_layers": run.num_layers, "vocab_size": self.adapter.vocab_size}
        return GenerateOutput(sequences=self.seq[:, :p + n], new_tokens=new, exit_layers=self.exits[:, :n],
                              report=report, texts=texts, step_logits=torch.stack(self.kept, 1) if self.kept else None,
                              extra=extra)


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             threshold: float | None = None, policy: str | dict | ExitPolicy | None = None,
             cache_strategy: str | None = None, max_new_tokens: int = 32,
             sampling: SamplingOptions | None = None, tokenizer: Any = None,
             output_logits: bool = False, return_cache: bool = False,
             record_signals: bool = False) -> GenerateOutput:
    """Generate with token-level early exits.

    Args:
        model: a ``DecoderExitModel`` (backbone + exit heads) or a plain HF causal LM (never exits).
        input_ids: (b, t) left-padded prompts; attention_mask (b, t), 1 on real tokens.
        threshold: shorthand for ``policy=TokenConfidencePolicy(threshold)``; None (and no
            ``policy``) never exits.
        policy: any registered exit policy (a name, a dict or an ``ExitPolicy``) that reads what token
            exits supply: the exit head's LM distribution (max_prob, entropy, margin, patience: one
            extra full-vocabulary projection per running row and exit, counted in
            ``report.extra_head_rows``), its confidence classifier (token_confidence), or nothing
            (static, never). Overrides ``threshold``.
        cache_strategy: copy_kv | propagate | catch_up (transformers), freeze | update | catch_up (Mamba);
            default: copy_kv / freeze.
        max_new_tokens: tokens to generate per row (fewer if every row hits EOS).
        sampling: greedy by default; temperature, top-p, repetition penalty, EOS, seed.
        tokenizer: decodes ``texts`` when given.
        output_logits: keep the (b, n, V) logits of every step.
        return_cache: put the cache store in ``extra["cache"]`` (tests, analysis).
        record_signals: keep the signals the policy saw at every exit each decoded token reached in
            ``extra["signals"]`` (``offramp.evaluation.token_trace.engine_trace(output)`` makes them a
            ``TokenTrace``) (computes the distribution and the confidence at
            every exit: analysis only); ``offramp.evaluation.token_trace.replay_tokens`` on it gives
            these exits back.

    Returns:
        A ``GenerateOutput`` with tokens, per-token exit layers, texts and a ``GenerateReport``.
    """
    decoding = _Decoding(model, input_ids, attention_mask, threshold=threshold, policy=policy,
                         cache_strategy=cache_strategy, max_new_tokens=max_new_tokens, sampling=sampling,
                         tokenizer=tokenizer, output_logits=output_logits, return_cache=return_cache,
                         record_signals=record_signals)
    for _ in decoding:
        pass
    return decoding.output()


def stream_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                    threshold: float | None = None, policy: str | dict | ExitPolicy | None = None,
                    cache_strategy: str | None = None, max_new_tokens: int = 32,
                    sampling: SamplingOptions | None = None) -> Iterator[TokenStep]:
    """``generate`` one token at a time: yields a ``TokenStep`` (the rows that got a token, the
    tokens, their exit layers, which rows finished) as soon as each step is decoded. The tokens
    are exactly ``generate``'s with the same arguments. Arguments are checked before the first
    token is computed (the error is raised by this call, not by the first ``next``)."""
    decoding = _Decoding(model, input_ids, attention_mask, threshold=threshold, policy=policy,
                         cache_strategy=cache_strategy, max_new_tokens=max_new_tokens, sampling=sampling,
                         tokenizer=None, output_logits=False, return_cache=False, record_signals=False)

    def steps() -> Iterator[TokenStep]:
        with torch.no_grad():
            yield from decoding

    return steps()


def decoded_exit_layers(out: GenerateOutput) -> Tensor:
    """(n,) exit layer of every token decoded layer by layer (all but each row's first, which the
    prompt's forward pass gives), sequence-major: the order of a token trace's rows."""
    layers = out.exit_layers[:, 1:]
    return torch.cat([row[row > 0] for row in layers])
