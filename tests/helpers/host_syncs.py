"""Count the host synchronisations an engine makes, on any device, the CPU included.

On a GPU, a tensor value that reaches Python (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``,
``.cpu()``, ``.numpy()``) or an op whose output shape depends on the values (``nonzero``, boolean
indexing, ``masked_select``, ``unique``) waits for every queued kernel. ``HostSyncs`` records each
such call made while it is active, with the offramp line that made it, through torch's function
mode, so a CPU test can hold an engine to the number of synchronisations it documents.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode

SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
           "masked_select", "unique", "unique_consecutive", "argwhere", "equal"}


class HostSyncs(TorchFunctionMode):
    """``with HostSyncs() as s: ...``; ``s.total`` and ``s.where`` ({(op, "file:line"): count})."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        syncs = name in SYNCING
        if name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            syncs = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
            name = "boolean index" if syncs else name
        if syncs:
            frames = [f for f in traceback.extract_stack()[:-1] if "/offramp/" in f.filename.replace("\\", "/")]
            where = f"{frames[-1].filename.rsplit('offramp/', 1)[-1]}:{frames[-1].lineno}" if frames else "test"
            self.where[(name, where)] += 1
        return func(*args, **kwargs)
