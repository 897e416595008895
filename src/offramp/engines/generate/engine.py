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

from offramp.backbones import DecoderAdapter, adapter_for
from offramp.engines.generate.cache import KVStore, SSMStore, attention_mask
from offramp.engines.generate.sampling import SamplingOptions, next_tokens
from offramp.engines.rows import RunningRows
from offramp.modeling.outputs import GenerateOutput, GenerateReport
from offramp.policies import ExitPolicy, ExitSignals, make_policy, require_signals
from offramp.policies.token_confidence import TokenConfidencePolicy

# what token exits give a policy: the exit's LM distribution, its confidence, its features (hidden)
SIGNALS = ("logits", "confidence", "hidden")

ATTENTION_STRATEGIES = ("copy_kv", "propagate", "catch_up")
SSM_STRATEGIES = ("freeze", "update", "catch_up")


class _Run:
    """State of one generation call (cache, positions, per-row bookkeeping)."""

    def __init__(self, adapter: DecoderAdapter, exit_model: Any, policy: ExitPolicy | None, strategy: str,
                 ids: Tensor, attn: Tensor, max_new: int, record: bool = False) -> None:
        self.adapter, self.exit_model, self.policy, self.strategy = adapter, exit_model, policy, strategy
        self.L = adapter.num_layers
        b, p = ids.shape
        self.B, self.P, self.T = b, p, p + max_new
        dev = adapter.layer_device(0)
        self.valid = torch.ones(b, self.T, dtype=torch.bool, device=dev)
        self.valid[:, :p] = attn.bool()
        self.has_pad = bool((~self.valid[:, :p]).any())
        pos = attn.long().cumsum(-1) - 1
        pos = pos.masked_fill(attn == 0, 0)
        gen = pos[:, -1:] + torch.arange(1, max_new + 1, device=dev)[None]
        self.pos = torch.cat([pos, gen], dim=1)  # (b, T)
        exits_run = policy is not None and policy.type != "never"
        self.exit_of_layer = {k: i for i, k in enumerate(exit_model.exit_layers)} if exits_run else {}
        self.num_exits = len(exit_model.exit_layers) if exit_model is not None else 0
        self.records: list[dict[str, Any]] | None = [] if record and exits_run else None
        self.want_logits = policy is not None and ("logits" in policy.needs or record)
        self.want_confidence = policy is not None and ("confidence" in policy.needs or record)
        self.layer_rows = 0
        self.fill_rows = 0
        self.head_rows = 0
        if adapter.kind == "attention":
            heads, hd = adapter.kv_shape()
            devices = [adapter.layer_device(i) for i in range(self.L)]
            self.kv = KVStore(devices, b, self.T, heads, hd, adapter.dtype)
            self.mask_kind = adapter.mask_dtype()
        else:
            self.ssm = SSMStore(self.L)
        self.head_states = SSMStore(len(exit_model.exit_layers)) if exit_model is not None else None
        if strategy == "catch_up":
            self.filled = [torch.full((b,), p, dtype=torch.long, device=dev) for _ in range(self.L)]
            self.frontier = torch.zeros(b, self.T, adapter.hidden_size, dtype=adapter.dtype, device=dev)

    # ---- one layer ------------------------------------------------------------------------
    def _mask(self, rows: Tensor, layer: int, start: int, end: int) -> Tensor | None:
        window = self.adapter.sliding_window(layer)
        needs_window = window is not None and end > window
        if not self.has_pad and not needs_window and (end - start == 1 or start == 0):
            return None  # HF passes no mask either: plain causal / single query
        return attention_mask(self.valid.index_select(0, rows), start, end, window=window,
                              kind=self.mask_kind, dtype=self.adapter.dtype)

    def run_layer(self, layer: int, h: Tensor, rows: Tensor, full: bool, col: int, rot: Any,
                  masks: dict, posc: Tensor | None = None) -> Tensor:
        """Run ``layer`` for ``rows`` whose current token sits at column ``col``; h is (r, 1, d)."""
        self.layer_rows += rows.numel()
        ad = self.adapter
        if ad.kind == "ssm":
            if self.strategy == "catch_up":
                starts = self.filled[layer].index_select(0, rows)
                self.filled[layer].index_fill_(0, rows, col + 1)
                if int(starts.min()) < col:
                    return self._catch_up_ssm(layer, h, rows, col, starts)
            view = self.ssm.view(layer, None if full else rows)
            out = ad.run_layer(layer, h, cache=view)
            view.commit()
            return out
        start = col
        if self.strategy == "catch_up":
            start = int(self.filled[layer].index_select(0, rows).min())
        if start < col:
            out = self._catch_up_layer(layer, h, rows, col, start)
        else:
            key = ad.sliding_window(layer)
            if key not in masks:
                masks[key] = self._mask(rows, layer, col, col + 1)
            view = self.kv.view(layer, None if full else rows, col, col + 1)
            if posc is None:
                posc = self.pos.index_select(0, rows)[:, col:col + 1]
            out = ad.run_layer(layer, h, cache=view, mask=masks[key], position_ids=posc, rotary=rot)
        if self.strategy == "catch_up":
            self.filled[layer].index_fill_(0, rows, col + 1)
        return out

    def _catch_up_layer(self, layer: int, h: Tensor, rows: Tensor, col: int, start: int) -> Tensor:
        """Run ``layer`` on columns start..col: the pending tokens of ``rows`` and the current one."""
        ad = self.adapter
        self.frontier[rows, col] = h[:, 0].to(self.frontier.device)
        win = self.frontier[rows, start:col + 1]  # (r, w, d)
        posw = self.pos.index_select(0, rows)[:, start:col + 1]
        cols = torch.arange(start, col + 1, device=self.frontier.device)
        write = cols[None, :] >= self.filled[layer].index_select(0, rows)[:, None]  # (r, w)
        mask = attention_mask(self.valid.index_select(0, rows), start, col + 1,
                              window=ad.sliding_window(layer), kind=self.mask_kind, dtype=ad.dtype)
        view = self.kv.view(layer, rows, start, col + 1, write)
        out = ad.run_layer(layer, win, cache=view, mask=mask, position_ids=posw, rotary=ad.rotary(win, posw))
        out = out.to(self.frontier.device)
        self.frontier[rows, start:col + 1] = torch.where(write[..., None], out, win)
        self.fill_rows += int(write.sum()) - rows.numel()
        return out[:, -1:]

    def _catch_up_ssm(self, layer: int, h: Tensor, rows: Tensor, col: int, starts: Tensor) -> Tensor:
        """Mamba: run ``layer`` on each row's pending tokens (columns starts[r]..col-1, from the
        hidden states they left the layer below with) and the current one, continuing its states.
        One ragged ``mamba_chunk`` pass serves every row: a row with fewer pending tokens is
        padded on the left, and padding leaves its states as they were."""
        from offramp.engines.generate.speculative import mamba_chunk

        self.frontier[rows, col] = h[:, 0].to(self.frontier.device)
        conv, ssm = self.ssm.conv[layer], self.ssm.ssm[layer]
        block, dev = self.adapter.layers()[layer], self.adapter.layer_device(layer)
        start = int(starts.min())
        win = self.frontier[rows, start:col + 1]  # (r, w, d)
        lead = starts - start
        y, convs, ssms = mamba_chunk(block, win.to(dev), conv.index_select(0, rows), ssm.index_select(0, rows),
                                     lead=lead if bool((lead > 0).any()) else None)
        conv.index_copy_(0, rows, convs[-1])
        ssm.index_copy_(0, rows, ssms[-1])
        cols = torch.arange(start, col + 1, device=self.frontier.device)
        write = cols[None, :] >= starts.to(cols.device)[:, None]  # (r, w): each row's own columns
        self.frontier[rows, start:col + 1] = torch.where(write[..., None], y.to(win.device, win.dtype), win)
        self.fill_rows += int((col - starts).sum())
        return y[:, -1:]  # in the dtype the block returns (as the one-token path)

    # ---- what skipped layers store ---------------------------------------------------------
    def fill(self, k: int, rows: Tensor, col: int, h: Tensor) -> None:
        """Rows ``rows`` exited after ``k`` layers with hidden state h (n, 1, d) at column ``col``."""
        ad, n = self.adapter, rows.numel()
        if self.strategy == "copy_kv":
            for layer in range(k, self.L):
                self.kv.copy_columns(k - 1, layer, rows, col)
        elif self.strategy == "propagate":
            rot = ad.rotary(h, self.pos.index_select(0, rows)[:, col:col + 1])
            for layer in range(k, self.L):
                key, value = ad.project_kv(layer, h, rot)
                self.kv.write(layer, rows, col, key, value)
            self.fill_rows += n * (self.L - k)
        elif self.strategy == "catch_up":
            self.frontier[rows, col] = h[:, 0].to(self.frontier.device)
        elif self.strategy == "update":
            for layer in range(k, self.L):
                view = self.ssm.view(layer, rows)
                ad.run_layer(layer, h, cache=view)
                view.commit()
            self.fill_rows += n * (self.L - k)
        if self.strategy in ("copy_kv", "freeze"):
            return  # cheap fills: deeper stateful (Mamba) exit heads keep their state too
        for e, depth in enumerate(self.exit_model.exit_layers):
            if depth > k and self.exit_model.heads[e].stateful:
                view = self.head_states.view(e, rows)
                self.exit_model.features(e, h, cache=view)
                view.commit()

    # ---- exits -----------------------------------------------------------------------------
    def exit_signals(self, e: int, layer: int, h: Tensor, rows: Tensor, full: bool) -> tuple[Tensor, ExitSignals]:
        """Features of exit ``e`` (after ``layer`` layers) for ``rows`` and the signals its policy reads:
        the exit head's LM logits (only for policies that read the distribution: an extra
        full-vocabulary projection per running row) and the confidence classifier's probability."""
        stateful = self.exit_model.heads[e].stateful
        view = self.head_states.view(e, None if full else rows) if stateful else None
        feats = self.exit_model.features(e, h, cache=view)  # (r, 1, d)
        if view is not None:
            view.commit()
        signals = ExitSignals(layer=layer, hidden=feats[:, -1])  # the features: free, and what saturation reads
        if self.want_logits:
            signals.logits = self.adapter.logits(feats)[:, -1]  # (r, V)
            self.head_rows += rows.numel()
        if self.want_confidence:
            signals.confidence = torch.sigmoid(self.exit_model.confidence_logit(e, feats)[:, -1])  # (r,)
        return feats, signals

    # ---- prefill and one decoding step -------------------------------------------------------
    def prefill(self, ids: Tensor, attn: Tensor) -> Tensor:
        """Run the whole prompt through every layer; (b, V) logits of the last column."""
        ad, p = self.adapter, self.P
        pos = self.pos[:, :p]
        h = ad.embed(ids, pos)
        rot = ad.rotary(h, pos)
        mask2d = attn if self.has_pad else None
        for layer in range(self.L):
            if ad.kind == "ssm":
                view = self.ssm.view(layer, None)
                h = ad.run_layer(layer, h, cache=view, mask=mask2d)
            else:
                view = self.kv.view(layer, None, 0, p)
                rows = torch.arange(self.B, device=self.valid.device)
                h = ad.run_layer(layer, h, cache=view, mask=self._mask(rows, layer, 0, p), position_ids=pos,
                                 rotary=rot)
            view.commit()
            e = self.exit_of_layer.get(layer + 1)
            if e is not None and self.exit_model.heads[e].stateful:
                hv = self.head_states.view(e, None)
                self.exit_model.features(e, h, cache=hv, mask=mask2d)
                hv.commit()
        self.layer_rows += self.B * self.L
        return ad.logits(h[:, -1:])[:, -1]

    def step(self, tokens: Tensor, alive: Tensor, col: int) -> tuple[Tensor, Tensor]:
        """Decode the token at column ``col`` of rows ``alive``: (r, V) logits and (r,) exit layers.

        The policy's state starts once for the step and follows the rows across this token's exits;
        rows that exit leave the running batch (``RunningRows``), their logits from their exit."""
        ad = self.adapter
        r0 = alive.numel()
        full = r0 == self.B
        posc = self.pos.index_select(0, alive)[:, col:col + 1]
        h = ad.embed(tokens[:, None], posc)  # (r, 1, d)
        logits = torch.empty(r0, ad.vocab_size, dtype=ad.dtype, device=ad.head_device)
        exit_at = torch.full((r0,), self.L, dtype=torch.long, device=alive.device)
        running = RunningRows(r0, alive.device)
        carried: dict[str, Any] = {"rows": alive, "h": h, "rot": ad.rotary(h, posc), "posc": posc, "masks": {}}
        if self.exit_of_layer:
            carried["state"] = self.policy.start(r0, self.num_exits, device=alive.device)
        if self.records is not None:
            step_record: dict[str, Any] = {"rows": alive.clone(), "exits": {}}
            self.records.append(step_record)
        for layer in range(self.L):
            rows = carried["rows"]
            carried["h"] = h = self.run_layer(layer, carried["h"], rows, full, col, carried["rot"], carried["masks"],
                                              carried["posc"])
            e = self.exit_of_layer.get(layer + 1)
            if e is None:
                continue
            feats, signals = self.exit_signals(e, layer + 1, h, rows, full)
            if self.records is not None:
                step_record["exits"][e] = (running.index.clone(), {
                    **{k: signals.stat(k) for k in ("max_prob", "entropy", "margin", "top1")},
                    "confidence": signals.confidence})
            exits, carried["state"] = self.policy.decide(e, signals, carried["state"])

            def write(local: Tensor, original: Tensor, feats: Tensor = feats, signals: ExitSignals = signals,
                      h: Tensor = h, rows: Tensor = rows, depth: int = layer + 1) -> None:
                if signals.logits is not None:
                    self.head_rows -= local.numel()  # the projection these rows need anyway
                    logits[original] = signals.logits.index_select(0, local.to(signals.logits.device))
                else:
                    logits[original] = ad.logits(feats.index_select(0, local.to(feats.device)))[:, -1]
                exit_at[original] = depth
                self.fill(depth, rows.index_select(0, local), col, h.index_select(0, local.to(h.device)))

            before = len(running)
            carried = running.leave(exits, write, carried)
            full = full and len(running) == before
            if not len(running):
                break
        if len(running):
            logits[running.index] = ad.logits(carried["h"])[:, -1]
        return logits, exit_at


