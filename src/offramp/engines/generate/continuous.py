"""Continuous batching for token-exit decoding: prompts join the running batch at a step boundary
and leave it as soon as they end, each row keeping its own exit decisions.

``ContinuousBatch`` holds one ``DecodeRun`` for every running row. ``add`` queues a prompt; each
``step`` first prefills the queued prompts (each alone, as ``generate`` would) and merges them
into the running rows (the shorter side is padded on the left so that every row writes its next
token at the same column), then picks each row's token from its own logits (greedy, or sampled
with the row's own settings and seed), hands back one ``RowToken`` per row, drops the rows that
ended (their cache rows go, and the columns no remaining row uses are cut), and decodes the next
column for the rest with per-row exits. A row's tokens are those of ``generate`` on its prompt
alone with the same policy, cache strategy and sampling, whoever it shares the batch with (the
padding is masked out; tests check it for every exact cache strategy and for Mamba).

This is what a server needs: a request joins at the next step instead of waiting for the batch in
flight to end, and a short answer does not wait for a long one.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from offramp.backbones import adapter_for
from offramp.engines.generate.engine import SIGNALS
from offramp.engines.generate.run import DecodeRun, check_inputs
from offramp.engines.generate.sampling import SamplingOptions, next_tokens
from offramp.engines.generate.speculative import (
    Speculator,
    check_draft_vocab,
    check_ngram,
    check_speculation,
    draft_cache_strategy,
    ngram_drafts,
)
from offramp.policies import ExitPolicy, make_policy, require_signals


@dataclass(frozen=True)
class RowToken:
    """The token one row got at a step: ``index`` its place among the row's new tokens (0 = first),
    ``exit_layer`` the layers that computed it, ``finished`` True when it ended the row (EOS, the
    row's ``max_new_tokens``, or one of its stop ids)."""

    key: Hashable
    index: int
    token: int
    exit_layer: int
    finished: bool


@dataclass
class _Row:
    key: Hashable
    prompt: list[int]
    max_new: int
    sampling: SamplingOptions
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logits: Tensor | None = None  # (V,) of the next token
    exit_at: int = 0


class _Rows:
    """What both running batches share: their queued and running rows, and dropping one."""

    queue: list[_Row]
    rows: list[_Row]

    def __len__(self) -> int:
        return len(self.rows) + len(self.queue)

    @property
    def keys(self) -> list[Hashable]:
        return [r.key for r in self.rows + self.queue]

    def cancel(self, key: Hashable) -> bool:
        """Drop a row (its client went away); True if it was there."""
        for i, row in enumerate(self.queue):
            if row.key == key:
                del self.queue[i]
                return True
        for i, row in enumerate(self.rows):
            if row.key == key:
                self._keep([j for j in range(len(self.rows)) if j != i])
                return True
        return False

    def _keep(self, keep: list[int]) -> None:
        raise NotImplementedError


class ContinuousBatch(_Rows):
    """Rows that join and leave a running token-exit decoding batch between steps.

    Args:
        model: a ``DecoderExitModel`` or a plain HF causal LM (which never exits).
        policy: the exit policy every row uses (rows with another policy go to another batch).
        cache_strategy: as in ``generate`` (default copy_kv / freeze).
        sampling: the default token choice (greedy with the model's EOS); ``add`` may give a row its own.
        max_rows: the most rows decoding at once; more wait in the queue.
        static: admit queued rows only when no row is running (static batching: a batch runs until
            its last row ends), for comparison.
    """

    def __init__(self, model: nn.Module, *, policy: str | dict | ExitPolicy | None = None,
                 cache_strategy: str | None = None, sampling: SamplingOptions | None = None,
                 max_rows: int = 32, static: bool = False) -> None:
        exit_model = model if hasattr(model, "exit_layers") else None
        backbone = exit_model.backbone if exit_model is not None else model
        self.adapter = exit_model.adapter if exit_model is not None else adapter_for(backbone, role="decoder")
        self.policy = make_policy(policy) if policy is not None else None
        if self.policy is not None and self.policy.type != "never":
            if exit_model is None:
                raise ValueError("exits need a DecoderExitModel (backbone + trained exit heads), not a plain backbone")
            require_signals(self.policy, set(SIGNALS), "token-exit generation")
            self.policy.check_exits(exit_model.exit_layers)
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.exit_model, self.max_rows, self.static = exit_model, max_rows, static
        self.strategy = cache_strategy or ("copy_kv" if self.adapter.kind == "attention" else "freeze")
        self.sampling = sampling or SamplingOptions.from_model(backbone)
        self.queue: list[_Row] = []
        self.rows: list[_Row] = []  # row i of ``run`` is rows[i]
        self.run: DecodeRun | None = None
        self.col = 0  # the column of every running row's next token
        self.steps = 0

    def add(self, key: Hashable, input_ids: list[int] | Tensor, max_new_tokens: int,
            sampling: SamplingOptions | None = None) -> None:
        """Queue a prompt (token ids, no padding); it joins at the next ``step`` with room. Its
        settings are checked now (a prompt past the model's positions is a ValueError here)."""
        ids = _host_ids(input_ids)
        check_inputs(self.adapter, ids[None], torch.ones_like(ids)[None], max_new_tokens, self.strategy)
        if key in self.keys:
            raise ValueError(f"row key {key!r} is already in the batch")
        sampling = sampling or self.sampling
        dev = self.adapter.layer_device(0)
        self.queue.append(_Row(key, ids.tolist(), max_new_tokens, sampling, sampling.generator(dev)))

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> list[RowToken]:
        """Join queued prompts, give every running row its next token, drop finished rows, and
        decode the next column for the others. [] when nothing is running or queued."""
        self._join()
        if not self.rows:
            return []
        out, keep, chosen = [], [], []
        greedy = [i for i, row in enumerate(self.rows) if not _reads_history(row.sampling)]
        best = dict(zip(greedy, torch.stack([self.rows[i].logits for i in greedy]).float().argmax(-1).tolist())) \
            if greedy else {}  # one transfer for every greedy row: next_tokens' argmax, without the history
        for i, row in enumerate(self.rows):
            if i in best:
                token = best[i]
            else:
                history = torch.tensor([row.prompt + row.tokens], device=row.logits.device)
                token = int(next_tokens(row.logits[None], history, row.sampling, row.generator)[0])
            row.tokens.append(token)
            done = token in row.sampling.eos_ids or len(row.tokens) >= row.max_new
            out.append(RowToken(row.key, len(row.tokens) - 1, token, row.exit_at, done))
            if not done:
                keep.append(i)
                chosen.append(token)
        self.steps += 1
        self._keep(keep)
        if self.rows:
            alive = torch.arange(len(self.rows), device=self.run.valid.device)
            tokens = torch.tensor(chosen, dtype=torch.long, device=alive.device)
            logits, exit_at = self.run.step(tokens, alive, self.col)
            self.col += 1
            for row, lg, layer in zip(self.rows, logits, exit_at.tolist()):
                row.logits, row.exit_at = lg, layer
        return out

    def _join(self) -> None:
        """Prefill every queued prompt that fits, together as one left-padded batch, and merge them in."""
        if self.static and self.rows:
            return
        joining = self.queue[:self.max_rows - len(self.rows)]
        if not joining:
            return
        del self.queue[:len(joining)]
        width = max(len(r.prompt) for r in joining)
        dev = self.adapter.layer_device(0)
        ids = torch.zeros(len(joining), width, dtype=torch.long, device=dev)
        attn = torch.zeros_like(ids)
        for i, row in enumerate(joining):
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt, device=dev)
            attn[i, width - len(row.prompt):] = 1
        run = DecodeRun(self.adapter, self.exit_model, self.policy, self.strategy, ids, attn,
                        max(r.max_new for r in joining))
        logits = run.prefill(ids, attn)
        for row, lg in zip(joining, logits):
            row.logits, row.exit_at = lg, run.num_layers
        if self.run is None:
            self.run, self.col = run, width
        else:
            self.col = self.run.merge(run, self.col, width)
        self.rows.extend(joining)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.run, self.col = None, 0
            return
        self.col = self.run.keep_rows(torch.tensor(keep, device=self.run.valid.device), self.col)

    def report(self) -> dict[str, Any]:
        """Counters of the running batch: rows running and queued, steps, next column."""
        return {"running": len(self.rows), "queued": len(self.queue), "steps": self.steps, "column": self.col}


