"""Helpers shared by the ``offramp`` subcommands: data options, checkpoints, policies, output folders."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DATA_DEFAULTS: dict[str, Any] = {
    "data": None, "config": None, "hub_splits": None, "text_column": None, "pair_column": None,
    "label_column": None, "seed": 0, "validation_fraction": 0.1, "test_fraction": 0.1, "max_train": None,
    "max_eval": None, "max_length": 128, "batch_size": 32}
_T0 = time.time()


def log(msg: str) -> None:
    """A progress line on stderr with the seconds since start (none after ``--quiet``)."""
    from offramp.utils import note

    note(f"[{time.time() - _T0:6.1f}s] {msg}")


def require_min(args: argparse.Namespace | dict[str, Any], **lows: float) -> None:
    """Refuse each named option below its minimum (``require_min(args, n=1)``: --n must be >= 1).

    Options that are None (not given) are skipped; NaN is refused too."""
    values = args if isinstance(args, dict) else vars(args)
    for name, low in lows.items():
        v = values.get(name)
        if v is not None and not v >= low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")


def require_unit(args: argparse.Namespace | dict[str, Any], *names: str, closed_low: bool = False) -> None:
    """Refuse each named option outside (0, 1) (``closed_low``: [0, 1)); None is skipped, NaN refused."""
    values = args if isinstance(args, dict) else vars(args)
    for name in names:
        v = values.get(name)
        if v is not None and not ((0.0 <= v if closed_low else 0.0 < v) and v < 1.0):
            raise ValueError(f"--{name.replace('_', '-')} must be in {'[' if closed_low else '('}0, 1), got {v}")


# -------------------------------------------------------------------------------------------- data
def add_data_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    """--data and its options; unset ones default to what the checkpoint was trained with."""
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="offline name (tweets, bbc), a .csv/.tsv/.jsonl file (cut 80/10/10), split files "
                        "used as given (train=FILE,validation=FILE,test=FILE, or a folder of train.csv, "
                        "dev.csv, test.csv), or a HF dataset name (its own splits) (default: the data the "
                        "checkpoint was trained on)")
    g.add_argument("--data-config", dest="config", default=None, help="HF dataset configuration (e.g. sst2)")
    g.add_argument("--hub-splits", default=None, metavar="OURS=THEIRS,...",
                   help="map train/validation/test to HF split names, e.g. validation=validation_matched")
    g.add_argument("--text-column", default=None)
    g.add_argument("--pair-column", default=None, help="second text of sentence pairs")
    g.add_argument("--label-column", default=None)
    g.add_argument("--seed", type=int, default=None, help="seed of the splits and the shuffle (default 0)")
    g.add_argument("--validation-fraction", type=float, default=None, help="default 0.1")
    g.add_argument("--test-fraction", type=float, default=None, help="default 0.1")
    g.add_argument("--max-train", type=int, default=None, help="use at most this many training examples")
    g.add_argument("--max-eval", type=int, default=None, help="at most this many validation / test examples")
    g.add_argument("--max-length", type=int, default=None, help="tokens per text (default 128)")
    g.add_argument("--batch-size", type=int, default=None, help="default 32")


def help_text(doc: str) -> str:
    """The first paragraph of a module docstring as plain help text: no reStructuredText markup and
    no leading "offramp CMD:" (argparse prints the command name already)."""
    import re

    text = " ".join(doc.strip().split("\n\n")[0].split())
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"^offramp [\w-]+: *", "", text)
    return text[:1].upper() + text[1:]


def add_state_cache_arg(p: argparse.ArgumentParser) -> None:
    """--state-cache: where a frozen backbone's pooled states are kept between commands."""
    p.add_argument("--state-cache", default=None, metavar="DIR|off",
                   help="keep the frozen backbone's pooled states, keyed by its weights and the exact "
                        "inputs, so that train, collect and the demo run it once per model and data "
                        "(default: $OFFRAMP_CACHE/states, i.e. ~/.cache/offramp/states; off: do not keep)")


