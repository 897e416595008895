"""``load_data``: one entry point for offline names, local files and Hugging Face datasets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from offramp.data.sources import (OFFLINE, Columns, RawExample, hub_split_names, is_local, load_hub,
                                  load_local)
from offramp.data.splits import (SPLITS, ClassificationData, TextSplit, check_texts,
                                 infer_label_names, map_labels, regression_labels, split_indices,
                                 to_split)


def _finish(name: str, parts: dict[str, list[RawExample]], names: list[str] | None, *,
            label_names: Sequence[str] | None, regression: bool,
            limits: dict[str, int | None]) -> ClassificationData:
    has_pair = any(ex.pair is not None for ex in parts["train"])
    for split, exs in parts.items():
        check_texts(exs, f"{name} ({split})", has_pair)
    if regression:
        final_names = None
    elif label_names is not None:
        final_names = list(label_names)
    else:
        final_names = names or infer_label_names([ex.label for exs in parts.values() for ex in exs])
    out = {}
    for split in SPLITS:
        exs = parts[split][: limits.get(split)] if limits.get(split) is not None else parts[split]
        where = f"{name} ({split} split)"
        labels = regression_labels(exs, where) if regression else map_labels(exs, final_names, where)
        out[split] = to_split(exs, labels)
    return ClassificationData(name, final_names, out["train"], out["validation"], out["test"])


def _cut(pool: list[RawExample], *, seed: int, validation_fraction: float,
         test_fraction: float) -> dict[str, list[RawExample]]:
    idx = split_indices(len(pool), seed=seed, validation_fraction=validation_fraction,
                        test_fraction=test_fraction)
    return {k: [pool[i] for i in v] for k, v in idx.items()}


def _hub_parts(name: str, *, config: str | None, columns: Columns, hub_splits: dict[str, str] | None,
               seed: int, validation_fraction: float,
               test_fraction: float) -> tuple[dict[str, list[RawExample]], list[str] | None]:
    """Hub splits by name; a split the dataset lacks (or has unlabelled) is carved from train."""
    available = hub_split_names(name, config)
    wanted = {s: (hub_splits or {}).get(s, s) for s in SPLITS}
    for ours, theirs in (hub_splits or {}).items():
        if ours not in SPLITS:
            raise ValueError(f"unknown split {ours!r} in the split map; use {list(SPLITS)}")
        if theirs not in available:
            raise ValueError(f"dataset {name!r} has no split {theirs!r} (splits: {available})")
    if wanted["train"] not in available:
        raise ValueError(f"dataset {name!r} has no split {wanted['train']!r} to train on (splits: "
                         f"{available}); map one with --hub-splits train=NAME")
    parts, names = {}, None
    for s in SPLITS:
        if wanted[s] in available:
            parts[s], split_names = load_hub(name, config=config, split=wanted[s], columns=columns)
            names = names or split_names
    missing = [s for s in ("validation", "test") if not parts.get(s)]
    if missing:
        fractions = {"validation": validation_fraction if "validation" in missing else 0.0,
                     "test": test_fraction if "test" in missing else 0.0}
        cut = _cut(parts["train"], seed=seed, validation_fraction=fractions["validation"],
                   test_fraction=fractions["test"])
        parts["train"] = cut["train"]
        for s in missing:
            parts[s] = cut[s]
    return parts, names


def load_data(spec: str, *, config: str | None = None, columns: Columns = Columns(), seed: int = 0,
              validation_fraction: float = 0.1, test_fraction: float = 0.1,
              label_names: Sequence[str] | None = None, regression: bool = False,
              max_train: int | None = None, max_eval: int | None = None,
              hub_splits: dict[str, str] | None = None) -> ClassificationData:
    """Load a text classification data set and split it deterministically.

    Args:
        spec: an offline name (``tweets``, ``bbc``), a local ``.csv`` / ``.tsv`` / ``.jsonl`` file,
            or a Hugging Face dataset name (e.g. ``glue`` with ``config="sst2"``).
        config: the Hub dataset's configuration.
        columns: text / pair / label column names; unset ones are detected from the header.
        seed: seed of the permutation that cuts the splits (same seed, same splits).
        validation_fraction, test_fraction: shares cut from the pool (or from a Hub train split
            when the dataset has no such split of its own).
        label_names: the class names a trained model knows: labels are mapped onto them and an
            unseen label is an error. None: taken from the source or the sorted distinct labels.
        regression: float labels (num_labels = 1) instead of classes.
        max_train, max_eval: keep at most this many training / validation and test examples.
        hub_splits: our split name -> the Hub's split name, e.g. ``{"validation": "validation_matched"}``.

    Returns:
        ClassificationData with train, validation and test splits and the label names.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--data is empty: give an offline name (tweets, bbc), a .csv/.tsv/.jsonl "
                         "file, or a Hugging Face dataset name")
    fractions = dict(seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction)
    if spec in OFFLINE:
        pool, names = OFFLINE[spec]()
        pool = [ex for ex in pool if ex.text.strip()]  # the shipped CSV has a few blank tweets
        parts = _cut(pool, **fractions)
    elif is_local(spec):
        pool, names = load_local(spec, columns)
        parts = _cut(pool, **fractions)
    else:
        parts, names = _hub_parts(spec, config=config, columns=columns, hub_splits=hub_splits,
                                  **fractions)
    limits = {"train": max_train, "validation": max_eval, "test": max_eval}
    return _finish(spec, parts, names, label_names=label_names, regression=regression, limits=limits)


def class_balance(split: TextSplit, num_labels: int) -> np.ndarray:
    """(c,) share of each class in ``split``."""
    counts = np.bincount(np.asarray(split.labels, dtype=np.int64), minlength=num_labels)
    return counts / max(1, counts.sum())
