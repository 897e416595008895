"""MPNet (e.g. all-mpnet-base-v2): BERT-like layers plus a relative position bias per batch."""

from __future__ import annotations

from torch import Tensor, nn

from offramp.backbones.base import EncoderAdapter, LayerContext


class MPNetAdapter(EncoderAdapter):
    model_types = ("mpnet",)

    def layer_module(self, i: int) -> nn.Module:
        return self.model.encoder.layer[i]

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.model.embeddings(input_ids=input_ids)

    def context(self, hidden: Tensor, attention_mask: Tensor) -> LayerContext:
        ctx = super().context(hidden, attention_mask)
        ctx["position_bias"] = self.model.encoder.compute_position_bias(hidden)  # (b, heads, t, t)
        return ctx

    def run_layer(self, i: int, hidden: Tensor, ctx: LayerContext) -> Tensor:
        out = self.layer_module(i)(hidden, ctx["mask"], ctx["position_bias"])
        return out[0] if isinstance(out, tuple) else out

    def pooler(self) -> nn.Module | None:
        return getattr(self.model, "pooler", None)
