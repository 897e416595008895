"""Row compaction, written once: decide, write the rows that leave, keep running the rest.

Every engine (classify, generate, the replay of a stored trace) runs a batch whose rows leave at
different exits. After an exit's decision the rows that leave are written to the output and the
running tensors (hidden states, masks, caches' row views, policy state, ...) are cut down to the
rows that stay, in one place, so the bookkeeping cannot drift apart between engines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
        """Apply one exit decision ((r,) bool); returns ``carried`` cut to the rows that stay. The
        decision reaches the host once (how many rows leave); the rows are found on the device."""
        leaving = int(exits.sum())  # the one host synchronisation of a decision
        if not leaving:
            return carried
        if leaving == exits.shape[0]:  # every row leaves (always so at batch 1): nothing to sort or cut
            if write is not None:
                write(torch.arange(leaving, device=exits.device), self.index)
            self.index = self.index[:0]
            return {k: None for k in carried}
        order = torch.argsort(exits.to(torch.int8), stable=True)  # the rows that stay, then those that leave
        stay = exits.shape[0] - leaving
        keep, local = order[:stay], order[stay:]
        if write is not None:
            write(local, self.index[local.to(self.index.device)])
        self.index = self.index[keep.to(self.index.device)]
        if keep.numel() == 0:
            return {k: None for k in carried}
        return {k: select_rows(v, keep) for k, v in carried.items()}
