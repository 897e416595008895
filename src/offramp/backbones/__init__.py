"""Backbone adapters keyed by Hugging Face ``model_type``. Only adapters touch HF internals.

``ADAPTERS``: encoders (layer-by-layer classification with row compaction);
``DECODER_ADAPTERS``: decoder-only LMs and Mamba (token-level exits in ``engines/generate.py``).
"""

from __future__ import annotations

from torch import nn

from offramp.backbones.albert import AlbertAdapter
from offramp.backbones.base import EncoderAdapter
from offramp.backbones.bert import BertAdapter
from offramp.backbones.decoder import DECODER_ADAPTERS
from offramp.backbones.decoder import adapter_for as decoder_adapter_for
from offramp.backbones.distilbert import DistilBertAdapter
from offramp.backbones.mpnet import MPNetAdapter
from offramp.backbones.vit import ViTAdapter

ADAPTERS: dict[str, type[EncoderAdapter]] = {
    "bert": BertAdapter,
    "roberta": BertAdapter,
    "xlm-roberta": BertAdapter,
    "electra": BertAdapter,
    "mpnet": MPNetAdapter,
    "distilbert": DistilBertAdapter,
    "albert": AlbertAdapter,
    "vit": ViTAdapter,  # images as flattened pixel values in place of input_ids (see backbones/vit.py)
}


def adapter_for(model: nn.Module) -> EncoderAdapter:
    """The encoder adapter for a HF base model, by its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported encoder model_type {model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "DECODER_ADAPTERS", "EncoderAdapter", "adapter_for", "decoder_adapter_for"]
