"""Gemma 3 text decoders (``gemma3_text``; the text tower of ``gemma3``): scaled embeddings,
sliding-window and full-attention layers with their own rotary bases, q/k norms, logit softcap."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from offramp.backbones.decoder import text_config
from offramp.backbones.llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    """Adapter for ``Gemma3ForCausalLM`` (text-only Gemma 3): Llama's layer calls, its own layout."""

    model_types = ("gemma3_text", "gemma3")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.config = text_config(model.config)

    def _text_model(self) -> nn.Module:
        inner = self.model.model
        return getattr(inner, "language_model", inner)

    def layers(self) -> nn.ModuleList:
        return self._text_model().layers

    def final_norm(self) -> nn.Module:
        return self._text_model().norm

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        emb = self._text_model().embed_tokens  # scales by sqrt(hidden) itself
        return emb(input_ids.to(emb.weight.device))

    def softcap(self, logits: Tensor) -> Tensor:
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def rotary(self, hidden: Tensor, position_ids: Tensor) -> Any:
        rot = self._text_model().rotary_emb
        return {kind: rot(hidden, position_ids, kind) for kind in set(self.config.layer_types)}

    def sliding_window(self, index: int) -> int | None:
        if self.config.layer_types[index] == "sliding_attention":
            return self.config.sliding_window
        return None

    def layer_rotary(self, index: int, rotary: Any) -> tuple[Tensor, Tensor]:
        return rotary[self.config.layer_types[index]]  # sliding and full layers: their own bases