def state_cache(args: argparse.Namespace) -> bool | str:
    """The ``state_cache`` argument of the library calls from --state-cache."""
    value = getattr(args, "state_cache", None)
    if value is None:
        return True
    return False if value.strip().lower() in ("off", "no", "none", "false", "0") else value


def data_settings(args: argparse.Namespace, *, only_given: bool = False) -> dict[str, Any]:
    """The data options of ``args`` (with defaults filled unless ``only_given``)."""
    given = {k: getattr(args, k) for k in DATA_DEFAULTS if getattr(args, k, None) is not None}
    if isinstance(given.get("hub_splits"), str):
        given["hub_splits"] = parse_pairs(given["hub_splits"], "--hub-splits")
    require_min(given, max_train=1, max_eval=1, batch_size=1, max_length=2)
    require_unit(given, "validation_fraction", "test_fraction", closed_low=True)
    return given if only_given else {**DATA_DEFAULTS, **given}


def max_positions(model: Any) -> int | None:
    """How many tokens the model's position embeddings (and its tokenizer) allow, or None if unbounded."""
    cfg = model.backbone.config
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and cfg.model_type in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        limit -= (cfg.pad_token_id or 0) + 1  # positions start after the padding index
    tok = getattr(model, "tokenizer", None)
    tok_max = getattr(tok, "model_max_length", None) if tok is not None else None
    if tok_max and tok_max < 1_000_000:
        limit = min(limit, tok_max) if limit else tok_max
    return limit


def fit_max_length(model: Any, max_length: int, *, given: bool) -> int:
    """``max_length`` within what the model can embed: a given --max-length beyond it is refused (it
    would fail inside the forward); a default one is lowered to the model's limit."""
    limit = max_positions(model)
    if limit is None or max_length <= limit:
        return max_length
    if given:
        raise ValueError(f"--max-length {max_length} is beyond this model's {limit} positions; "
                         f"use --max-length {limit} or less")
    return limit


def parse_pairs(text: str, flag: str) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"}; a ValueError names ``flag`` on a bad item."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"{flag}: expected NAME=VALUE items separated by commas, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_from_settings(settings: dict[str, Any], *, label_names: Sequence[str] | None = None,
                       regression: bool = False) -> Any:
    """:func:`offramp.data.load_data` with the stored / given data settings."""
    from offramp.data import Columns, load_data

    if not settings.get("data"):
        raise ValueError("no data given: pass --data (the checkpoint does not record any)")
    return load_data(settings["data"], config=settings.get("config"),
                     columns=Columns(settings.get("text_column"), settings.get("pair_column"),
                                     settings.get("label_column")),
                     seed=settings["seed"], validation_fraction=settings["validation_fraction"],
                     test_fraction=settings["test_fraction"], label_names=label_names, regression=regression,
                     max_train=settings.get("max_train"), max_eval=settings.get("max_eval"),
                     hub_splits=settings.get("hub_splits"))


def batches(split: Any, tokenizer: Any, settings: dict[str, Any], *, shuffle: bool = False,
            lazy: bool = False) -> Any:
    """Padded batches of ``split`` (a DataLoader when ``lazy``, else a list)."""
    from offramp.data import make_loader

    loader = make_loader(split, tokenizer, batch_size=settings["batch_size"], max_length=settings["max_length"],
                         shuffle=shuffle, seed=settings["seed"])
    return loader if lazy else list(loader)


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_dir(path: str | Path) -> Path:
    """``path`` if it is (or holds, under checkpoint/) an offramp checkpoint; else a ValueError."""
    from offramp.config import CONFIG_NAME

    p = Path(path)
    for cand in (p, p / "checkpoint"):
        if (cand / CONFIG_NAME).is_file():
            return cand
    raise ValueError(f"{p} is not an offramp checkpoint folder ({CONFIG_NAME} not found in it or in "
                     f"{p / 'checkpoint'}); give the --out folder of `offramp train` or a save_pretrained folder")


