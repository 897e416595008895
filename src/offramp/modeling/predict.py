"""Texts in, one row per text out: the one text -> rows path of ``offramp predict``, the server and
the demo, in batches, with the warning when (almost) every row leaves at one exit."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from offramp.data.batching import TokenizedSplit, check_texts
from offramp.data.splits import TextSplit
from offramp.policies.base import warn_first_exit
from offramp.utils import progress


def tokenizer_of(model: Any) -> Any:
    """The model's tokenizer; a ValueError naming the fix when its checkpoint has none."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: save one with the checkpoint (the backbone folder "
                         "must include its tokenizer files)")
    return model.tokenizer


def predict_rows(model: Any, texts: Sequence[str], policy: Any, *, batch_size: int = 32, max_length: int = 128,
                 warn: bool = True) -> Iterator[dict[str, Any]]:
    """One dict per text, ``batch_size`` texts at a time, by real per-row early exit: text, label
    (its name when the model has label names), confidence and exit_layer (value instead of label
    and confidence for regression). ``warn``: say so when (almost) every row leaves at one exit."""
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
    if warn:
        warn_first_exit(exit_index, list(model.exit_layers), f"policy {policy.to_dict()}",
                        "if that loses too much accuracy, use a stricter --value (or another --policy)")
