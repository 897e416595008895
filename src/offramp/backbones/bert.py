"""BERT-family encoders: bert, roberta, xlm-roberta, electra (same layer layout and masks)."""

from __future__ import annotations

from torch import Tensor, nn

from offramp.backbones.base import EncoderAdapter


class BertAdapter(EncoderAdapter):
    model_types = ("bert", "roberta", "xlm-roberta", "electra")

    def layer_module(self, i: int) -> nn.Module:
        return self.model.encoder.layer[i]

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        h = self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        proj = getattr(self.model, "embeddings_project", None)  # ELECTRA with embedding_size != hidden
        return proj(h) if proj is not None else h

    def pooler(self) -> nn.Module | None:
        return getattr(self.model, "pooler", None)
