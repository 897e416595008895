"""Gemma 3 text decoders (``gemma3_text``; the text tower of ``gemma3``): scaled embeddings,
sliding-window and full-attention layers with their own rotary bases, q/k norms, logit softcap."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from offramp.backbones.decoder import DecoderAdapter, text_config
from offramp.backbones.llama import apply_rotary


class Gemma3Adapter(DecoderAdapter):
    """Adapter for ``Gemma3ForCausalLM`` (text-only Gemma 3)."""

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

    def run_layer(self, index: int, hidden: Tensor, *, cache: Any, mask: Tensor | None = None,
                  position_ids: Tensor | None = None, rotary: Any = None) -> Tensor:
        layer = self.layers()[index]
        device = self.layer_device(index)
        cos, sin = rotary[self.config.layer_types[index]]
        return layer(hidden.to(device), attention_mask=None if mask is None else mask.to(device),
                     position_ids=position_ids, cache=cache,
                     position_embeddings=(cos.to(device), sin.to(device)))

    def project_kv(self, index: int, hidden: Tensor, rotary: Any) -> tuple[Tensor, Tensor]:
        layer = self.layers()[index]
        attn = layer.self_attn
        device = self.layer_device(index)
        x = layer.input_layernorm(hidden.to(device))
        b, t, _ = x.shape
        heads, head_dim = self.kv_shape()
        k = attn.k_norm(attn.k_proj(x).view(b, t, heads, head_dim).transpose(1, 2))
        v = attn.v_proj(x).view(b, t, heads, head_dim).transpose(1, 2)
        cos, sin = rotary[self.config.layer_types[index]]
        return apply_rotary(k, cos.to(device), sin.to(device)), v
