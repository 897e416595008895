"""Exit heads: classifiers (``classifier``), the halting layer (``halting``: PonderNet, PALBERT's
Lambda), JEI-DNN gates (``gate``) and a decoder's token exit heads (``lm``, ``mamba_head``),
registered by type in ``LM_HEADS``."""

from __future__ import annotations

from typing import Any

from offramp.heads.lm import BlockHead, FFNHead, LMExitHead, TiedHead
from offramp.heads.mamba_head import MambaExitHead

LM_HEADS: dict[str, type[LMExitHead]] = {"tied": TiedHead, "ffn": FFNHead, "block": BlockHead, "mamba": MambaExitHead}


def build_lm_head(kind: str, hidden_size: int, **kwargs: Any) -> LMExitHead:
    """A token exit head of type ``kind`` (one of ``LM_HEADS``)."""
    if kind not in LM_HEADS:
        raise ValueError(f"unknown exit head type {kind!r}; choose one of {sorted(LM_HEADS)}")
    return LM_HEADS[kind](hidden_size, **kwargs)


__all__ = ["LM_HEADS", "LMExitHead", "build_lm_head"]
