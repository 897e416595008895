"""The one causal-LM loader: a folder, Hub id or offline alias as (model, tokenizer), through
``load_hf_model`` (no remote code, damaged or pickled weights refused with a clear error); and a
token-exits folder with the LM it names."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from offramp.config import read_config
from offramp.devices import resolve_device, resolve_dtype
from offramp.modeling.base import load_hf_model, load_hf_tokenizer
from offramp.modeling.decoder import DecoderExitModel, base_model_of
from offramp.utils import readable_dir


def load_causal_lm(name: str, dtype: torch.dtype | str = torch.float32,
                   device: torch.device | str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with left padding and a pad token) for a folder, Hub id or
    offline alias; ``dtype`` a torch dtype or a name (``offramp.config.DTYPES``; ``"auto"``: bfloat16
    where ``device`` computes it natively, else float32); ``device`` auto, cpu, cuda[:N] or a torch
    device (None: the CPU). A bad name or a missing GPU fails before anything loads."""
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    torch_dtype = resolve_dtype(dtype, dev) if isinstance(dtype, str) else dtype
    model = load_hf_model(AutoModelForCausalLM, name, "model", dtype=torch_dtype).to(dev).eval()
    tok = load_hf_tokenizer(name, "tokenizer")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_exits_and_lm(folder: str, backbone: str | None = None, dtype: torch.dtype | str = torch.float32,
                      device: torch.device | str | None = None) -> tuple[DecoderExitModel, Any]:
    """(DecoderExitModel, tokenizer) of a token-exits folder, the LM loaded by reference or
    ``backbone`` on ``device`` in ``dtype`` (the exit heads follow it)."""
    _, data = read_config(readable_dir(folder), expect="token_exits")
    name = backbone or base_model_of(folder, data.get("base_model_name_or_path"))
    if not name:
        raise ValueError(f"{folder} names no base model: pass --backbone NAME")
    lm, tok = load_causal_lm(name, dtype, device)
    return DecoderExitModel.from_pretrained(folder, backbone=lm), tok
