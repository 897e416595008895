"""Per-row cache storage for token-level exits, and the views that HF layers write through.

HF's ``DynamicCache`` appends to all rows of a batch at once. With per-row exits, row 3 may run
layer 20 for this token while row 5 stopped at layer 12, and what layer 20 stores for row 5 depends
on the cache strategy. So the engine keeps preallocated buffers (one per layer, on that layer's
device) and gives each layer call a view on the rows it runs that implements the methods HF layer
modules call on a ``transformers.Cache``:

- attention: ``update(keys, values, layer_idx, ...)`` writes the new keys/values at the view's
  columns (optionally only where ``write_mask`` is set) and returns the keys/values of those rows
  for columns ``0 .. end-1``;
- Mamba: ``get_conv_state`` / ``update_conv_state`` / ``get_recurrent_state`` /
  ``update_recurrent_state`` / ``is_recording_past`` on per-row states; HF updates decode states
  in place, so a view on a subset gathers them and ``commit`` scatters them back.

Rows are aligned by left padding: every row writes the token of a step at the same column.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVStore:
    """Key/value buffers (b, heads, max_len, head_dim) for every attention layer.

    Args:
        devices: one device per layer.
        batch: number of rows.
        max_len: columns to allocate (prompt + new tokens).
        heads, head_dim: key/value heads and their size.
        dtype: buffer dtype.
    """

    def __init__(self, devices: list[torch.device], batch: int, max_len: int, heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.batch = batch
        self.max_len = max_len

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def view(self, layer: int, rows: Tensor | None, start: int, end: int,
             write_mask: Tensor | None = None) -> "KVView":
        """A cache view for layer ``layer`` on ``rows`` (None = all rows) writing columns start..end-1."""
        return KVView(self, layer, rows, start, end, write_mask)

    def write(self, layer: int, rows: Tensor | None, start: int, keys: Tensor, values: Tensor,
              write_mask: Tensor | None = None) -> None:
        """Store keys/values (r, heads, w, head_dim) at columns start..start+w-1 of ``rows``.

        ``write_mask`` (r, w) keeps the stored value where it is False.
        """
        end = start + keys.shape[2]
        for buf, new in ((self.keys[layer], keys), (self.values[layer], values)):
            new = new.to(buf.device, buf.dtype)
            slab = buf[:, :, start:end]
            if write_mask is not None:
                old = slab if rows is None else slab.index_select(0, rows)
                new = torch.where(write_mask.to(buf.device)[:, None, :, None], new, old)
            if rows is None:
                slab.copy_(new)
            else:
                slab.index_copy_(0, rows.to(buf.device), new)

    def read(self, layer: int, rows: Tensor | None, end: int) -> tuple[Tensor, Tensor]:
        """Keys and values of ``rows`` for columns 0..end-1: (r, heads, end, head_dim) each."""
        k, v = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        if rows is None:
            return k, v
        rows = rows.to(k.device)
        return k.index_select(0, rows), v.index_select(0, rows)

    def copy_columns(self, src: int, dst: int, rows: Tensor, col: int) -> None:
        """DYNAMAX fill: layer ``dst`` gets layer ``src``'s key/value of ``rows`` at column ``col``."""
        for bufs in (self.keys, self.values):
            value = bufs[src][:, :, col].index_select(0, rows.to(bufs[src].device))
            bufs[dst][:, :, col].index_copy_(0, rows.to(bufs[dst].device), value.to(bufs[dst].device))


class KVView:
    """What an HF attention module sees as its ``cache`` for one layer call."""

    def __init__(self, store: KVStore, layer: int, rows: Tensor | None, start: int, end: int,
                 write_mask: Tensor | None) -> None:
        self.store, self.layer, self.rows = store, layer, rows
        self.start, self.end, self.write_mask = start, end, write_mask

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int | None = None,
               *args, **kwargs) -> tuple[Tensor, Tensor]:
        assert key_states.shape[2] == self.end - self.start, "view columns and key length disagree"
        self.store.write(self.layer, self.rows, self.start, key_states, value_states, self.write_mask)
        return self.store.read(self.layer, self.rows, self.end)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def commit(self) -> None:
        """Nothing to do: writes go straight to the store."""


class SSMStore:
    """Conv and recurrent states of every Mamba layer (or of Mamba exit heads), per row."""

    def __init__(self, num_layers: int) -> None:
        self.conv: list[Tensor | None] = [None] * num_layers
        self.ssm: list[Tensor | None] = [None] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self.conv)

    def view(self, layer: int, rows: Tensor | None) -> "SSMView":
        return SSMView(self, layer, rows)

    def snapshot(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        """Copies of the states of ``layer`` (for tests and the "freeze" check)."""
        c, s = self.conv[layer], self.ssm[layer]
        return (None if c is None else c.clone()), (None if s is None else s.clone())


class SSMView:
    """What an HF Mamba mixer sees as its ``cache`` for one layer call on ``rows``."""

    def __init__(self, store: SSMStore, layer: int, rows: Tensor | None) -> None:
        self.store, self.layer, self.rows = store, layer, rows
        self._conv = self._gather(store.conv[layer])
        self._ssm = self._gather(store.ssm[layer])

    def _gather(self, state: Tensor | None) -> Tensor | None:
        if state is None or self.rows is None:
            return state
        return state.index_select(0, self.rows.to(state.device))

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> Tensor | None:
        return self._conv

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> Tensor | None:
        return self._ssm

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def update_conv_state(self, conv_states: Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> Tensor:
        """Multi-token call (prefill): keep the last ``conv_kernel_size`` inputs, return the full window."""
        kernel = conv_kernel_size or conv_states.shape[-1]
        if self._conv is None:
            full = conv_states
            if full.shape[-1] < kernel:
                full = torch.nn.functional.pad(full, (kernel - full.shape[-1], 0))
        else:
            full = torch.cat([self._conv, conv_states], dim=-1)
        self._conv = full[..., -kernel:].clone()
        return full

    def update_recurrent_state(self, recurrent_states: Tensor, layer_idx: int | None = None,
                               state_idx: int = 0, **kwargs) -> Tensor:
        self._ssm = recurrent_states
        return recurrent_states

    def commit(self) -> None:
        """Write the (possibly in-place updated) states of the view's rows back to the store."""
        for name, state in (("conv", self._conv), ("ssm", self._ssm)):
            if state is None:
                continue
            states = getattr(self.store, name)
            if self.rows is None or states[self.layer] is None:
                assert self.rows is None, "a partial-row call before the states exist"
                states[self.layer] = state
            else:
                states[self.layer].index_copy_(0, self.rows.to(state.device), state)


def attention_mask(valid: Tensor, start: int, end: int, *, window: int | None, kind: str,
                   dtype: torch.dtype) -> Tensor:
    """Mask (r, 1, end-start, end) for queries at columns start..end-1 over keys 0..end-1.

    Args:
        valid: (r, >= end) bool, False at left-padding columns.
        window: sliding-window size (keys with q - k >= window are hidden), None for full.
        kind: "bool" (True = attend, for SDPA) or "float" (additive, for eager attention).
    """
    device = valid.device
    k = torch.arange(end, device=device)
    q = torch.arange(start, end, device=device)
    allowed = (k[None, :] <= q[:, None])[None] & valid[:, None, :end]  # (r, w, end)
    if window is not None:
        allowed = allowed & (k[None, :] > q[:, None] - window)[None]
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))
