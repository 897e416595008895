"""Backbone adapters, one registry keyed by Hugging Face ``model_type``. Only adapters touch HF internals.

Each adapter class lists the ``model_types`` it serves and its ``role``: "encoder" (layer-by-layer
classification with row compaction) or "decoder" (token-level exits in ``offramp.engines.generate``).
Adding a backbone is one adapter file plus one line in ``_ADAPTER_CLASSES``.
"""

from __future__ import annotations

from torch import nn

from offramp.backbones.albert import AlbertAdapter
from offramp.backbones.base import EncoderAdapter
from offramp.backbones.bert import BertAdapter
from offramp.backbones.decoder import DecoderAdapter
from offramp.backbones.distilbert import DistilBertAdapter
from offramp.backbones.gemma3 import Gemma3Adapter
from offramp.backbones.gpt2 import GPT2Adapter
from offramp.backbones.llama import LlamaAdapter
from offramp.backbones.mamba import Mamba2Adapter, MambaAdapter
from offramp.backbones.mpnet import MPNetAdapter
from offramp.backbones.vit import ViTAdapter  # images as flattened pixel values in place of input_ids

_ADAPTER_CLASSES: tuple[type, ...] = (BertAdapter, MPNetAdapter, DistilBertAdapter, AlbertAdapter, ViTAdapter,
                                      LlamaAdapter, Gemma3Adapter, GPT2Adapter, MambaAdapter, Mamba2Adapter)
ADAPTERS: dict[str, type] = {name: cls for cls in _ADAPTER_CLASSES for name in cls.model_types}
ROLE_USE = {"encoder": "a classifier with exits (EarlyExitModel, offramp train)",
            "decoder": "token exits for generation (DecoderExitModel, offramp fit-exits)"}


def adapter_for(model: nn.Module, role: str | None = None):
    """The adapter for a HF model, by its ``config.model_type``; ``role`` ("encoder" / "decoder")
    refuses a backbone of the other kind with a message saying what it can be used for."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None or (role is not None and cls.role != role):
        known = sorted(n for n, c in ADAPTERS.items() if role is None or c.role == role)
        what = f"{role} " if role else ""
        hint = f"; a {model_type!r} model is a {cls.role}: use it for {ROLE_USE[cls.role]}" if cls is not None else \
            ". Add an adapter in offramp/backbones/ and a line in _ADAPTER_CLASSES"
        raise ValueError(f"unsupported {what}model_type {model_type!r} (supported: {', '.join(known)}){hint}")
    return cls(model)


__all__ = ["ADAPTERS", "DecoderAdapter", "EncoderAdapter", "adapter_for"]
