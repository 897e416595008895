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
    known = head_options(kind)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"head: unknown key{'s' if len(unknown) > 1 else ''} {unknown} for a {kind!r} exit head; "
                         f"it takes {['type', *known]}")
    for name, value in kwargs.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 16):
            raise ValueError(f"head.{name} must be an integer in [1, 65536], got {value!r}")
    return LM_HEADS[kind](hidden_size, **kwargs)


def head_options(kind: str) -> list[str]:
    """The settings an exit head type takes besides its width (``intermediate_size`` of "block", ...)."""
    import inspect

    params = inspect.signature(LM_HEADS[kind]).parameters
    return [n for n, p in params.items() if n != "hidden_size" and p.kind == p.POSITIONAL_OR_KEYWORD]


__all__ = ["LM_HEADS", "LMExitHead", "build_lm_head", "head_options"]
