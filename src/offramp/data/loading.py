"""``load_data``: one entry point for offline names, local files and Hugging Face datasets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from offramp.data.sources import (
    LOCAL_SUFFIXES,
    OFFLINE,
    Columns,
    RawExample,
    hub_split_names,
    is_local,
    load_hub,
    load_local,
)
from offramp.data.splits import (
    SPLITS,
    ClassificationData,
    TextSplit,
    check_texts,
    infer_label_names,
    map_labels,
    regression_labels,
    split_indices,
    to_split,
)


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


DIR_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}


def data_files(spec: str | dict[str, str]) -> dict[str, str] | None:
    """The split files ``spec`` names, or None when it names one pool (an offline name, one file,
    a Hub dataset).

    Three spellings, as in the datasets ``data_files`` convention: a dict ``{"train": PATH,
    "validation": PATH, "test": PATH}``, the string ``train=PATH,validation=PATH,test=PATH``, or a
    folder holding ``train.*`` and optionally ``validation.*`` (``valid``, ``dev``, ``val``) and
    ``test.*`` with a .csv / .tsv / .jsonl suffix. ``train`` is required."""
    if isinstance(spec, dict):
        files = {str(k): str(v) for k, v in spec.items()}
    elif "=" in spec and not Path(spec).exists():
        files = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            if "=" not in item:
                raise ValueError(f"--data {spec!r}: expected SPLIT=FILE items separated by commas "
                                 f"(e.g. train=train.csv,validation=dev.csv), got {item!r}")
            k, v = (t.strip() for t in item.split("=", 1))
            if k in files:
                raise ValueError(f"--data {spec!r}: the split {k!r} is given twice")
            files[k] = v
    elif Path(spec).is_dir():
        root = Path(spec)
        files = {}
        for split, stems in DIR_NAMES.items():
            found = [p for stem in stems for p in sorted(root.glob(f"{stem}.*"))
                     if p.suffix.lower() in LOCAL_SUFFIXES]
            if len(found) > 1:
                raise ValueError(f"--data {root}: more than one {split} file ({', '.join(p.name for p in found)}); "
                                 f"keep one, or name them with --data train=FILE,validation=FILE,test=FILE")
            if found:
                files[split] = str(found[0])
        if "train" not in files:
            raise ValueError(f"--data {root} is a folder without a train.csv / train.tsv / train.jsonl; "
                             "add one, or name the files with --data train=FILE,validation=FILE,test=FILE")
    else:
        return None
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise ValueError(f"--data: unknown split {unknown[0]!r}; the splits are {list(SPLITS)}")
    if "train" not in files:
        raise ValueError("--data: the split files need a train file (train=FILE); validation and test "
                         "are cut from it when they are not given")
    for split, path in files.items():
        if Path(path).suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(f"--data: the {split} file {path} is not .csv, .tsv or .jsonl")
        if not Path(path).is_file():
            raise ValueError(f"--data: the {split} file {path} does not exist")
    return files


def _file_parts(files: dict[str, str], *, columns: Columns, seed: int, validation_fraction: float,
                test_fraction: float) -> tuple[dict[str, list[RawExample]], None]:
    """Each given split file used as it is; a split without a file is cut from train."""
    parts = {s: load_local(path, columns)[0] for s, path in files.items()}
    missing = [s for s in ("validation", "test") if s not in parts]
    if missing:
        cut = _cut(parts["train"], seed=seed,
                   validation_fraction=validation_fraction if "validation" in missing else 0.0,
                   test_fraction=test_fraction if "test" in missing else 0.0)
        parts["train"] = cut["train"]
        for s in missing:
            parts[s] = cut[s]
    return parts, None


def load_data(spec: str | dict[str, str], *, config: str | None = None, columns: Columns = Columns(), seed: int = 0,
              validation_fraction: float = 0.1, test_fraction: float = 0.1,
              label_names: Sequence[str] | None = None, regression: bool = False,
              max_train: int | None = None, max_eval: int | None = None,
              hub_splits: dict[str, str] | None = None) -> ClassificationData:
    """Load a text classification data set and split it deterministically.

    Args:
        spec: an offline name (``tweets``, ``bbc``), a local ``.csv`` / ``.tsv`` / ``.jsonl`` file
            (one pool, cut three ways), split files used as given (``{"train": PATH, "validation":
            PATH, "test": PATH}``, ``"train=PATH,validation=PATH"`` or a folder of ``train.csv``,
            ``validation.csv`` / ``dev.csv``, ``test.csv``; a split without a file is cut from
            train), or a Hugging Face dataset name (e.g. ``glue`` with ``config="sst2"``; its own
            splits are used as given).
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
    if isinstance(spec, dict) and spec:
        files = data_files(spec)
        spec = ",".join(f"{k}={v}" for k, v in spec.items())
    elif not isinstance(spec, str) or not spec.strip():
        raise ValueError("--data is empty: give an offline name (tweets, bbc), a .csv/.tsv/.jsonl "
                         "file, split files (train=FILE,validation=FILE,test=FILE), or a Hugging Face "
                         "dataset name")
    else:
        files = None if spec in OFFLINE else data_files(spec)
    fractions = dict(seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction)
    if files is not None:
        parts, names = _file_parts(files, columns=columns, **fractions)
    elif spec in OFFLINE:
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