def checkpoint_kind(path: str | Path) -> str:
    """The kind of the checkpoint at ``path`` ("classifier", "token_exits"); a ValueError naming what
    the folder is otherwise."""
    from offramp.config import read_config
    from offramp.utils import readable_dir

    p = Path(path)
    folder = p if (readable_dir(p) / "offramp_config.json").is_file() or not (p / "checkpoint").is_dir() \
        else p / "checkpoint"
    return read_config(readable_dir(folder))[0]


def model_and_data(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """The checkpoint of ``args.model`` and its data (stored settings, overridden by given ones)."""
    from offramp import EarlyExitModel

    given = data_settings(args, only_given=True)
    model = EarlyExitModel.from_pretrained(checkpoint_dir(args.model))
    settings = {**DATA_DEFAULTS, **model.config.extra.get("data", {}), **given}
    settings["max_length"] = fit_max_length(model, settings["max_length"], given="max_length" in given)
    data = load_from_settings(settings, label_names=model.config.label_names,
                              regression=model.config.is_regression)
    return model, data, settings


def tokenizer_of(model: Any) -> Any:
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: save one with the checkpoint (the backbone folder "
                         "must include its tokenizer files)")
    return model.tokenizer


def check_out(path: Path, overwrite: bool, what: str) -> None:
    """Refuse, before any work, an output path that cannot be written: an existing non-empty one
    (unless ``overwrite``), one below a regular file, or one in a folder this process cannot write."""
    import tempfile

    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what} {path}: {parent} is a file, not a folder; choose another --out")
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise ValueError(f"{what} {path} already exists; pass --overwrite to replace what it holds, "
                         "or choose another --out")
    base = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    base = base if base.is_dir() else base.parent
    try:  # the one test that works for every reason a write can fail (permissions, read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".offramp-write-check.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be written: {base} is not writable ({e.strerror}); "
                         "choose another --out") from None


def default_pooling(model: str) -> str:
    """"mean" for a sentence-transformers folder trained with mean pooling (its 1_Pooling config),
    else "cls" (the first token through the model's pooler)."""
    path = Path(model) / "1_Pooling" / "config.json"
    if path.is_file():
        try:
            if json.loads(path.read_text()).get("pooling_mode_mean_tokens"):
                return "mean"
        except json.JSONDecodeError:
            pass
    return "cls"


def parse_exits(text: str) -> list[int] | None:
    """'all' -> None; '2,4,6' -> [2, 4, 6]."""
    if text.strip().lower() == "all":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--exits must be 'all' or comma-separated layer numbers like 2,4,6; got {text!r}") from None


# --------------------------------------------------------------------------------------- policies
def add_policy_args(p: argparse.ArgumentParser, *, generation: bool = False) -> None:
    names = ("token_confidence, max_prob, entropy, margin, patience, saturation, static, never" if generation
             else "entropy, max_prob, margin, patience, q_exit, ponder_sample, gate, static, never, ...")
    p.add_argument("--policy", default=None,
                   help=f"policy name ({names}) or a JSON object; default: the checkpoint's policy")
    p.add_argument("--value", type=float, default=None,
                   help="the policy's parameter, as in the sweep: threshold, patience, q or layer")


def make_policy_arg(name: str | None, value: float | None, default: dict[str, Any]) -> Any:
    """The policy named on the command line (or ``default``), with ``value`` set on its parameter."""
    from offramp.policies import make_policy

    if name is None:
        spec: Any = dict(default)
    elif name.strip().startswith("{"):
        try:
            spec = json.loads(name)
        except json.JSONDecodeError as e:
            raise ValueError(f"--policy is not valid JSON: {e}") from None
    else:
        spec = {"type": name}
    policy = make_policy(spec)
    if value is None:
        return policy
    field = policy.threshold_field
    if field is None:
        raise ValueError(f"policy {policy.type!r} has no parameter for --value; drop --value")
    current = getattr(policy, field)
    if isinstance(current, int) and not isinstance(current, bool):
        if not float(value).is_integer():
            raise ValueError(f"--value for {policy.type!r} sets {field}, an integer; got {value}")
        value = int(value)
    return policy.with_threshold(value)


