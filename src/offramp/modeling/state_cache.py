"""Pooled backbone states kept on disk, shared by every command that runs a frozen backbone.

A frozen backbone maps the same token ids to the same pooled states, so `offramp train` (every
objective), `offramp collect` and the demo compute them once per model and data and reuse them.
The key is a hash of everything that decides the states: the backbone's weights (every tensor's
name, shape, dtype and bytes), the exit layers, the pooling, and the token ids and attention masks
of the batches in their order. Change any of them and the key changes; nothing stale can be read.
The files are safetensors under ``$OFFRAMP_CACHE/states/`` (default ``~/.cache/offramp/states/``),
written atomically; delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from offramp.data.assets import cache_dir
from offramp.utils import atomic_write_bytes, note, progress

if TYPE_CHECKING:
    from offramp.modeling import EarlyExitModel

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def default_root() -> Path:
    """``states/`` in the cache folder (``offramp.data.assets.cache_dir``), read when called."""
    return cache_dir() / "states"


def _update(h: "hashlib._Hash", t: Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def backbone_fingerprint(model: "EarlyExitModel") -> str:
    """A hash of the backbone's weights: equal exactly when every tensor is equal."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.backbone.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    return h.hexdigest()


def states_key(model: "EarlyExitModel", batches: Sequence[dict[str, Tensor]]) -> str:
    """The cache key of the pooled states of ``batches`` under ``model``'s frozen backbone."""
    h = hashlib.blake2b(digest_size=20)
    h.update(backbone_fingerprint(model).encode())
    h.update(repr((list(model.exit_layers), model.classifiers.pooling, model.backbone.config.model_type)).encode())
    for batch in batches:
        for k in INPUT_KEYS:
            if k in batch:
                h.update(k.encode())
                _update(h, batch[k])
    return h.hexdigest()


@torch.no_grad()
def pooled_batches(model: "EarlyExitModel", batches: Sequence[dict[str, Tensor]], *, desc: str,
                   show: bool = True, cache: bool | str | os.PathLike = True) -> list[Tensor]:
    """The pooled states (E, b, d) of each batch: read from the cache when this backbone has already
    run over these exact inputs, else computed (in eval mode) and stored.

    ``cache``: True (the default folder), a folder, or False (compute, store nothing)."""
    model.eval()
    path = None
    if cache is not False and len(batches):
        root = default_root() if cache is True else Path(cache)
        path = root / f"{states_key(model, batches)}.safetensors"
        if path.is_file():
            try:
                stored = load_file(str(path))
                out = [stored[f"b{i}"] for i in range(len(batches))]
                if all(o.shape[1] == b["input_ids"].shape[0] for o, b in zip(out, batches)):
                    note(f"{desc}: reusing the cached backbone states ({path})")
                    return out
            except Exception:  # a damaged cache file is recomputed and replaced, never trusted
                pass
    device = model.device
    out = [model.pooled_states(**{k: b[k].to(device) for k in INPUT_KEYS if k in b}).float().cpu()
           for b in progress(batches, desc=desc, enabled=show)]
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, save({f"b{i}": t.contiguous() for i, t in enumerate(out)}))
        except OSError as e:  # a read-only or full cache folder costs the reuse, not the run
            note(f"{desc}: could not store the backbone states in {path.parent} ({e}); continuing without")
    return out


def state_cache_setting(value: str | None) -> bool | str:
    """The ``state_cache`` argument of the library calls from ``--state-cache``: None (not given)
    keeps states in the default folder, "off" (or no, none, false, 0) keeps none, else a folder."""
    if value is None:
        return True
    return False if value.strip().lower() in ("off", "no", "none", "false", "0") else value
