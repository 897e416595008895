"""The encoder adapter interface: run a Hugging Face encoder one layer at a time.

Only adapters touch HF internals. An adapter wraps the HF *base* model (``BertModel``, ...) and
exposes: the embeddings, a per-batch context (attention mask and any per-row extras such as
MPNet's relative position bias) whose tensors all have the batch on dim 0 so rows can be dropped,
one layer at a time, and the model's pooler if it has one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

LayerContext = dict[str, Tensor | None]


class EncoderAdapter:
    """Layer-by-layer access to a HF encoder. Subclasses implement the model-specific parts.

    Attributes:
        role: "encoder" (classification with row compaction, ``offramp.engines.classify``).
        model_types: the HF ``model_type`` values this adapter serves (``offramp.backbones.ADAPTERS``).
        kind, gated_mlp: the block's shape for FLOPs counting.
    """

    role: ClassVar[str] = "encoder"
    kind: ClassVar[str] = "attention"
    model_types: ClassVar[tuple[str, ...]] = ()
    gated_mlp: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- what every adapter provides ------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def layer_module(self, i: int) -> nn.Module:
        """The module that runs layer ``i`` (0-based); ALBERT returns the same shared module."""
        raise NotImplementedError

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:  # (b, t, d)
        raise NotImplementedError

    def pooler(self) -> nn.Module | None:
        """The backbone's own pooler on the hidden states (first token), or None."""
        return None

    # -- shared machinery -----------------------------------------------------------------------
    def context(self, hidden: Tensor, attention_mask: Tensor) -> LayerContext:
        """Per-batch tensors the layers need; every tensor has the batch on dim 0."""
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        if mask is not None and mask.shape[0] != hidden.shape[0]:
            mask = mask.expand(hidden.shape[0], *mask.shape[1:])
        return {"mask": mask}

    def run_layer(self, i: int, hidden: Tensor, ctx: LayerContext) -> Tensor:  # (b, t, d) -> (b, t, d)
        out = self.layer_module(i)(hidden, ctx["mask"])
        return out[0] if isinstance(out, tuple) else out

    def layer_modules(self) -> list[nn.Module]:
        """The distinct modules that run layers (for forward hooks)."""
        seen: list[nn.Module] = []
        for i in range(self.num_layers):
            m = self.layer_module(i)
            if all(m is not s for s in seen):
                seen.append(m)
        return seen


def first_token(hidden: Tensor) -> Tensor:  # (b, t, d) -> (b, d)
    return hidden[:, 0]


def masked_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:  # (b, t, d), (b, t) -> (b, d)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def check_ids(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Validate a batch and return its attention mask (all ones if None)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got {getattr(input_ids, 'shape', input_ids)}")
    if input_ids.shape[0] == 0:
        raise ValueError("empty batch: input_ids has 0 rows; pass at least one input")
    if input_ids.shape[1] == 0:
        raise ValueError("empty input: input_ids has 0 tokens; every text must have at least one token")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if (attention_mask.sum(1) == 0).any():
        raise ValueError("a row of attention_mask is all zeros (an empty input); every row needs a token")
    return attention_mask
