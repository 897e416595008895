"""The per-call state of token-level early-exit generation (``DecodeRun``) and the checks on a
call's inputs (``check_inputs``). ``engine`` (greedy / sampled decoding with exits) and
``speculative`` (self-speculation) both run on it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from offramp.backbones import DecoderAdapter
from offramp.engines.generate.cache import KVStore, SSMStore, attention_mask
from offramp.engines.generate.mamba import mamba_chunk
from offramp.engines.rows import RunningRows
from offramp.names import ATTENTION_STRATEGIES, SSM_STRATEGIES
from offramp.policies import ExitPolicy, ExitSignals


class DecodeRun:
    """The state of one generation call, and the layer-by-layer work on it.

    Built once per call by ``generate`` / ``stream_generate`` (and by self-speculation, which never
    skips a layer). What it holds, for a batch of ``batch_size`` rows whose prompts are
    ``prompt_len`` tokens (left-padded) and which may grow to ``max_len`` columns:

    - ``valid`` (b, max_len) which columns hold real tokens, ``pos`` (b, max_len) their positions;
    - the cache: ``kv`` (attention: a ``KVStore`` per layer) or ``ssm`` (Mamba: conv / SSM states),
      and ``head_states`` for stateful (Mamba) exit heads;
    - under ``catch_up``: ``filled[layer]`` (b,), the first column layer ``layer`` has not run for
      each row, and ``pending_hidden`` (b, max_len, d), the hidden state each column had at the
      deepest layer it reached, from which the layers it skipped catch up;
    - counters for the report: ``layer_rows`` (rows x layers run), ``fill_rows`` (cache fills),
      ``head_rows`` (extra LM-head projections for policies that read the distribution).

    ``prefill`` runs the prompt; ``step`` decodes one column with per-row exits (rows that exit
    leave the running batch; ``fill`` writes what the layers they skipped must still store).
    """

    def __init__(self, adapter: DecoderAdapter, exit_model: Any, policy: ExitPolicy | None, strategy: str,
                 ids: Tensor, attn: Tensor, max_new: int, record: bool = False) -> None:
        self.adapter, self.exit_model, self.policy, self.strategy = adapter, exit_model, policy, strategy
        self.num_layers = adapter.num_layers
        b, p = ids.shape
        self.batch_size, self.prompt_len, self.max_len = b, p, p + max_new
        dev = adapter.layer_device(0)
        self.valid = torch.ones(b, self.max_len, dtype=torch.bool, device=dev)
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
        self.future_valid = True  # columns past the prompt: valid (decoding) or not until written (speculation)
        if adapter.kind == "attention":
            heads, head_dim = adapter.kv_shape()
            devices = [adapter.layer_device(i) for i in range(self.num_layers)]
            self.kv = KVStore(devices, b, self.max_len, heads, head_dim, adapter.dtype)
            self.mask_kind = adapter.mask_dtype()
        else:
            self.ssm = SSMStore(self.num_layers)
        self.head_states = SSMStore(len(exit_model.exit_layers)) if exit_model is not None else None
        if strategy == "catch_up":
            self.filled = [torch.full((b,), p, dtype=torch.long, device=dev) for _ in range(self.num_layers)]
            self.pending_hidden = torch.zeros(b, self.max_len, adapter.hidden_size, dtype=adapter.dtype, device=dev)

    # ---- one layer ------------------------------------------------------------------------
    def _mask(self, rows: Tensor, layer: int, start: int, end: int) -> Tensor | None:
        window = self.adapter.sliding_window(layer)
        needs_window = window is not None and end > window
        if not self.has_pad and not needs_window and (end - start == 1 or start == 0):
            return None  # HF passes no mask either: plain causal / single query
        return attention_mask(self.valid.index_select(0, rows), start, end, window=window,
                              kind=self.mask_kind, dtype=self.adapter.dtype)

    def run_layer(self, layer: int, h: Tensor, rows: Tensor, full: bool, col: int, rotary: Any,
                  masks: dict, positions: Tensor | None = None) -> Tensor:
        """Run ``layer`` for ``rows`` whose current token sits at column ``col``; h is (r, 1, d)."""
        self.layer_rows += rows.numel()
        adapter = self.adapter
        if adapter.kind == "ssm":
            if self.strategy == "catch_up":
                starts = self.filled[layer].index_select(0, rows)
                self.filled[layer].index_fill_(0, rows, col + 1)
                if int(starts.min()) < col:
                    return self._catch_up_ssm(layer, h, rows, col, starts)
            view = self.ssm.view(layer, None if full else rows)
            out = adapter.run_layer(layer, h, cache=view)
            view.commit()
            return out
        start = col
        if self.strategy == "catch_up":
            start = int(self.filled[layer].index_select(0, rows).min())
        if start < col:
            out = self._catch_up_layer(layer, h, rows, col, start)
        else:
            key = adapter.sliding_window(layer)
            if key not in masks:
                masks[key] = self._mask(rows, layer, col, col + 1)
            view = self.kv.view(layer, None if full else rows, col, col + 1)
            if positions is None:
                positions = self.pos.index_select(0, rows)[:, col:col + 1]
            out = adapter.run_layer(layer, h, cache=view, mask=masks[key], position_ids=positions, rotary=rotary)
        if self.strategy == "catch_up":
            self.filled[layer].index_fill_(0, rows, col + 1)
        return out

    def _catch_up_layer(self, layer: int, h: Tensor, rows: Tensor, col: int, start: int) -> Tensor:
        """Run ``layer`` on columns start..col: the pending tokens of ``rows`` and the current one."""
        adapter = self.adapter
        self.pending_hidden[rows, col] = h[:, 0].to(self.pending_hidden.device)
        win = self.pending_hidden[rows, start:col + 1]  # (r, w, d)
        posw = self.pos.index_select(0, rows)[:, start:col + 1]
        cols = torch.arange(start, col + 1, device=self.pending_hidden.device)
        write = cols[None, :] >= self.filled[layer].index_select(0, rows)[:, None]  # (r, w)
        mask = attention_mask(self.valid.index_select(0, rows), start, col + 1,
                              window=adapter.sliding_window(layer), kind=self.mask_kind, dtype=adapter.dtype)
        view = self.kv.view(layer, rows, start, col + 1, write)
        out = adapter.run_layer(layer, win, cache=view, mask=mask, position_ids=posw, rotary=adapter.rotary(win, posw))
        out = out.to(self.pending_hidden.device)
        self.pending_hidden[rows, start:col + 1] = torch.where(write[..., None], out, win)
        self.fill_rows += int(write.sum()) - rows.numel()
        return out[:, -1:]

    def _catch_up_ssm(self, layer: int, h: Tensor, rows: Tensor, col: int, starts: Tensor) -> Tensor:
        """Mamba: run ``layer`` on each row's pending tokens (columns starts[r]..col-1, from the
        hidden states they left the layer below with) and the current one, continuing its states.
        One ragged ``mamba_chunk`` pass serves every row: a row with fewer pending tokens is
        padded on the left, and padding leaves its states as they were."""
        self.pending_hidden[rows, col] = h[:, 0].to(self.pending_hidden.device)
        conv, ssm = self.ssm.conv[layer], self.ssm.ssm[layer]
        block, dev = self.adapter.layers()[layer], self.adapter.layer_device(layer)
        start = int(starts.min())
        win = self.pending_hidden[rows, start:col + 1]  # (r, w, d)
        lead = starts - start
        y, convs, ssms = mamba_chunk(block, win.to(dev), conv.index_select(0, rows), ssm.index_select(0, rows),
                                     lead=lead if bool((lead > 0).any()) else None)
        conv.index_copy_(0, rows, convs[-1])
        ssm.index_copy_(0, rows, ssms[-1])
        cols = torch.arange(start, col + 1, device=self.pending_hidden.device)
        write = cols[None, :] >= starts.to(cols.device)[:, None]  # (r, w): each row's own columns
        self.pending_hidden[rows, start:col + 1] = torch.where(write[..., None], y.to(win.device, win.dtype), win)
        self.fill_rows += int((col - starts).sum())
        return y[:, -1:]  # in the dtype the block returns (as the one-token path)

    # ---- what skipped layers store ---------------------------------------------------------
    def fill(self, k: int, rows: Tensor, col: int, h: Tensor) -> None:
        """Rows ``rows`` exited after ``k`` layers with hidden state h (n, 1, d) at column ``col``."""
        adapter, n = self.adapter, rows.numel()
        if self.strategy == "copy_kv":
            for layer in range(k, self.num_layers):
                self.kv.copy_columns(k - 1, layer, rows, col)
        elif self.strategy == "propagate":
            rotary = adapter.rotary(h, self.pos.index_select(0, rows)[:, col:col + 1])
            for layer in range(k, self.num_layers):
                key, value = adapter.project_kv(layer, h, rotary)
                self.kv.write(layer, rows, col, key, value)
            self.fill_rows += n * (self.num_layers - k)
        elif self.strategy == "catch_up":
            self.pending_hidden[rows, col] = h[:, 0].to(self.pending_hidden.device)
        elif self.strategy == "update":
            for layer in range(k, self.num_layers):
                view = self.ssm.view(layer, rows)
                adapter.run_layer(layer, h, cache=view)
                view.commit()
            self.fill_rows += n * (self.num_layers - k)
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
        adapter, p = self.adapter, self.prompt_len
        pos = self.pos[:, :p]
        h = adapter.embed(ids, pos)
        rotary = adapter.rotary(h, pos)
        mask2d = attn if self.has_pad else None
        for layer in range(self.num_layers):
            if adapter.kind == "ssm":
                view = self.ssm.view(layer, None)
                h = adapter.run_layer(layer, h, cache=view, mask=mask2d)
            else:
                view = self.kv.view(layer, None, 0, p)
                rows = torch.arange(self.batch_size, device=self.valid.device)
                h = adapter.run_layer(layer, h, cache=view, mask=self._mask(rows, layer, 0, p), position_ids=pos,
                                 rotary=rotary)
            view.commit()
            e = self.exit_of_layer.get(layer + 1)
            if e is not None and self.exit_model.heads[e].stateful:
                hv = self.head_states.view(e, None)
                self.exit_model.features(e, h, cache=hv, mask=mask2d)
                hv.commit()
        self.layer_rows += self.batch_size * self.num_layers
        return adapter.logits(h[:, -1:])[:, -1]

    def step(self, tokens: Tensor, alive: Tensor, col: int) -> tuple[Tensor, Tensor]:
        """Decode the token at column ``col`` of rows ``alive``: (r, V) logits and (r,) exit layers.

        The policy's state starts once for the step and follows the rows across this token's exits;
        rows that exit leave the running batch (``RunningRows``), their logits from their exit."""
        adapter = self.adapter
        r0 = alive.numel()
        full = r0 == self.batch_size
        positions = self.pos.index_select(0, alive)[:, col:col + 1]
        h = adapter.embed(tokens[:, None], positions)  # (r, 1, d)
        logits = torch.empty(r0, adapter.vocab_size, dtype=adapter.dtype, device=adapter.head_device)
        exit_at = torch.full((r0,), self.num_layers, dtype=torch.long, device=alive.device)
        running = RunningRows(r0, alive.device)
        carried: dict[str, Any] = {"rows": alive, "h": h, "rotary": adapter.rotary(h, positions), "positions": positions, "masks": {}}
        if self.exit_of_layer:
            carried["state"] = self.policy.start(r0, self.num_exits, device=alive.device)
        if self.records is not None:
            step_record: dict[str, Any] = {"rows": alive.clone(), "exits": {}}
            self.records.append(step_record)
        for layer in range(self.num_layers):
            rows = carried["rows"]
            carried["h"] = h = self.run_layer(layer, carried["h"], rows, full, col, carried["rotary"], carried["masks"],
                                              carried["positions"])
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
                    logits[original] = adapter.logits(feats.index_select(0, local.to(feats.device)))[:, -1]
                exit_at[original] = depth
                self.fill(depth, rows.index_select(0, local), col, h.index_select(0, local.to(h.device)))

            before = len(running)
            carried = running.leave(exits, write, carried)
            full = full and len(running) == before
            if not len(running):
                break
        if len(running):
            logits[running.index] = adapter.logits(carried["h"])[:, -1]
        return logits, exit_at


    # ---- continuous batching: rows join and leave between steps ------------------------------
    def _column_tensors(self) -> list[tuple[str, int]]:
        """(attribute, column dim) of every per-row tensor indexed by column."""
        return [("valid", 1), ("pos", 1)] + ([("pending_hidden", 1)] if self.strategy == "catch_up" else [])

    def _stores(self) -> list[Any]:
        return [s for s in (getattr(self, "ssm", None), self.head_states) if s is not None]

    def pad_columns(self, left: int, right: int) -> None:
        """Add ``left`` padding columns before the row data (nothing there: masked out) and
        ``right`` columns after (room for more tokens, positions continuing each row's)."""
        if left == right == 0:
            return
        b = self.batch_size
        for name, dim in self._column_tensors():
            t = getattr(self, name)
            shape = list(t.shape)
            shape[dim] = left
            before = torch.zeros(shape, dtype=t.dtype, device=t.device)
            shape[dim] = right
            if name == "pos":
                after = t[:, -1:] + torch.arange(1, right + 1, device=t.device)[None]
            elif name == "valid":
                after = torch.full(shape, self.future_valid, dtype=t.dtype, device=t.device)
            else:
                after = torch.zeros(shape, dtype=t.dtype, device=t.device)
            setattr(self, name, torch.cat([before, t, after], dim=dim))
        if self.adapter.kind == "attention":
            for bufs in (self.kv.keys, self.kv.values):
                for i, t in enumerate(bufs):
                    heads, hd = t.shape[1], t.shape[3]
                    bufs[i] = torch.cat([t.new_zeros(b, heads, left, hd), t, t.new_zeros(b, heads, right, hd)], dim=2)
            self.kv.max_len += left + right
        if self.strategy == "catch_up":
            self.filled = [f + left for f in self.filled]
        self.max_len += left + right
        self.prompt_len += left
        self.has_pad = self.has_pad or left > 0

    def merge(self, other: DecodeRun, col: int, other_col: int) -> int:
        """Take the rows of ``other`` (a run of the same model and settings, prefilled) into this
        run: this run's next token goes to column ``col``, ``other``'s to ``other_col``; both are
        padded to one column (left) and one length (right). Returns the merged next column."""
        target = max(col, other_col)
        self.pad_columns(target - col, 0)
        other.pad_columns(target - other_col, 0)
        length = max(self.max_len, other.max_len)
        self.pad_columns(0, length - self.max_len)
        other.pad_columns(0, length - other.max_len)
        for name, _ in self._column_tensors():
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        if self.adapter.kind == "attention":
            for mine, theirs in ((self.kv.keys, other.kv.keys), (self.kv.values, other.kv.values)):
                for i in range(len(mine)):
                    mine[i] = torch.cat([mine[i], theirs[i].to(mine[i].device)])
            self.kv.batch += other.batch_size
        for mine, theirs in zip(self._stores(), other._stores()):
            for name in ("conv", "ssm"):
                a, b = getattr(mine, name), getattr(theirs, name)
                setattr(mine, name, [y if x is None else x if y is None else torch.cat([x, y.to(x.device)])
                                     for x, y in zip(a, b)])
        if self.strategy == "catch_up":
            self.filled = [torch.cat([a, b]) for a, b in zip(self.filled, other.filled)]
        self.batch_size += other.batch_size
        self.has_pad = self.has_pad or other.has_pad
        for name in ("layer_rows", "fill_rows", "head_rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return target

    def keep_rows(self, rows: Tensor, col: int) -> int:
        """Keep only ``rows`` (their order), then drop the leading columns no kept row uses; returns
        the next column after that cut."""
        for name, _ in self._column_tensors():
            setattr(self, name, getattr(self, name).index_select(0, rows.to(getattr(self, name).device)))
        if self.adapter.kind == "attention":
            for bufs in (self.kv.keys, self.kv.values):
                for i, t in enumerate(bufs):
                    bufs[i] = t.index_select(0, rows.to(t.device))
            self.kv.batch = rows.numel()
        for store in self._stores():
            for name in ("conv", "ssm"):
                setattr(store, name, [None if t is None else t.index_select(0, rows.to(t.device))
                                      for t in getattr(store, name)])
        if self.strategy == "catch_up":
            self.filled = [f.index_select(0, rows.to(f.device)) for f in self.filled]
        self.batch_size = rows.numel()
        if not self.batch_size:
            return col
        used = self.valid[:, :col].any(0).nonzero()
        cut = int(used[0, 0]) if used.numel() else col
        if cut:
            for name, dim in self._column_tensors():
                setattr(self, name, getattr(self, name).narrow(dim, cut, getattr(self, name).shape[dim] - cut))
            if self.adapter.kind == "attention":
                for bufs in (self.kv.keys, self.kv.values):
                    for i, t in enumerate(bufs):
                        bufs[i] = t[:, :, cut:].contiguous()
                self.kv.max_len -= cut
            if self.strategy == "catch_up":
                self.filled = [f - cut for f in self.filled]
            self.max_len -= cut
            self.prompt_len = max(self.prompt_len - cut, 0)
        self.has_pad = bool((~self.valid[:, :col - cut]).any())
        return col - cut


def check_inputs(adapter: DecoderAdapter, ids: Tensor, attn: Tensor, max_new: int, strategy: str) -> None:
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