class ContinuousSpeculation(_Rows):
    """Lossless self-speculation (``speculative_generate``, greedy) for rows that join and leave a
    running batch between rounds: each round drafts ``draft_tokens`` tokens from the drafting exit
    for every running row and verifies them with the remaining layers in one pass; every row gets
    greedy decoding's tokens (all its tokens are the full model's), so a row's output is that of
    ``generate`` on its prompt alone, whoever shares its rounds. ``step`` returns every token each
    row gained in the round (the accepted drafts and the full model's token after them).

    Args:
        model: a ``DecoderExitModel``; ``exit_layer``, ``draft_tokens``, ``draft_confidence``,
            ``draft_rule``, ``draft_vocab``, ``ngram_tokens`` and ``ngram_size`` as in
            ``speculative_generate`` (n-gram drafts in the rounds where every running row's prompt
            and text so far have a match; ``draft_tokens=0``: n-gram drafts only).
        sampling: EOS and pad ids; speculation here is greedy.
        max_rows: the most rows drafting at once.
    """

    def __init__(self, model: nn.Module, *, exit_layer: int | None = None, draft_tokens: int = 4,
                 draft_confidence: float | None = None, draft_rule: str = "max_prob", draft_vocab: Any = None,
                 ngram_tokens: int = 0, ngram_size: int = 3, sampling: SamplingOptions | None = None,
                 max_rows: int = 32) -> None:
        self.model = model
        self.sampling = sampling or SamplingOptions.from_model(model.backbone)
        if self.sampling.do_sample:
            raise ValueError("served self-speculation is greedy: drop sampling (temperature), or decode without it")
        check_ngram(ngram_tokens, ngram_size, self.sampling, draft_tokens)
        self.exit_index = check_speculation(model, self.sampling, draft_tokens or 1, draft_confidence, exit_layer,
                                            draft_rule)
        self.vocab = check_draft_vocab(model, draft_vocab)
        self.draft_tokens, self.draft_confidence, self.draft_rule = draft_tokens, draft_confidence, draft_rule
        self.ngram_tokens, self.ngram_size = ngram_tokens, ngram_size
        self.ngram_rounds = 0
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows, self.adapter = max_rows, model.adapter
        self.queue: list[_Row] = []
        self.rows: list[_Row] = []
        self.spec: Any = None
        self.next_pos: Tensor | None = None  # (rows,) the position of each row's pending token
        self.col = 0
        self.steps = self.drafted = self.accepted = 0

    def add(self, key: Hashable, input_ids: list[int] | Tensor, max_new_tokens: int,
            sampling: SamplingOptions | None = None) -> None:
        """Queue a prompt; it joins at the next round. Checked now (positions, sampling)."""
        if sampling is not None and sampling.do_sample:
            raise ValueError("served self-speculation is greedy: drop temperature, or turn speculation off")
        ids = _host_ids(input_ids)
        check_inputs(self.adapter, ids[None], torch.ones_like(ids)[None], max_new_tokens,
                     draft_cache_strategy(self.adapter))
        if key in self.keys:
            raise ValueError(f"row key {key!r} is already in the batch")
        self.queue.append(_Row(key, ids.tolist(), max_new_tokens, sampling or self.sampling, None))

    @torch.no_grad()
    def step(self) -> list[RowToken]:
        """Join queued prompts (each gets its first token from its prefill), then one draft-and-verify
        round for every running row; drop the rows that ended."""
        out: list[RowToken] = []
        keep = list(range(len(self.rows)))
        while self.queue and len(self.rows) < self.max_rows:
            row = self.queue.pop(0)
            ids = torch.tensor([row.prompt], device=self.adapter.layer_device(0))
            spec = Speculator(self.model, self.exit_index, ids, torch.ones_like(ids), row.max_new, self.draft_tokens,
                              self.vocab, self.ngram_tokens)
            first = int(spec.run.prefill(ids, torch.ones_like(ids)).argmax(-1)[0])
            pos = spec.run.pos[:, ids.shape[1] - 1] + 1
            if self.spec is None:
                self.spec, self.col, self.next_pos = spec, ids.shape[1], pos
            else:
                self.col = self.spec.run.merge(spec.run, self.col, ids.shape[1])
                self.next_pos = torch.cat([self.next_pos, pos.to(self.next_pos.device)])
            self.rows.append(row)
            done = self._give(row, [first], out)
            if not done:
                keep.append(len(self.rows) - 1)
        self._keep(keep)
        if not self.rows:
            return out
        rows = torch.arange(len(self.rows), device=self.spec.run.valid.device)
        pending = torch.tensor([r.tokens[-1] for r in self.rows], device=rows.device)
        given = None
        if self.ngram_tokens:
            room = min(r.max_new - len(r.tokens) for r in self.rows)
            given = ngram_drafts([r.prompt + r.tokens for r in self.rows], list(range(len(self.rows))),
                                  self.ngram_tokens, self.ngram_size, room, rows.device)
            self.ngram_rounds += given is not None
        best, accepted, k = self.spec.round(pending, rows, self.next_pos, self.col, self.draft_confidence, None, None,
                                            self.draft_rule, given)
        self.steps += 1
        self.drafted += len(self.rows) * k
        self.accepted += int(accepted.sum())
        self.next_pos = self.next_pos + accepted.to(self.next_pos.device) + 1
        host = torch.cat([accepted[:, None].to(best.device), best], 1).tolist()  # one transfer for the round
        self.col += max(h[0] for h in host) + 1  # after the last column any row kept (as speculative_generate)
        keep = [i for i, (row, (n, *tokens)) in enumerate(zip(self.rows, host))
                if not self._give(row, tokens[:n + 1], out)]
        self._keep(keep)
        return out

    def _give(self, row: _Row, tokens: list[int], out: list[RowToken]) -> bool:
        """Hand ``tokens`` to ``row`` up to its EOS or max_new_tokens; True when it ended."""
        for token in tokens:
            row.tokens.append(token)
            done = token in row.sampling.eos_ids or len(row.tokens) >= row.max_new
            out.append(RowToken(row.key, len(row.tokens) - 1, token, self.adapter.num_layers, done))
            if done:
                return True
        return False

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.spec, self.col, self.next_pos = None, 0, None
            return
        index = torch.tensor(keep, device=self.spec.run.valid.device)
        self.next_pos = self.next_pos.index_select(0, index.to(self.next_pos.device))
        self.col = self.spec.run.keep_rows(index, self.col)

    def report(self) -> dict[str, Any]:
        return {"running": len(self.rows), "queued": len(self.queue), "steps": self.steps, "column": self.col,
                "acceptance": self.accepted / max(self.drafted, 1), "ngram_rounds": self.ngram_rounds}


def _host_ids(input_ids: list[int] | Tensor) -> Tensor:
    """A prompt's token ids as a 1-D tensor on the host, where its checks run (it reaches the model's
    device when it joins the batch)."""
    return torch.as_tensor(input_ids, dtype=torch.long, device="cpu").reshape(-1)


def _reads_history(sampling: SamplingOptions) -> bool:
    """Whether choosing a row's token reads more than its logits (sampling, repetition penalty)."""
    return sampling.do_sample or sampling.repetition_penalty != 1.0