def parse_grids(items: Sequence[str]) -> dict[str, list[float]]:
    """['entropy=0.1,0.2'] -> {"entropy": [0.1, 0.2]} (integers kept as int)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid expects RULE=V1,V2,..., got {item!r}")
        rule, values = item.split("=", 1)
        try:
            nums = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--grid {rule}: values must be numbers, got {values!r}") from None
        bad = [v for v in nums if not np.isfinite(v)]
        if bad:
            raise ValueError(f"--grid {rule}: {bad[0]} is not a finite number; give values such as {rule}=0.5,0.7")
        if not nums:
            raise ValueError(f"--grid {rule}: no values; give them as {rule}=V1,V2,...")
        out[rule.strip()] = [int(v) if v.is_integer() and "." not in values else v for v in nums]
    return out


# ------------------------------------------------------------------------------------------ traces
def trace_flops(trace: Any) -> Any:
    """The ExitFlops stored with a trace by `offramp collect`, or None."""
    from offramp.evaluation.flops import ExitFlops

    f = trace.meta.get("flops") if isinstance(trace.meta, dict) else None
    if not f:
        return None
    return ExitFlops(tuple(f["exit_layers"]), np.asarray(f["per_exit"], dtype=np.float64), float(f["full"]),
                     float(f["embeddings"]), float(f["layer"]), float(f["head"]), float(f["extra"]))


def per_exit_metric(trace: Any) -> list[float] | None:
    """Accuracy of each exit over the trace (None for regression or without labels)."""
    if trace.labels is None or trace.logits.shape[-1] == 1:
        return None
    return [round(float(x), 4) for x in (trace.logits.argmax(-1) == trace.labels[None]).float().mean(1)]


def reliability_curves(trace: Any, chosen: dict[str, Any]) -> dict[str, dict] | None:
    """Reliability bins of the last exit and of each chosen rule's exits (classification only)."""
    from offramp.evaluation.collect import replay
    from offramp.evaluation.report import reliability_bins, softmax_confidence

    if trace.labels is None or trace.logits.shape[-1] == 1:
        return None
    labels = trace.labels.numpy()
    curves = {}
    last = trace.logits[-1].numpy()
    curves["full model"] = reliability_bins(softmax_confidence(last), last.argmax(-1) == labels)
    for rule, point in chosen.items():
        if point is not None and point.policy:
            logits = replay(point.policy, trace)[1].numpy()
            curves[rule] = reliability_bins(softmax_confidence(logits), logits.argmax(-1) == labels)
    return curves


# ---------------------------------------------------------------------------------------- predict
def read_texts(texts: Sequence[str], file: str | None, text_column: str | None) -> list[str]:
    """Texts from arguments, a file (.txt lines, or a .csv/.tsv/.jsonl column), or stdin."""
    from offramp.data.sources import LOCAL_SUFFIXES, decode_text, read_user_text, table_texts

    if file:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"--file {path} does not exist")
        if path.suffix.lower() in LOCAL_SUFFIXES:
            out = table_texts(path, text_column)
        else:
            out = [line for line in read_user_text(path).splitlines() if line.strip()]
    elif texts and texts != ["-"]:
        out = list(texts)
    elif not sys.stdin.isatty():
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
        out = [line for line in decode_text(data, "standard input").splitlines() if line.strip()]
    else:
        raise ValueError("no texts: give them as arguments, with --file, or on stdin")
    if not out:
        raise ValueError("no texts to classify (the input is empty)")
    return out


def predict_rows(model: Any, texts: Sequence[str], policy: Any, *, batch_size: int = 32,
                 max_length: int = 128) -> Iterator[dict[str, Any]]:
    """One dict per text: label (name), confidence, exit_layer (value instead of label for regression)."""
    from offramp.data import TokenizedSplit
    from offramp.data.batching import check_texts
    from offramp.data.splits import TextSplit
    from offramp.utils import progress

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
    from offramp.evaluation.evaluate import warn_first_exit

    warn_first_exit(exit_index, list(model.exit_layers), f"policy {policy.to_dict()}",
                    "if that loses too much accuracy, use a stricter --value (or another --policy)")
