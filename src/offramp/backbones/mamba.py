"""Mamba and Mamba-2 decoders: RMSNorm + selective-state-space mixer blocks, no attention.

The state of a Mamba layer is a conv window (b, channels, kernel) and a recurrent SSM state; the
engine keeps them per row. A token that exits early either leaves the skipped layers' states
unchanged ("freeze"), runs their state update on its exit hidden state ("update"), or leaves them
pending until the next token that goes deep, which runs them first ("catch_up", exact).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from offramp.backbones.decoder import DecoderAdapter


class MambaAdapter(DecoderAdapter):
    """Adapter for ``MambaForCausalLM``."""

    kind = "ssm"
    model_types = ("mamba",)

    def layers(self) -> nn.ModuleList:
        return self.model.backbone.layers

    def final_norm(self) -> nn.Module:
        return self.model.backbone.norm_f

    def max_positions(self) -> int | None:
        return None

    def hidden_after(self, hidden_states: tuple[Tensor, ...], k: int) -> Tensor:
        return hidden_states[k - 1]  # HF Mamba records (layer 1, ..., layer L, final norm): no embeddings

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        emb = self.model.backbone.embeddings
        return emb(input_ids.to(emb.weight.device))

    def run_layer(self, index: int, hidden: Tensor, *, cache: Any, mask: Tensor | None = None,
                  position_ids: Tensor | None = None, rotary: Any = None) -> Tensor:
        device = self.layer_device(index)
        return self.layers()[index](hidden.to(device), cache=cache,
                                    attention_mask=None if mask is None else mask.to(device))


class Mamba2Adapter(MambaAdapter):
    """Adapter for ``Mamba2ForCausalLM`` (same layout, multi-head SSM mixer)."""

    model_types = ("mamba2",)
