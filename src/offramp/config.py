"""OfframpConfig: what exits a model has, what sits on them, and how they are trained and used.

The config stores names and plain values only (never classes), round-trips through JSON, and
validates itself in ``__post_init__`` with a ValueError naming the field.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from offramp.utils import atomic_write_json, read_json

CONFIG_NAME = "offramp_config.json"
FORMAT_VERSION = 1

HEAD_DEFAULTS = {"type": "linear", "shared": False, "pooling": "cls", "use_pooler": True, "dropout": 0.1}
HALTING_DEFAULTS = {
    "type": "palbert",          # "pondernet": input = current pooled state; "palbert": revisited
    "variant": "concat",        # palbert input: "concat" | "diff" | "rnn"
    "num_layers": 1,            # n x [Linear -> Tanh] before the output Linear
    "position": "sinusoidal",   # layer-position embedding e_i: "none" | "random" | "sinusoidal"
    "dropout": 0.1,
    "detach": False,            # detach the halting layer's input from the backbone
    "lr": None,                 # its own learning rate (None: the model's)
}
OBJECTIVE_DEFAULTS = {
    "joint": {"weights": "uniform", "distill": 0.0, "temperature": 1.0},
    "ponder": {"beta": 0.5, "lambda_p": 0.1, "kl_direction": "prior_to_model", "truncation": "force_last",
               "epsilon": 0.05},
}
KL_DIRECTIONS = ("prior_to_model", "model_to_prior")  # KL(p_G || p) as shipped code; KL(p || p_G) as in the paper
TRUNCATIONS = ("force_last", "epsilon")


def _merge(name: str, given: dict | None, defaults: dict) -> dict:
    given = dict(given or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}; known keys are {sorted(defaults)}")
    return {**defaults, **given}


@dataclass
class OfframpConfig:
    """Configuration of an early-exit model.

    Args:
        base_model_name_or_path: the HF backbone (Hub id or local folder) the exits are added to.
        num_labels: number of classes; 1 means regression (MSE loss, patience uses a tolerance).
        exit_layers: 1-based layer numbers that carry an exit; None means every layer.
        head: exit classifier: {"type": "linear", "shared": bool, "pooling": "cls" | "mean",
            "use_pooler": bool (the backbone's pooler on the CLS token, if it has one), "dropout"}.
        halting: None, or a PonderNet / PALBERT halting (Lambda) layer, see ``HALTING_DEFAULTS``.
        gate: None, or JEI-DNN exit gates (see ``offramp.heads.gate``).
        objective: {"type": "joint" | "ponder" | "jei", ...}; see ``OBJECTIVE_DEFAULTS``.
        policy: the default exit policy, {"type": name, **parameters}.
        label_names: optional class names (index order).
        backbone_model_type: the HF model_type of the backbone (filled in by the model).
        extra: free-form metadata (training data, calibration results, ...).
    """

    base_model_name_or_path: str | None = None
    num_labels: int = 2
    exit_layers: list[int] | None = None
    head: dict[str, Any] = field(default_factory=dict)
    halting: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    objective: dict[str, Any] = field(default_factory=lambda: {"type": "joint"})
    policy: dict[str, Any] = field(default_factory=lambda: {"type": "never"})
    label_names: list[str] | None = None
    backbone_model_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.base_model_name_or_path, os.PathLike):
            self.base_model_name_or_path = os.fspath(self.base_model_name_or_path)
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path must be a Hub id or a folder path, got "
                             f"{self.base_model_name_or_path!r}")
        if self.extra is None:
            self.extra = {}
        for name in ("head", "extra", "objective", "policy"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict (a JSON object), got {getattr(self, name)!r}")
        for name in ("halting", "gate"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict (a JSON object) or None, got {getattr(self, name)!r}")
        if self.exit_layers is not None and not isinstance(self.exit_layers, (list, tuple)):
            raise ValueError(f"exit_layers must be a list of 1-based layer numbers or None, got {self.exit_layers!r}")
        if self.label_names is not None:
            if not isinstance(self.label_names, (list, tuple)) or not all(isinstance(n, str) for n in self.label_names):
                raise ValueError(f"label_names must be a list of strings or None, got {self.label_names!r}")
            self.label_names = list(self.label_names)
        if not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"num_labels must be an integer >= 1 (1 = regression), got {self.num_labels!r}")
        if self.exit_layers is not None:
            layers = list(self.exit_layers)
            if not layers:
                raise ValueError("exit_layers must not be empty: give 1-based layer numbers or None for all")
            if any((not isinstance(x, int)) or x < 1 for x in layers):
                raise ValueError(f"exit_layers must be 1-based layer numbers (>= 1), got {layers}")
            if sorted(set(layers)) != layers:
                raise ValueError(f"exit_layers must be strictly increasing without repeats, got {layers}")
            self.exit_layers = layers
        self.head = _merge("head", self.head, HEAD_DEFAULTS)
        if self.head["type"] != "linear":
            raise ValueError(f"head.type must be 'linear', got {self.head['type']!r}")
        if self.head["pooling"] not in ("cls", "mean"):
            raise ValueError(f"head.pooling must be 'cls' or 'mean', got {self.head['pooling']!r}")
        if self.halting is not None:
            self.halting = _merge("halting", self.halting, HALTING_DEFAULTS)
            if self.halting["type"] not in ("pondernet", "palbert"):
                raise ValueError(f"halting.type must be 'pondernet' or 'palbert', got {self.halting['type']!r}")
            if self.halting["variant"] not in ("concat", "diff", "rnn"):
                raise ValueError(f"halting.variant must be concat, diff or rnn, got {self.halting['variant']!r}")
            if self.halting["position"] not in ("none", "random", "sinusoidal"):
                raise ValueError(
                    f"halting.position must be none, random or sinusoidal, got {self.halting['position']!r}")
        if self.gate is not None:
            from offramp.heads.gate import check_gate_config

            self.gate = check_gate_config(self.gate)
        obj = dict(self.objective or {"type": "joint"})
        kind = obj.pop("type", "joint")
        if kind in OBJECTIVE_DEFAULTS:
            obj = _merge(f"objective ({kind})", obj, OBJECTIVE_DEFAULTS[kind])
        elif kind == "jei":
            from offramp.objectives.jei import check_jei_options

            obj = check_jei_options(obj)
            if self.gate is None:
                raise ValueError("objective 'jei' needs exit gates: set gate={'type': 'uncertainty'}")
        else:
            raise ValueError(f"objective.type must be one of joint, ponder, jei; got {kind!r}")
        if kind == "joint" and obj["weights"] not in ("uniform", "pabee"):
            raise ValueError(f"objective.weights must be 'uniform' or 'pabee', got {obj['weights']!r}")
        if kind == "ponder":
            if obj["kl_direction"] not in KL_DIRECTIONS:
                raise ValueError(f"objective.kl_direction must be one of {KL_DIRECTIONS}, got {obj['kl_direction']!r}")
            if obj["truncation"] not in TRUNCATIONS:
                raise ValueError(f"objective.truncation must be one of {TRUNCATIONS}, got {obj['truncation']!r}")
            if not 0 < obj["lambda_p"] < 1:
                raise ValueError(f"objective.lambda_p must be in (0, 1), got {obj['lambda_p']}")
            if self.halting is None:
                raise ValueError("objective 'ponder' needs a halting layer: set halting={'type': 'palbert'} "
                                 "or {'type': 'pondernet'}")
        self.objective = {"type": kind, **obj}
        if not isinstance(self.policy, dict) or "type" not in self.policy:
            raise ValueError(f"policy must be a dict with a 'type', got {self.policy!r}")
        if self.label_names is not None and self.num_labels > 1 and len(self.label_names) != self.num_labels:
            raise ValueError(f"label_names has {len(self.label_names)} names but num_labels is {self.num_labels}")
        for f in fields(self):
            try:
                json.dumps(getattr(self, f.name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{f.name} must hold only JSON values (str, numbers, lists, dicts; a path as "
                                 f"str(path)): {e}") from None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OfframpConfig":
        if not isinstance(data, dict):
            raise ValueError(f"an offramp config is a JSON object, got a {type(data).__name__}")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        data.pop("offramp_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"this checkpoint has config format {version}; this offramp reads format "
                             f"{FORMAT_VERSION}: install the offramp version that wrote it")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            warnings.warn(f"ignoring unknown offramp config keys {sorted(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | os.PathLike) -> None:
        from offramp import __version__

        atomic_write_json(Path(directory) / CONFIG_NAME, {"offramp_version": __version__, **self.to_dict()})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "OfframpConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"{directory} is not an offramp checkpoint: {CONFIG_NAME} is missing "
                             "(save one with EarlyExitModel.save_pretrained or `offramp train`)")
        data = read_json(path, "offramp config", "the checkpoint is damaged: train or save it again")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}; the checkpoint is damaged or was edited by hand") from None
