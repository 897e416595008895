"""A KV cache over chains of different lengths that join, leave and fork: the batched reasoning cache.

HF's ``DynamicCache`` holds (b, heads, T, head_dim) keys and values per layer and appends to all
rows at once. Chains in a batch have different prompt and chain lengths, so ``RowCache`` keeps the
rows right-aligned (left padding) with a (b, T) mask of real columns and each row's next position,
and passes both to the model (``attention_mask``, ``position_ids``), which is how HF's own batched
``generate`` runs left-padded prompts. On top of that it can

* ``keep`` rows (finished chains leave), ``merge`` caches (new chains join; the narrower side is
  padded on the left) and ``trim`` columns that are padding in every row;
* ``fork`` a prefix of each of some rows into a new cache (the forced answers at cue events),
  copying the cached prefix instead of re-encoding it.

Only full-attention caches are supported: a sliding-window or recurrent layer keeps a state that
left padding would change.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_layers(cache) -> None:
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False) or getattr(layer, "is_linear", False) or not hasattr(layer, "keys"):
            raise ValueError(f"cache layer {i} is {type(layer).__name__}: chains of thought run on models whose every "
                             "layer is full attention (a sliding-window or recurrent state cannot be padded or forked)")


class RowCache:
    """Rows of a batch in one ``DynamicCache``, right-aligned.

    Attributes:
        cache: the HF ``DynamicCache`` (its layers' ``keys``/``values`` are (b, heads, T, head_dim)).
        mask: (b, T) long, 1 where a column holds one of the row's tokens.
        pos: (b,) long, the position id the row's next token gets (its number of real tokens).
    """

    def __init__(self, cache, mask: Tensor, pos: Tensor) -> None:
        self.cache, self.mask, self.pos = cache, mask, pos

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty_like(cls, model) -> "RowCache":
        from transformers import DynamicCache

        device = input_device(model)
        return cls(DynamicCache(config=model.config), torch.zeros(0, 0, dtype=torch.long, device=device),
                   torch.zeros(0, dtype=torch.long, device=device))

    @classmethod
    def from_tensors(cls, model, keys: list[Tensor], values: list[Tensor], mask: Tensor) -> "RowCache":
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k, v, i)
        _check_layers(cache)
        return cls(cache, mask, mask.sum(1))

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (the mask and positions live there too)."""
        return self.mask.device

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def _kv(self) -> tuple[list[Tensor], list[Tensor]]:
        return [layer.keys for layer in self.cache.layers], [layer.values for layer in self.cache.layers]

    # ------------------------------------------------------------------ the model step
    def step(self, model, tokens: Tensor, token_mask: Tensor | None = None, **kwargs):
        """Run ``tokens`` (b, w) after each row's cached tokens; ``token_mask`` (b, w) marks the real
        ones (padding only on the left of the block). Returns the model output; the cache grows by w."""
        b, w = tokens.shape
        if b != self.batch and self.width:
            raise ValueError(f"{b} rows of tokens for a cache of {self.batch} rows")
        tokens = tokens.to(self.device)
        token_mask = torch.ones(b, w, dtype=torch.long, device=self.device) if token_mask is None \
            else token_mask.to(self.device).long()
        mask = torch.cat([self.mask, token_mask], 1) if self.width else token_mask
        pos = self.pos[:, None] + token_mask.cumsum(1) - 1 if self.width else token_mask.cumsum(1) - 1
        out = model(input_ids=tokens, attention_mask=mask, position_ids=pos.clamp(min=0), cache=self.cache,
                    use_cache=True, **kwargs)
        if not self.width:
            _check_layers(self.cache)
        self.mask = mask
        self.pos = (pos[:, -1] + 1) if w else self.pos
        return out

    # ------------------------------------------------------------------ rows
    def keep(self, rows: list[int]) -> "RowCache":
        """Keep only ``rows``, in that order (in place), and trim the padding no row needs any more."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx.to(layer.keys.device))
            layer.values = layer.values.index_select(0, idx.to(layer.values.device))
        self.mask, self.pos = self.mask.index_select(0, idx), self.pos.index_select(0, idx)
        return self.trim()

    def pad_left(self, n: int) -> None:
        """Add ``n`` padding columns on the left of every row."""
        if n <= 0:
            return
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], 2))
        self.mask = torch.cat([self.mask.new_zeros(self.batch, n), self.mask], 1)

    def trim(self) -> "RowCache":
        """Drop the leading columns that are padding in every row."""
        if not self.batch:
            return self
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else self.width
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]
        return self

    def merge(self, other: "RowCache") -> "RowCache":
        """Append the rows of ``other`` below these (in place; ``other`` is consumed)."""
        if not self.batch:
            return other
        if not other.batch:
            return self
        self.pad_left(other.width - self.width)
        other.pad_left(self.width - other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys.to(mine.keys.device)], 0)
            mine.values = torch.cat([mine.values, theirs.values.to(mine.values.device)], 0)
        self.mask = torch.cat([self.mask, other.mask], 0)
        self.pos = torch.cat([self.pos, other.pos], 0)
        return self

    def fork(self, model, rows: list[int], lengths: list[int]) -> "RowCache":
        """A new cache of row ``rows[i]``'s first ``lengths[i]`` tokens, each (rows may repeat).

        A row's tokens are the last ``pos`` columns (they are contiguous), so a prefix is a slice."""
        if len(rows) != len(lengths):
            raise ValueError("fork needs one length per row")
        pos = self.pos.tolist()  # one transfer for every row's length
        for r, n in zip(rows, lengths):
            if not 1 <= n <= pos[r]:
                raise ValueError(f"fork length {n} is outside row {r}'s cached prefix (1..{pos[r]})")
        width = max(lengths)
        keys, values = self._kv()
        new_k, new_v = [], []
        for k, v in zip(keys, values):
            parts_k, parts_v = [], []
            for r, n in zip(rows, lengths):
                start = self.width - pos[r]
                pad = k.new_zeros(k.shape[1], width - n, k.shape[3])
                parts_k.append(torch.cat([pad, k[r, :, start:start + n]], 1))
                parts_v.append(torch.cat([pad, v[r, :, start:start + n]], 1))
            new_k.append(torch.stack(parts_k))
            new_v.append(torch.stack(parts_v))
        lengths_t = torch.tensor(lengths, device=self.device)
        mask = (torch.arange(width, device=self.device)[None] >= width - lengths_t[:, None]).long()
        return RowCache.from_tensors(model, new_k, new_v, mask)


def input_device(model) -> torch.device:
    """The device a causal LM takes its input ids on (its embedding's)."""
    return model.get_input_embeddings().weight.device


def left_pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """(ids, mask) of ragged token lists, left-padded to the longest, on the host (``RowCache.step``
    moves them to the model's device in one copy)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device="cpu")
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long, device="cpu")
            mask[i, width - len(s):] = 1
    return ids, mask
