"""Tokenisation into padded batches of ``input_ids``, ``attention_mask`` (``token_type_ids``), ``labels``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from offramp.data.loading import Columns, load_data
from offramp.data.splits import TextSplit


class TruncationWarning(UserWarning):
    """Some texts were longer than ``max_length`` tokens and were cut to it."""


class TokenizedSplit(Dataset):
    """A split tokenised once (no padding); items are dicts of 1-D lists plus the label.

    Texts longer than ``max_length`` tokens are cut to it; ``truncated`` counts them, and one
    :class:`TruncationWarning` with the count is issued (``warn_truncated=False``: none).
    """

    def __init__(self, split: TextSplit, tokenizer: Any, *, max_length: int = 128,
                 warn_truncated: bool = True) -> None:
        if len(split) == 0:
            raise ValueError("the split is empty: nothing to tokenise (check the data and its size)")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        args = (split.texts,) if split.pairs is None else (split.texts, split.pairs)
        # one token more than kept: a row that reaches it was longer than max_length
        enc = tokenizer(*args, truncation=True, max_length=max_length + 1, padding=False)
        ids, types = list(enc["input_ids"]), enc.get("token_type_ids")
        long = [i for i, x in enumerate(ids) if len(x) > max_length]
        if long:
            cut = tokenizer(*[[a[i] for i in long] for a in args], truncation=True, max_length=max_length,
                            padding=False)
            types = list(types) if types is not None else None
            for j, i in enumerate(long):
                ids[i] = cut["input_ids"][j]
                if types is not None:
                    types[i] = cut["token_type_ids"][j]
        self.truncated = len(long)
        if long and warn_truncated:
            warnings.warn(f"{len(long)} of {len(ids)} texts are longer than max_length={max_length} tokens and "
                          "were cut to it (a larger --max-length keeps more, up to the model's limit)",
                          TruncationWarning, stacklevel=2)
        self.input_ids: list[list[int]] = ids
        self.token_type_ids: list[list[int]] | None = types
        self.labels = split.labels
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.float_labels = bool(split.labels) and isinstance(split.labels[0], float)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        return item

    def lengths(self) -> np.ndarray:
        """(n,) number of real tokens of each example."""
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of items to the longest one: a dict of (b, t) tensors and (b,) labels."""
        t = max(len(it["input_ids"]) for it in items)
        b = len(items)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)  # (b, t)
        mask = torch.zeros((b, t), dtype=torch.long)  # (b, t)
        types = torch.zeros((b, t), dtype=torch.long) if self.token_type_ids is not None else None
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            ids[r, :n] = torch.tensor(it["input_ids"])
            mask[r, :n] = 1
            if types is not None:
                types[r, :n] = torch.tensor(it["token_type_ids"])
        dtype = torch.float32 if self.float_labels else torch.long
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.tensor([it["labels"] for it in items], dtype=dtype)}
        if types is not None:
            batch["token_type_ids"] = types
        return batch


def make_loader(split: TextSplit | TokenizedSplit, tokenizer: Any = None, *, batch_size: int = 32,
                max_length: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader of padded batches over ``split`` (tokenised here unless already).

    Args:
        split: the texts and labels, or a :class:`TokenizedSplit`.
        tokenizer: a Hugging Face tokenizer (needed unless ``split`` is already tokenised).
        batch_size: rows per batch.
        max_length: longer texts are truncated to this many tokens.
        shuffle: reshuffle every epoch with a generator seeded by ``seed`` (deterministic).
        seed: seed of the shuffle.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = split if isinstance(split, TokenizedSplit) else TokenizedSplit(split, tokenizer,
                                                                          max_length=max_length)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      collate_fn=data.collate)


def check_texts(texts: Sequence[str]) -> None:
    """Refuse an empty list and any text without a non-space character (naming its 1-based number)."""
    if len(texts) == 0:
        raise ValueError("no texts given: pass at least one text to predict")
    for n, text in enumerate(texts, 1):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {n} is empty: every input needs at least one non-space character")


def encode_texts(texts: Sequence[str], tokenizer: Any, *, max_length: int = 128,
                 pairs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """One padded batch for ``texts`` (no labels), for prediction; empty texts are an error."""
    check_texts(texts)
    split = TextSplit(list(texts), None if pairs is None else list(pairs), [0] * len(texts))
    data = TokenizedSplit(split, tokenizer, max_length=max_length)
    batch = data.collate([data[i] for i in range(len(data))])
    batch.pop("labels")
    return batch


def load_from_settings(settings: dict[str, Any], *, label_names: Sequence[str] | None = None,
                       regression: bool = False) -> Any:
    """:func:`offramp.data.load_data` with the stored / given data settings."""
    if not settings.get("data"):
        raise ValueError("no data given: pass --data (the checkpoint does not record any)")
    return load_data(settings["data"], config=settings.get("config"),
                     columns=Columns(settings.get("text_column"), settings.get("pair_column"),
                                     settings.get("label_column")),
                     seed=settings["seed"], validation_fraction=settings["validation_fraction"],
                     test_fraction=settings["test_fraction"], label_names=label_names, regression=regression,
                     max_train=settings.get("max_train"), max_eval=settings.get("max_eval"),
                     hub_splits=settings.get("hub_splits"))


def split_batches(split: Any, tokenizer: Any, settings: dict[str, Any], *, shuffle: bool = False,
            lazy: bool = False) -> Any:
    """Padded batches of ``split`` (a DataLoader when ``lazy``, else a list)."""
    loader = make_loader(split, tokenizer, batch_size=settings["batch_size"], max_length=settings["max_length"],
                         shuffle=shuffle, seed=settings["seed"])
    return loader if lazy else list(loader)
