"""The one causal-LM loader: a folder, Hub id or offline alias as (model, tokenizer), through
``load_hf_model`` (no remote code, damaged or pickled weights refused with a clear error); and a
token-exits folder with the LM it names."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from offramp.config import read_config
from offramp.modeling.base import load_hf_model, load_hf_tokenizer, resolve_dtype
from offramp.modeling.decoder import DecoderExitModel
from offramp.utils import readable_dir


def load_causal_lm(name: str, dtype: torch.dtype | str = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with left padding and a pad token) for a folder, Hub id or
    offline alias; ``dtype`` a torch dtype or a name (``offramp.config.DTYPES``; ``"auto"``: bfloat16
    where it is native, else float32)."""
    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype  # a bad name fails before loading
    model = load_hf_model(AutoModelForCausalLM, name, "model", dtype=torch_dtype).eval()
    tok = load_hf_tokenizer(name, "tokenizer")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_exits_and_lm(folder: str, backbone: str | None = None,
                      dtype: torch.dtype | str = torch.float32) -> tuple[DecoderExitModel, Any]:
    """(DecoderExitModel, tokenizer) of a token-exits folder, the LM loaded by reference or ``backbone``."""
    _, data = read_config(readable_dir(folder), expect="token_exits")
    name = backbone or data.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{folder} names no base model: pass --backbone NAME")
    lm, tok = load_causal_lm(name, dtype)
    return DecoderExitModel.from_pretrained(folder, backbone=lm), tok