def _check_inputs(adapter: DecoderAdapter, ids: Tensor, attn: Tensor, max_new: int, strategy: str) -> None:
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(ids.shape)}")
    if attn.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attn.shape)} differs from input_ids {tuple(ids.shape)}")
    if bool((attn.sum(-1) == 0).any()):
        raise ValueError("a prompt is empty (its attention_mask is all zeros): give every row a token")
    if bool((attn[:, -1] == 0).any()):
        raise ValueError("prompts must be LEFT-padded (tokenizer.padding_side = 'left')")
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    limit = adapter.max_positions()
    if limit is not None and ids.shape[1] + max_new > limit:
        raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {max_new} exceeds the model's context "
                         f"of {limit} tokens: shorten the prompt or lower max_new_tokens")
    allowed = ATTENTION_STRATEGIES if adapter.kind == "attention" else SSM_STRATEGIES
    if strategy not in allowed:
        raise ValueError(f"cache_strategy {strategy!r} does not apply to a {adapter.kind} backbone; "
                         f"choose one of {allowed}")


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
        _check_inputs(adapter, input_ids, attention_mask, max_new_tokens, strategy)
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
        self.run = run = _Run(self.adapter, self.exit_model, self.policy, self.strategy, ids, self.attn,
                              self.max_new, record=self.record)
        b, p = ids.shape
        dev = ids.device
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        gen = sampling.generator(dev)
        logits = run.prefill(ids, self.attn)
        alive, exit_at = torch.arange(b, device=dev), torch.full((b,), run.L, device=dev)
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
            alive = (~done).nonzero()[:, 0]
            if alive.numel() == 0 or last:
                break
            logits, exit_at = run.step(seq[alive, col], alive, col)
        self.wall += time.perf_counter() - start

    def output(self) -> GenerateOutput:
        run, p, n = self.run, self.ids.shape[1], self.n
        new = self.seq[:, p:p + n]
        counted = self.exits[:, :n][self.exits[:, :n] > 0]
        report = GenerateReport(new_tokens=int(counted.numel()), layer_rows=run.layer_rows,
                                fill_layer_rows=run.fill_rows, num_layers=run.L, wall_s=self.wall,
                                extra_head_rows=run.head_rows,
                                mean_exit_layer=float(counted.float().mean()) if counted.numel() else 0.0)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True) if self.tokenizer is not None else None
        extra: dict[str, Any] = {}
        if self.return_cache:
            extra.update(cache=run.kv if self.adapter.kind == "attention" else run.ssm, head_states=run.head_states)
        if run.records is not None:
            from offramp.evaluation.token_trace import engine_trace

            extra["trace"] = engine_trace(run.records, self.exit_model.exit_layers, run.L, self.adapter.vocab_size)
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
        record_signals: put a ``TokenTrace`` of the signals the policy saw at every exit each decoded
            token reached in ``extra["trace"]`` (computes the distribution and the confidence at
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
