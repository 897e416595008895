"""What offramp's models and engines return: ``ModelOutput``-style dataclasses, all in one place.

- ``EarlyExitOutput``: every exit of an encoder classifier (training, traces);
- ``Prediction``: real per-row early exit of a classifier (``EarlyExitModel.predict``);
- ``DecoderExitOutput``: every token exit on a full sequence (training, token traces);
- ``GenerateOutput`` + ``GenerateReport``: token-level early-exit generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.utils import ModelOutput


@dataclass
class EarlyExitOutput(ModelOutput):
    """Every exit's output for a batch (training and analysis).

    Attributes:
        loss: the objective's loss when labels were given.
        exit_logits: (E, b, c) logits of every exit.
        halting_logits: (b, E) halting logits (lambda = sigmoid) when a halting layer is present.
        halting_probs: (b, E) the exit distribution p when a halting layer is present.
        gate_logits: (b, E) JEI-DNN gate logits when gates are present.
        pooled: (E, b, d) pooled hidden states when ``output_pooled=True``.
    """

    loss: torch.FloatTensor | None = None
    exit_logits: torch.FloatTensor | None = None
    halting_logits: torch.FloatTensor | None = None
    halting_probs: torch.FloatTensor | None = None
    gate_logits: torch.FloatTensor | None = None
    pooled: torch.FloatTensor | None = None


@dataclass
class Prediction(ModelOutput):
    """The result of real early-exit inference, per row.

    Attributes:
        logits: (b, c) logits of the exit each row took.
        exit_index: (b,) 0-based index of that exit.
        exit_layer: (b,) 1-based backbone layer of that exit (how deep the row ran).
    """

    logits: Tensor | None = None
    exit_index: Tensor | None = None
    exit_layer: Tensor | None = None

    @property
    def labels(self) -> Tensor:  # (b,)
        return self.logits.argmax(-1)


@dataclass
class DecoderExitOutput(ModelOutput):
    """All exits on a full sequence (training, analysis).

    Attributes:
        exit_features: one (b, t, d) tensor per exit.
        confidence_logits: (b, t, n_exits) confidence classifier logits.
        final_logits: (b, t, V) logits of the full model.
    """

    exit_features: list[Tensor] | None = None
    confidence_logits: Tensor | None = None
    final_logits: Tensor | None = None


@dataclass(frozen=True)
class GenerateReport:
    """What one ``generate`` call did. ``layer_rows`` counts (token, layer) pairs run on the
    token's own path; ``fill_layer_rows`` the layer runs a cache strategy made for skipped layers
    (``propagate``: K/V projections, ``update``: state updates, ``catch_up``: pending tokens);
    ``extra_head_rows`` the full-vocabulary LM-head projections run at exits a token did not take
    (the cost of policies that read the exit distribution; 0 for token_confidence and static)."""

    new_tokens: int
    layer_rows: int
    fill_layer_rows: int
    mean_exit_layer: float
    num_layers: int
    wall_s: float
    extra_head_rows: int = 0


@dataclass
class GenerateOutput(ModelOutput):
    """Tokens, exit layers and texts of one call.

    Attributes:
        sequences: (b, prompt + n) left-padded prompt then new tokens (pad after EOS), as HF.
        new_tokens: (b, n) the generated tokens.
        exit_layers: (b, n) layers run for each generated token (num_layers = no exit; 0 = none,
            after EOS).
        texts: decoded new tokens per row if a tokenizer was given.
        step_logits: (b, n, V) logits used for each token, if asked for.
        extra: analysis outputs asked for (``cache``, ``head_states``, ``trace``); {} otherwise.
    """

    sequences: Tensor | None = None
    new_tokens: Tensor | None = None
    exit_layers: Tensor | None = None
    report: GenerateReport | None = None
    texts: list[str] | None = None
    step_logits: Tensor | None = None
    extra: dict[str, Any] | None = None
