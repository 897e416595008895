"""ALBERT: one shared layer group applied num_hidden_layers times; an exit after each application."""

from __future__ import annotations

from torch import Tensor, nn

from offramp.backbones.base import EncoderAdapter


class _Pooler(nn.Module):
    """ALBERT's pooler (dense + tanh on the first token) as one module."""

    def __init__(self, dense: nn.Module, activation: nn.Module) -> None:
        super().__init__()
        self.dense, self.activation = dense, activation

    def forward(self, hidden: Tensor) -> Tensor:  # (b, t, d) -> (b, d)
        return self.activation(self.dense(hidden[:, 0]))


class AlbertAdapter(EncoderAdapter):
    model_types = ("albert",)

    def layer_module(self, i: int) -> nn.Module:
        cfg = self.config
        group = int(i / (cfg.num_hidden_layers / cfg.num_hidden_groups))
        return self.model.encoder.albert_layer_groups[group]

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        h = self.model.embeddings(input_ids, token_type_ids=token_type_ids)
        return self.model.encoder.embedding_hidden_mapping_in(h)

    def pooler(self) -> nn.Module | None:
        if getattr(self.model, "pooler", None) is None:
            return None
        if not hasattr(self, "_pooler"):
            self._pooler = _Pooler(self.model.pooler, self.model.pooler_activation)
        return self._pooler
