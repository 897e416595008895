"""Llama-family decoders: llama (SmolLM2), mistral, qwen2, qwen3 (rotary, RMSNorm, GQA)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from offramp.backbones.decoder import DecoderAdapter


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # (b, h, t, hd)
    """Rotary embedding of HF's ``apply_rotary_pos_emb`` for one tensor (cos/sin: (b, t, hd))."""
    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


class LlamaAdapter(DecoderAdapter):
    """Adapter for ``LlamaForCausalLM`` and the models that share its layout."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    gated_mlp = True

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        emb = self.model.model.embed_tokens
        return emb(input_ids.to(emb.weight.device))

    def rotary(self, hidden: Tensor, position_ids: Tensor) -> Any:
        return self.model.model.rotary_emb(hidden, position_ids=position_ids)

    def layer_rotary(self, index: int, rotary: Any) -> tuple[Tensor, Tensor]:
        """The (cos, sin) of layer ``index`` from what ``rotary`` returned (one pair for all layers)."""
        return rotary

    def sliding_window(self, index: int) -> int | None:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types and layer_types[index] == "sliding_attention":
            return getattr(self.config, "sliding_window", None)
        if self.config.model_type == "mistral":
            return getattr(self.config, "sliding_window", None)
        return None

    def run_layer(self, index: int, hidden: Tensor, *, cache: Any, mask: Tensor | None = None,
                  position_ids: Tensor | None = None, rotary: Any = None) -> Tensor:
        layer = self.layers()[index]
        device = self.layer_device(index)
        cos, sin = self.layer_rotary(index, rotary)
        return layer(hidden.to(device), attention_mask=None if mask is None else mask.to(device),
                     position_ids=position_ids, cache=cache, use_cache=True,
                     position_embeddings=(cos.to(device), sin.to(device)))

    def project_kv(self, index: int, hidden: Tensor, rotary: Any) -> tuple[Tensor, Tensor]:
        layer = self.layers()[index]
        attn = layer.self_attn
        device = self.layer_device(index)
        x = layer.input_layernorm(hidden.to(device))
        b, t, _ = x.shape
        heads, head_dim = self.kv_shape()
        k = attn.k_proj(x).view(b, t, heads, head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        k = k.transpose(1, 2)  # (b, h, t, hd)
        v = attn.v_proj(x).view(b, t, heads, head_dim).transpose(1, 2)
        cos, sin = self.layer_rotary(index, rotary)
        return apply_rotary(k, cos.to(device), sin.to(device)), v
