"""Texts in, one row per text out: the one text -> rows path of ``offramp predict``, the server and
the demo, in batches, with the warning when (almost) every row leaves at one exit."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from offramp.data.batching import TokenizedSplit, check_texts
from offramp.data.splits import TextSplit
from offramp.modeling.checkpoints import tokenizer_of
from offramp.policies.base import warn_first_exit
from offramp.utils import progress


def predict_rows(model: Any, texts: Sequence[str], policy: Any, *, batch_size: int = 32,
                 max_length: int = 128) -> Iterator[dict[str, Any]]:
    """One dict per text: label (name), confidence, exit_layer (value instead of label for regression)."""
    check_texts(texts)
    tok = tokenizer_of(model)
    data = TokenizedSplit(TextSplit(list(texts), None, [0] * len(texts)), tok, max_length=max_length)
    starts = range(0, len(texts), batch_size)
    exit_index = []
    for start in progress(starts, desc="predict", unit="batch", enabled=len(starts) > 1):
        chunk = list(texts[start:start + batch_size])
        enc = data.collate([data[i] for i in range(start, start + len(chunk))])
        pred = model.predict(enc["input_ids"], enc["attention_mask"], policy,
                             token_type_ids=enc.get("token_type_ids"))
        exit_index += pred.exit_index.tolist()
        yield from model.prediction_rows(chunk, pred)
    warn_first_exit(exit_index, list(model.exit_layers), f"policy {policy.to_dict()}",
                    "if that loses too much accuracy, use a stricter --value (or another --policy)")
