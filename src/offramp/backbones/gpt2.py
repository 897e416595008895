"""GPT-2 decoders: learned absolute positions, LayerNorm, fused ``c_attn`` projection."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from offramp.backbones.decoder import DecoderAdapter


class GPT2Adapter(DecoderAdapter):
    """Adapter for ``GPT2LMHeadModel``."""

    model_types = ("gpt2",)

    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def max_positions(self) -> int | None:
        return int(self.config.n_positions)

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        tr = self.model.transformer
        device = tr.wte.weight.device
        return tr.wte(input_ids.to(device)) + tr.wpe(position_ids.to(device))

    def run_layer(self, index: int, hidden: Tensor, *, cache: Any, mask: Tensor | None = None,
                  position_ids: Tensor | None = None, rotary: Any = None) -> Tensor:
        device = self.layer_device(index)
        return self.layers()[index](hidden.to(device), cache=cache, use_cache=True,
                                    attention_mask=None if mask is None else mask.to(device))

    def project_kv(self, index: int, hidden: Tensor, rotary: Any) -> tuple[Tensor, Tensor]:
        block = self.layers()[index]
        device = self.layer_device(index)
        x = block.ln_1(hidden.to(device))
        b, t, d = x.shape
        heads, head_dim = self.kv_shape()
        _, k, v = block.attn.c_attn(x).split(d, dim=2)
        return (k.view(b, t, heads, head_dim).transpose(1, 2),
                v.view(b, t, heads, head_dim).transpose(1, 2))
