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


class ContinuousBatch:
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

    def __len__(self) -> int:
        return len(self.rows) + len(self.queue)

    @property
    def keys(self) -> list[Hashable]:
        return [r.key for r in self.rows + self.queue]

    def add(self, key: Hashable, input_ids: list[int] | Tensor, max_new_tokens: int,
            sampling: SamplingOptions | None = None) -> None:
        """Queue a prompt (token ids, no padding); it joins at the next ``step`` with room. Its
        settings are checked now (a prompt past the model's positions is a ValueError here)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        check_inputs(self.adapter, ids[None], torch.ones_like(ids)[None], max_new_tokens, self.strategy)
        if key in self.keys:
            raise ValueError(f"row key {key!r} is already in the batch")
        sampling = sampling or self.sampling
        dev = self.adapter.layer_device(0)
        self.queue.append(_Row(key, ids.tolist(), max_new_tokens, sampling, sampling.generator(dev)))

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

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> list[RowToken]:
        """Join queued prompts, give every running row its next token, drop finished rows, and
        decode the next column for the others. [] when nothing is running or queued."""
        self._join()
        if not self.rows:
            return []
        out, keep, chosen = [], [], []
        for i, row in enumerate(self.rows):
            history = torch.tensor([row.prompt + row.tokens], device=row.logits.device)
            token = int(next_tokens(row.logits[None], history, row.sampling, row.generator)[0])
            row.tokens.append(token)
            done = bool(row.sampling.is_eos(torch.tensor([token]))[0]) or len(row.tokens) >= row.max_new
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
        if self.static and self.rows:
            return
        while self.queue and len(self.rows) < self.max_rows:
            row = self.queue.pop(0)
            ids = torch.tensor([row.prompt], device=self.adapter.layer_device(0))
            attn = torch.ones_like(ids)
            run = DecodeRun(self.adapter, self.exit_model, self.policy, self.strategy, ids, attn, row.max_new)
            row.logits, row.exit_at = run.prefill(ids, attn)[0], run.num_layers
            if self.run is None:
                self.run, self.col = run, ids.shape[1]
            else:
                self.col = self.run.merge(run, self.col, ids.shape[1])
            self.rows.append(row)

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
