"""Row compaction, written once: decide, write the rows that leave, keep running the rest.

Every engine (classify, generate, the replay of a stored trace) runs a batch whose rows leave at
different exits. After an exit's decision the rows that leave are written to the output and the
running tensors (hidden states, masks, caches' row views, policy state, ...) are cut down to the
rows that stay, in one place, so the bookkeeping cannot drift apart between engines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor


def select_rows(obj: Any, rows: Tensor) -> Any:
    """Rows ``rows`` of ``obj``: a tensor (dim 0), None, an object with ``select(rows)`` (policy
    state, gate state), or a dict / tuple / list of those (layer context, rotary tables)."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        return obj.index_select(0, rows.to(obj.device))
    if hasattr(obj, "select") and not isinstance(obj, (dict, tuple, list)):
        return obj.select(rows)
    if isinstance(obj, dict):
        return {k: select_rows(v, rows) for k, v in obj.items()}
    return type(obj)(select_rows(v, rows) for v in obj)


class RunningRows:
    """The rows of a batch still running, by their original row number.

    ``leave(exits, write, carried)``: ``write(local, original)`` is called with the positions (in
    the running batch) and original numbers of the rows that exit; then the running set and every
    carried object keep only the rows that stay. Nothing is copied when no row exits.
    """

    def __init__(self, batch_size: int, device: torch.device | str = "cpu", rows: Tensor | None = None) -> None:
        self.index = torch.arange(batch_size, device=device) if rows is None else rows

    def __len__(self) -> int:
        return int(self.index.numel())

    def leave(self, exits: Tensor, write: Callable[[Tensor, Tensor], None] | None,
              carried: dict[str, Any]) -> dict[str, Any]:
        """Apply one exit decision ((r,) bool); returns ``carried`` cut to the rows that stay."""
        if not bool(exits.any()):
            return carried
        if write is not None:
            local = exits.nonzero()[:, 0]
            write(local, self.index[local.to(self.index.device)])
        keep = (~exits).nonzero()[:, 0]
        self.index = self.index[keep.to(self.index.device)]
        if keep.numel() == 0:
            return {k: None for k in carried}
        return {k: select_rows(v, keep) for k, v in carried.items()}


# ------------------------------------------------------------------------------------- row keys
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wraps mod 2**64): a well-spread hash of each value."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def row_keys(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """A stable 63-bit identity of each row (b,) int64: a hash of its unpadded token ids in order.

    The same text gives the same key in any batch, at any position and with any padding (left or
    right), so a policy that draws random numbers per row (``ponder_sample``) can key them on it and
    take the same exits online and on a stored trace."""
    ids = input_ids.detach().cpu().numpy().astype(np.uint64)
    mask = (np.ones(ids.shape, dtype=bool) if attention_mask is None
            else attention_mask.detach().cpu().numpy().astype(bool))
    pos = np.cumsum(mask, axis=1, dtype=np.uint64) - np.uint64(1)  # position among the row's real tokens
    with np.errstate(over="ignore"):
        token = _mix64(ids * np.uint64(0x9E3779B97F4A7C15) + pos * np.uint64(0xD1B54A32D192ED03) + np.uint64(1))
        h = np.where(mask, token, np.uint64(0)).sum(axis=1, dtype=np.uint64)
        h = _mix64(h + mask.sum(axis=1).astype(np.uint64) * np.uint64(0x8CB92BA72F3D8DD7))
    return torch.from_numpy((h >> np.uint64(1)).astype(np.int64)).to(input_ids.device)


def keyed_uniform(keys: Tensor, seed: int, index: int) -> Tensor:
    """(b,) float64 uniforms in [0, 1), a function of (row key, seed, exit index) only."""
    k = keys.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        salt = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + index * 0xC2B2AE3D27D4EB4F + 0x165667B19E3779F9)
                                & _MASK64], dtype=np.uint64))
        x = _mix64(k ^ salt)
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / float(1 << 53)).to(keys.device)
