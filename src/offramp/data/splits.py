"""Deterministic train / validation / test splits and the mapping from raw labels to class ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from offramp.data.sources import RawExample

SPLITS = ("train", "validation", "test")


@dataclass
class TextSplit:
    """One split: texts, the second texts of pairs (or None), and labels (class ids or floats)."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | list[float]

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> "TextSplit":
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return TextSplit(self.texts[:n], None if self.pairs is None else self.pairs[:n], self.labels[:n])


@dataclass
class ClassificationData:
    """A text classification (or regression) data set split three ways.

    Attributes:
        name: what was loaded (offline name, file path, or Hub name).
        label_names: class names in id order; None for regression.
        train, validation, test: the splits.
    """

    name: str
    label_names: list[str] | None
    train: TextSplit
    validation: TextSplit
    test: TextSplit

    @property
    def num_labels(self) -> int:
        """Number of classes (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)

    def split(self, name: str) -> TextSplit:
        """The split called ``name`` (train, validation or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {list(SPLITS)}")
        return getattr(self, name)


def _label_key(label: Any) -> str:
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    return str(label).strip()


def infer_label_names(labels: Sequence[Any]) -> list[str]:
    """Sorted distinct labels as strings (numeric order when every label is an integer)."""
    keys = sorted({_label_key(y) for y in labels})
    if all(k.lstrip("-").isdigit() for k in keys):
        keys.sort(key=int)
    return keys


def map_labels(examples: Sequence[RawExample], label_names: Sequence[str], where: str) -> list[int]:
    """Class ids of ``examples`` under ``label_names``; a ValueError names any unseen label."""
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    for n, ex in enumerate(examples, 1):
        key = _label_key(ex.label)
        if key not in index:
            raise ValueError(f"{where}: example {n} has the label {key!r}, which was not seen in "
                             f"training (known labels: {list(label_names)}); remove those rows or "
                             "retrain with them")
        ids.append(index[key])
    return ids


def regression_labels(examples: Sequence[RawExample], where: str) -> list[float]:
    """Float targets of ``examples``; a ValueError names the first one that is not a number."""
    out = []
    for n, ex in enumerate(examples, 1):
        try:
            out.append(float(ex.label))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: example {n} has the label {ex.label!r}, which is not a number "
                             "(regression needs numeric labels)") from None
    return out


def check_texts(examples: Sequence[RawExample], where: str, has_pair: bool) -> None:
    """Raise a ValueError naming the first example with an empty text (or a missing pair text)."""
    for n, ex in enumerate(examples, 1):
        if not ex.text.strip():
            raise ValueError(f"{where}: example {n} has an empty text; remove the row or fill it in")
        if has_pair and (ex.pair is None or not ex.pair.strip()):
            raise ValueError(f"{where}: example {n} has an empty second text of the pair")


def to_split(examples: Sequence[RawExample], labels: list) -> TextSplit:
    """A :class:`TextSplit` from examples and their mapped labels."""
    has_pair = bool(examples) and examples[0].pair is not None
    return TextSplit([ex.text for ex in examples],
                     [ex.pair or "" for ex in examples] if has_pair else None, labels)


def split_indices(n: int, *, seed: int, validation_fraction: float,
                  test_fraction: float) -> dict[str, np.ndarray]:
    """Deterministic disjoint index sets covering range(n): a seeded permutation cut three ways."""
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1
            and validation_fraction + test_fraction < 1):
        raise ValueError("validation and test fractions must be in [0, 1) and sum to less than 1, got "
                         f"{validation_fraction} and {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction)) if test_fraction else 0
    n_val = int(round(n * validation_fraction)) if validation_fraction else 0
    if n - n_test - n_val < 1:
        raise ValueError(f"only {n} examples: too few to split into train / validation / test")
    return {"test": perm[:n_test], "validation": perm[n_test:n_test + n_val],
            "train": perm[n_test + n_val:]}
