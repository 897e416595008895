"""Opening offramp checkpoints: ``load`` (any kind), ``checkpoint_kind``, and what a model can
embed (``max_positions``); ``offramp.utils.checkpoint_dir`` finds the folder without loading anything."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from offramp.config import CONFIG_NAME, read_config
from offramp.modeling.base import ExitModelBase
from offramp.modeling.decoder import DecoderExitModel
from offramp.modeling.encoder import EarlyExitModel
from offramp.utils import readable_dir


def load(directory: str | os.PathLike, **kwargs: Any) -> ExitModelBase:
    """Open any offramp model checkpoint by its kind: an ``EarlyExitModel`` (classifier) or a
    ``DecoderExitModel`` (token exits). Keyword arguments go to that class's ``from_pretrained``."""
    folder = readable_dir(directory)
    if not (folder / CONFIG_NAME).is_file() and (readable_dir(folder / "checkpoint") / CONFIG_NAME).is_file():
        folder = readable_dir(folder / "checkpoint")  # a training output folder
    kind, _ = read_config(folder)
    classes = {EarlyExitModel.kind: EarlyExitModel, DecoderExitModel.kind: DecoderExitModel}
    return classes[kind].from_pretrained(folder, **kwargs)


def checkpoint_kind(path: str | Path) -> str:
    """The kind of the checkpoint at ``path`` ("classifier", "token_exits"); a ValueError naming what
    the folder is otherwise."""
    p = Path(path)
    folder = p if (readable_dir(p) / "offramp_config.json").is_file() or not (p / "checkpoint").is_dir() \
        else p / "checkpoint"
    return read_config(readable_dir(folder))[0]


def max_positions(model: Any) -> int | None:
    """How many tokens the model's position embeddings (and its tokenizer) allow, or None if unbounded."""
    cfg = model.backbone.config
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and cfg.model_type in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        limit -= (cfg.pad_token_id or 0) + 1  # positions start after the padding index
    tok = getattr(model, "tokenizer", None)
    tok_max = getattr(tok, "model_max_length", None) if tok is not None else None
    if tok_max and tok_max < 1_000_000:
        limit = min(limit, tok_max) if limit else tok_max
    return limit


def fit_max_length(model: Any, max_length: int, *, given: bool) -> int:
    """``max_length`` within what the model can embed: a given --max-length beyond it is refused (it
    would fail inside the forward); a default one is lowered to the model's limit."""
    limit = max_positions(model)
    if limit is None or max_length <= limit:
        return max_length
    if given:
        raise ValueError(f"--max-length {max_length} is beyond this model's {limit} positions; "
                         f"use --max-length {limit} or less")
    return limit


def default_pooling(model: str) -> str:
    """"mean" for a sentence-transformers folder trained with mean pooling (its 1_Pooling config),
    else "cls" (the first token through the model's pooler)."""
    path = Path(model) / "1_Pooling" / "config.json"
    if path.is_file():
        try:
            if json.loads(path.read_text()).get("pooling_mode_mean_tokens"):
                return "mean"
        except json.JSONDecodeError:
            pass
    return "cls"
