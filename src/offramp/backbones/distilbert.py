"""DistilBERT: no token types, no pooler."""

from __future__ import annotations

from torch import Tensor, nn

from offramp.backbones.base import EncoderAdapter


class DistilBertAdapter(EncoderAdapter):
    model_types = ("distilbert",)

    @property
    def num_layers(self) -> int:
        return self.config.n_layers

    @property
    def hidden_size(self) -> int:
        return self.config.dim

    def layer_module(self, i: int) -> nn.Module:
        return self.model.transformer.layer[i]

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.model.embeddings(input_ids)
