"""Helpers shared by the ``offramp`` subcommands: data options, checkpoints, policies, output folders."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from offramp.names import CLASSIFY_POLICIES, DATA_DEFAULTS, DTYPES, GENERATION_POLICIES

# The library pieces the commands use, imported on first use (PEP 562) so that `offramp --help`
# and a bad option answer without loading torch.
_LIBRARY = {"load_from_settings": "offramp.data.batching",
            "split_batches": "offramp.data.batching", "per_exit_metric": "offramp.evaluation.report",
            "reliability_curves": "offramp.evaluation.report", "trace_flops": "offramp.evaluation.report",
            "checkpoint_dir": "offramp.utils", "checkpoint_kind": "offramp.modeling.checkpoints",
            "default_pooling": "offramp.modeling.checkpoints", "fit_max_length": "offramp.modeling.checkpoints",
            "max_positions": "offramp.modeling.checkpoints", "tokenizer_of": "offramp.modeling.predict",
            "predict_rows": "offramp.modeling.predict",
            "check_out": "offramp.utils", "log": "offramp.utils"}


def __getattr__(name: str) -> Any:
    if name in _LIBRARY:
        value = getattr(importlib.import_module(_LIBRARY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'offramp.cli.common' has no attribute {name!r}")


def inputs(**options: Any) -> dict[str, Any]:
    """{"--option": path} of what a command reads, for ``check_out``'s overlap test: ``fit_text=X``
    becomes ``--fit-text``; split files (``train=A.csv,test=B.csv``) count each file."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, str) and "=" in value and not Path(value).exists():
            for part in value.split(","):
                split, _, path = part.partition("=")
                out[f"{flag} {split.strip()}"] = path.strip() or None
        else:
            out[flag] = value
    return out


REMOVAL = "0.2.0"  # the release that drops the deprecated spellings below


class DeprecatedOption(argparse.Action):
    """An old spelling of an option: stores into the new one's destination and warns once."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        import warnings

        warnings.warn(f"{option_string} is spelled {self.new} now; {option_string} will be removed in "
                      f"offramp {REMOVAL}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def add_deprecated(p: Any, old: str, new: str, *, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden, warned spelling of ``new`` (the same destination) until ``REMOVAL``."""
    p.add_argument(old, dest=dest, action=DeprecatedOption, new=new, help=argparse.SUPPRESS, **kwargs)


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


def add_device_args(p: argparse.ArgumentParser, *, dtype_help: str = "the model's dtype") -> None:
    """--device and --dtype, the same on every command that loads a model."""
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where the model runs (default auto: the first CUDA GPU when torch sees one, else the CPU)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help=f"{dtype_help} (default float32; auto: bfloat16 where the device computes it natively, "
                        "else float32)")


def chosen_device(args: argparse.Namespace, command: str) -> Any:
    """The torch device of ``args.device``, checked before any work (a missing GPU is an error naming
    the fix); a command on a GPU says which one on stderr."""
    from offramp.devices import describe_device, resolve_device, resolve_dtype

    device = resolve_device(getattr(args, "device", "auto"))
    dtype = resolve_dtype(getattr(args, "dtype", "float32"), device)  # a bad name fails here too
    if device.type != "cpu":
        from offramp.utils import note

        note(f"offramp {command}: running on {describe_device(device)}, {str(dtype).removeprefix('torch.')}")
    return device


def add_state_cache_arg(p: argparse.ArgumentParser) -> None:
    """--state-cache: where a frozen backbone's pooled states are kept between commands."""
    p.add_argument("--state-cache", default=None, metavar="DIR|off",
                   help="keep the frozen backbone's pooled states, keyed by its weights and the exact "
                        "inputs, so that train, collect and the demo run it once per model and data "
                        "(default: states/ in $OFFRAMP_CACHE, else $XDG_CACHE_HOME/offramp, else ~/.cache/offramp; "
                        "off: do not keep)")


def state_cache(args: argparse.Namespace) -> bool | str:
    """The ``state_cache`` argument of the library calls from --state-cache."""
    from offramp.modeling.state_cache import state_cache_setting

    return state_cache_setting(getattr(args, "state_cache", None))


def data_settings(args: argparse.Namespace, *, only_given: bool = False) -> dict[str, Any]:
    """The data options of ``args`` (with defaults filled unless ``only_given``)."""
    given = {k: getattr(args, k) for k in DATA_DEFAULTS if getattr(args, k, None) is not None}
    if isinstance(given.get("hub_splits"), str):
        given["hub_splits"] = parse_pairs(given["hub_splits"], "--hub-splits")
    require_min(given, max_train=1, max_eval=1, batch_size=1, max_length=2)
    require_unit(given, "validation_fraction", "test_fraction", closed_low=True)
    return given if only_given else {**DATA_DEFAULTS, **given}


def parse_pairs(text: str, flag: str) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"}; a ValueError names ``flag`` on a bad item."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"{flag}: expected NAME=VALUE items separated by commas, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ------------------------------------------------------------------------------------ checkpoints
def model_and_data(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """The checkpoint of ``args.model`` and its data (stored settings, overridden by given ones)."""
    from offramp.utils import checkpoint_dir

    folder = checkpoint_dir(args.model)  # a wrong path is reported before any library loads
    given = data_settings(args, only_given=True)
    from offramp.data.batching import load_from_settings
    from offramp.modeling import EarlyExitModel
    from offramp.modeling.checkpoints import fit_max_length

    model = EarlyExitModel.from_pretrained(folder, device=chosen_device(args, args.command),
                                           dtype=getattr(args, "dtype", None))
    settings = {**DATA_DEFAULTS, **model.config.extra.get("data", {}), **given}
    settings["max_length"] = fit_max_length(model, settings["max_length"], given="max_length" in given)
    data = load_from_settings(settings, label_names=model.config.label_names,
                              regression=model.config.is_regression)
    return model, data, settings


def parse_exits(text: str) -> list[int] | None:
    """'all' -> None; '2,4,6' -> [2, 4, 6]."""
    if text.strip().lower() == "all":
        return None
    return parse_ints(text, "--exit-layers", "'all' or comma-separated layer numbers like 2,4,6")


def parse_ints(text: str, option: str, expected: str) -> list[int]:
    """'2,4,-1' -> [2, 4, -1]; anything else a ValueError naming ``option`` and what it takes."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{option} must be {expected}; got {text!r}")
    return values


# --------------------------------------------------------------------------------------- policies
def add_policy_args(p: argparse.ArgumentParser, *, generation: bool = False) -> None:
    names = ", ".join(GENERATION_POLICIES if generation else CLASSIFY_POLICIES)
    p.add_argument("--policy", default=None,
                   help=f"policy name ({names}) or a JSON object; default: the checkpoint's policy")
    p.add_argument("--value", type=float, default=None,
                   help="the policy's parameter, as in the sweep: threshold, patience, q or layer")


def make_policy_arg(name: str | None, value: float | None, default: dict[str, Any]) -> Any:
    """The policy named on the command line (or ``default``), with ``value`` set on its parameter;
    a rule named without --value is ``default`` when that is the rule, else an error
    (``offramp.policies.named_or_stored``)."""
    from offramp.policies import make_policy, named_or_stored

    if name is not None and value is None and not name.strip().startswith("{"):
        return named_or_stored(name, default)
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


