"""The configs of offramp's checkpoints: one file format, one version scheme, a ``kind`` per model.

Every checkpoint folder holds ``offramp_config.json`` = ``{"kind": ..., "format_version": 2, ...}``:

- ``classifier``: ``OfframpConfig``, an encoder with exit classifiers (``EarlyExitModel``);
- ``token_exits``: ``DecoderExitConfig``, exit heads + confidence classifiers on a decoder LM
  (``DecoderExitModel``).

``read_config`` reads any of them, upgrades the files of the previous release (classifier
``format_version`` 1; decoder ``format: decoder-exits/1``) and says what a folder of another kind
is and which command takes it. Configs store names and plain values only (never classes),
round-trip through JSON, and validate themselves in ``__post_init__`` with a ValueError naming the
field.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from offramp.names import CLASSIFY_POLICIES, CONFIG_NAME, DTYPES, GENERATION_POLICIES  # noqa: F401 (DTYPES: --dtype)
from offramp.policies import make_policy
from offramp.utils import atomic_write_json, read_json
from offramp.version import __version__

FORMAT_VERSION = 2
KINDS = {"classifier": "a classifier with exits (EarlyExitModel)",
         "token_exits": "token exits for a decoder LM (DecoderExitModel)"}
KIND_USE = {"classifier": "offramp predict / evaluate / collect / calibrate --model PATH, or "
                          "EarlyExitModel.from_pretrained",
            "token_exits": "offramp generate --exits PATH, offramp collect / calibrate --model PATH, or "
                           "DecoderExitModel.from_pretrained"}
OTHER_FOLDERS = {  # folders offramp writes that are not models: file that marks them -> what they are
    "trace.json": "an exit trace (offramp sweep / calibrate --trace PATH)",
    "probe.json": "a LYNX probe (offramp reason run --probe PATH)",
    "manifest.json": "a reasoning event dataset (offramp reason fit --events PATH)",
    "report.json": "a sweep report (open its report.md)"}


def upgrade_config(data: dict[str, Any], where: str = "the config") -> tuple[str, dict[str, Any]]:
    """(kind, fields) of a config dict of any format offramp wrote; a ValueError for others."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: an offramp config is a JSON object, got a {type(data).__name__}")
    data = dict(data)
    data.pop("offramp_version", None)
    if "kind" in data:
        kind, version = data.pop("kind"), data.pop("format_version", None)
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown checkpoint kind {kind!r}; this offramp reads {sorted(KINDS)}")
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: config format {version!r}; this offramp reads format {FORMAT_VERSION}: "
                             "install the offramp version that wrote it")
        return kind, data
    if data.get("format") == "decoder-exits/1":  # token exits of the previous release
        data.pop("format")
        threshold = data.pop("threshold", 0.9)
        data.setdefault("policy", {"type": "token_confidence", "threshold": threshold})
        return "token_exits", data
    version = data.pop("format_version", None)
    if version == 1:  # a classifier of the previous release: same fields
        return "classifier", data
    raise ValueError(f"{where}: not an offramp config (no kind, format {version!r}); save the model again with "
                     "save_pretrained")


def read_config(directory: str | os.PathLike, expect: str | None = None) -> tuple[str, dict[str, Any]]:
    """(kind, fields) of the checkpoint in ``directory``; ``expect`` refuses another kind with a
    message naming what the folder holds and which command takes it."""
    folder = Path(directory)
    path = folder / CONFIG_NAME
    if not path.is_file():
        other = next((what for name, what in OTHER_FOLDERS.items() if (folder / name).is_file()), None)
        if other:
            raise ValueError(f"{directory} is {other}, not a model checkpoint")
        raise ValueError(f"{directory} is not an offramp checkpoint: {CONFIG_NAME} is missing "
                         "(save one with save_pretrained, `offramp train` or `offramp fit-exits`)")
    data = read_json(path, "offramp config", "the checkpoint is damaged: train or save it again")
    kind, data = upgrade_config(data, str(path))
    if expect is not None and kind != expect:
        raise ValueError(f"{directory} holds {KINDS[kind]}, not {KINDS[expect]}: use it with {KIND_USE[kind]}")
    return kind, data


def config_fields(data: Any, kind: str) -> dict[str, Any]:
    """The fields of a config dict for ``kind``: as written (with its kind / format marks, upgraded)
    or already upgraded by ``read_config``."""
    if not isinstance(data, dict):
        raise ValueError(f"an offramp config is a JSON object, got a {type(data).__name__}")
    if "kind" in data or "format_version" in data or "format" in data:
        found, data = upgrade_config(data)
        if found != kind:
            raise ValueError(f"this config is for {KINDS[found]}, not {KINDS[kind]}")
    data = dict(data)
    data.pop("offramp_version", None)
    return data


def config_dict(kind: str, fields_: dict[str, Any]) -> dict[str, Any]:
    """The JSON object written for a config of ``kind``."""
    return {"kind": kind, "format_version": FORMAT_VERSION, "offramp_version": __version__, **fields_}

HEAD_DEFAULTS = {"type": "linear", "shared": False, "pooling": "cls", "use_pooler": True, "dropout": 0.1,
                 "hidden": 256}  # hidden: the width of an "mlp" head's one hidden layer
HEAD_TYPES = ("linear", "mlp")
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
    "joint": {"weights": "uniform", "distill": 0.0, "temperature": 1.0, "converge": 0.0},
    "ponder": {"beta": 0.5, "lambda_p": 0.1, "kl_direction": "prior_to_model", "truncation": "force_last",
               "epsilon": 0.05, "kl_target": "batch", "heads": 1.0},
}
KL_DIRECTIONS = ("prior_to_model", "model_to_prior")  # KL(p_G || p) as shipped code; KL(p || p_G) as in the paper
TRUNCATIONS = ("force_last", "epsilon")
KL_TARGETS = ("batch", "row")  # the batch's mean exit distribution (default) or each row's (the papers')


def _merge(name: str, given: dict | None, defaults: dict) -> dict:
    """``given`` over ``defaults``: an unknown key, or a value not of its default's JSON type (a
    string where a number belongs), is a ValueError naming it."""
    given = dict(given or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}; known keys are {sorted(defaults)}")
    for key, value in given.items():
        kind = _json_kind(defaults[key])
        if kind is not None and value is not None and _json_kind(value) not in (kind, *(("int",) if kind == "number"
                                                                                        else ())):
            raise ValueError(f"{name.split(' ')[0]}.{key} must be {_KIND_WORDS[kind]}, got {value!r}")
    return {**defaults, **given}


_KIND_WORDS = {"bool": "true or false", "int": "an integer", "number": "a number", "str": "a string",
               "list": "a list", "dict": "a JSON object"}


def _json_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    for kind, types in (("str", str), ("list", (list, tuple)), ("dict", dict)):
        if isinstance(value, types):
            return kind
    return None



# ------------------------------------------------------------ JEI-DNN gates and objective (validated here)
GATE_DEFAULTS: dict[str, Any] = {"type": "uncertainty", "init_bias": 0.0}
JEI_DEFAULTS: dict[str, Any] = {
    "cost_weight": 0.1,        # lambda: the CE / cost trade-off (sweep it for the Pareto curve)
    "pos_weight": "none",      # the gates' positive-class weight: "none" | "balanced" | "exact"
    "pos_weight_clip": 5.0,    # clip of the balanced / exact positive-class weights
    "patience": 3,             # warm-up: freeze an exit when its val accuracy stops improving
    "phase_batches": 200,      # alternate IM and gate phases every this many batches
    "warmup_epochs": 10,       # at most this many warm-up epochs
    "reweight_detach": True,   # treat sum CE / sum P CE as a constant (see the module docstring)
    "costs": None,             # per-exit costs c_l; None: from the FLOPs counter
    "phase": "both",           # what jei_loss trains in a generic loop: "warmup" | "im" | "gate" | "both"
}
PHASES = ("warmup", "im", "gate", "both")
POS_WEIGHTS = ("none", "balanced", "exact")


def check_gate_config(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gate config with defaults filled in (None stays None); ValueError naming a bad key."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ValueError(f"gate must be None or a dict like {{'type': 'uncertainty'}}, got {cfg!r}")
    unknown = set(cfg) - set(GATE_DEFAULTS)
    if unknown:
        raise ValueError(f"gate: unknown keys {sorted(unknown)}; known keys are {sorted(GATE_DEFAULTS)}")
    out = {**GATE_DEFAULTS, **cfg}
    if out["type"] != "uncertainty":
        raise ValueError(f"gate.type must be 'uncertainty' (the JEI-DNN four-feature gate), got {out['type']!r}")
    return out


def check_jei_options(options: dict[str, Any]) -> dict[str, Any]:
    """The JEI objective options with defaults filled in; ValueError naming a bad key or value."""
    options = {k: v for k, v in dict(options).items() if k != "type"}
    unknown = set(options) - set(JEI_DEFAULTS)
    if unknown:
        raise ValueError(f"objective (jei): unknown keys {sorted(unknown)}; known keys are {sorted(JEI_DEFAULTS)}")
    out = {**JEI_DEFAULTS, **options}
    if out["cost_weight"] < 0:
        raise ValueError(f"objective.cost_weight (lambda) must be >= 0, got {out['cost_weight']}")
    if out["pos_weight_clip"] <= 0:
        raise ValueError(f"objective.pos_weight_clip must be > 0, got {out['pos_weight_clip']}")
    if int(out["warmup_epochs"]) < 0:
        raise ValueError(f"objective.warmup_epochs must be >= 0, got {out['warmup_epochs']}")
    if int(out["patience"]) < 1 or int(out["phase_batches"]) < 1:
        raise ValueError("objective.patience and objective.phase_batches must be >= 1")
    if out["pos_weight"] not in POS_WEIGHTS:
        raise ValueError(f"objective.pos_weight must be one of {POS_WEIGHTS}, got {out['pos_weight']!r}")
    if out["phase"] not in PHASES:
        raise ValueError(f"objective.phase must be one of {PHASES}, got {out['phase']!r}")
    return out

def _refuse_unknown_keys(data: dict[str, Any], cls: type) -> None:
    """A key the config class does not have is an error naming the known ones (a key ignored in
    silence would be a setting that does nothing)."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {unknown} in a {cls.kind!r} config; it takes "
                         f"{known} (a config written by a newer offramp needs that release)")


@dataclass
class OfframpConfig:
    """Configuration of an early-exit model.

    Args:
        base_model_name_or_path: the HF backbone (Hub id or local folder) the exits are added to.
        num_labels: number of classes; 1 means regression (MSE loss, patience uses a tolerance).
        exit_layers: 1-based layer numbers that carry an exit; None means every layer.
        head: exit classifier: {"type": "linear" | "mlp" (one hidden layer of "hidden" units, GELU),
            "shared": bool, "pooling": "cls" | "mean", "use_pooler": bool (the backbone's pooler on
            the CLS token, if it has one), "dropout", "hidden"}.
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
        self._check_types()
        self._check_exit_layers()
        self._check_head_and_halting()
        self._check_objective()
        if not isinstance(self.policy, dict) or "type" not in self.policy:
            raise ValueError(f"policy must be a dict with a 'type', got {self.policy!r}")
        if self.policy["type"] not in CLASSIFY_POLICIES:
            raise ValueError(f"policy {self.policy['type']!r} does not exit a classifier's layers; a classifier "
                             f"takes {', '.join(CLASSIFY_POLICIES)}")
        if self.label_names is not None and self.num_labels > 1 and len(self.label_names) != self.num_labels:
            raise ValueError(f"label_names has {len(self.label_names)} names but num_labels is {self.num_labels}")
        for f in fields(self):
            try:
                json.dumps(getattr(self, f.name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{f.name} must hold only JSON values (str, numbers, lists, dicts; a path as "
                                 f"str(path)): {e}") from None

    def _check_types(self) -> None:
        """Every field of the JSON type it is stored as."""
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
        for key in ("data", "train", "calibration"):  # what offramp itself stores in extra
            if self.extra.get(key) is not None and not isinstance(self.extra[key], dict):
                raise ValueError(f"extra.{key} must be a JSON object, got {self.extra[key]!r}")
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

    def _check_exit_layers(self) -> None:
        """1-based, strictly increasing, non-empty (or None: every layer)."""
        if self.exit_layers is not None:
            layers = list(self.exit_layers)
            if not layers:
                raise ValueError("exit_layers must not be empty: give 1-based layer numbers or None for all")
            if any((not isinstance(x, int)) or x < 1 for x in layers):
                raise ValueError(f"exit_layers must be 1-based layer numbers (>= 1), got {layers}")
            if sorted(set(layers)) != layers:
                raise ValueError(f"exit_layers must be strictly increasing without repeats, got {layers}")
            self.exit_layers = layers

    def _check_head_and_halting(self) -> None:
        """The head, the halting layer and the gates, with defaults filled in."""
        self.head = _merge("head", self.head, HEAD_DEFAULTS)
        if self.head["type"] not in HEAD_TYPES:
            raise ValueError(f"head.type must be one of {', '.join(HEAD_TYPES)}, got {self.head['type']!r}")
        hidden = self.head["hidden"]
        if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= 1 << 16:
            raise ValueError(f"head.hidden must be an integer in [1, 65536], got {hidden!r}")
        if self.head["pooling"] not in ("cls", "mean"):
            raise ValueError(f"head.pooling must be 'cls' or 'mean', got {self.head['pooling']!r}")
        if not 0 <= self.head["dropout"] < 1:
            raise ValueError(f"head.dropout must be in [0, 1), got {self.head['dropout']!r}")
        if self.halting is not None:
            self.halting = _merge("halting", self.halting, HALTING_DEFAULTS)
            if self.halting["type"] not in ("pondernet", "palbert"):
                raise ValueError(f"halting.type must be 'pondernet' or 'palbert', got {self.halting['type']!r}")
            if self.halting["variant"] not in ("concat", "diff", "rnn"):
                raise ValueError(f"halting.variant must be concat, diff or rnn, got {self.halting['variant']!r}")
            if self.halting["position"] not in ("none", "random", "sinusoidal"):
                raise ValueError(
                    f"halting.position must be none, random or sinusoidal, got {self.halting['position']!r}")
            if not 0 <= self.halting["num_layers"] <= 16:  # each is a d x d layer; the papers use 1
                raise ValueError(f"halting.num_layers must be in [0, 16], got {self.halting['num_layers']}")
            if not 0 <= self.halting["dropout"] < 1:
                raise ValueError(f"halting.dropout must be in [0, 1), got {self.halting['dropout']!r}")
        if self.gate is not None:
            self.gate = check_gate_config(self.gate)

    def _check_objective(self) -> None:
        """The objective with its defaults, and what it needs of the model."""
        obj = dict(self.objective or {"type": "joint"})
        kind = obj.pop("type", "joint")
        if kind in OBJECTIVE_DEFAULTS:
            obj = _merge(f"objective ({kind})", obj, OBJECTIVE_DEFAULTS[kind])
        elif kind == "jei":
            obj = check_jei_options(obj)
            if self.gate is None:
                raise ValueError("objective 'jei' needs exit gates: set gate={'type': 'uncertainty'}")
        else:
            raise ValueError(f"objective.type must be one of joint, ponder, jei; got {kind!r}")
        if kind == "joint" and obj["weights"] not in ("uniform", "pabee"):
            raise ValueError(f"objective.weights must be 'uniform' or 'pabee', got {obj['weights']!r}")
        if kind == "joint" and not 0 <= obj["converge"] < float("inf"):
            raise ValueError(f"objective.converge must be a weight >= 0, got {obj['converge']!r}")
        if kind == "ponder":
            if obj["kl_direction"] not in KL_DIRECTIONS:
                raise ValueError(f"objective.kl_direction must be one of {KL_DIRECTIONS}, got {obj['kl_direction']!r}")
            if obj["truncation"] not in TRUNCATIONS:
                raise ValueError(f"objective.truncation must be one of {TRUNCATIONS}, got {obj['truncation']!r}")
            if obj["kl_target"] not in KL_TARGETS:
                raise ValueError(f"objective.kl_target must be one of {KL_TARGETS}, got {obj['kl_target']!r}")
            if not 0 <= obj["heads"] < float("inf"):
                raise ValueError(f"objective.heads must be a weight >= 0, got {obj['heads']!r}")
            if not 0 < obj["lambda_p"] < 1:
                raise ValueError(f"objective.lambda_p must be in (0, 1), got {obj['lambda_p']}")
            if self.halting is None:
                raise ValueError("objective 'ponder' needs a halting layer: set halting={'type': 'palbert'} "
                                 "or {'type': 'pondernet'}")
        self.objective = {"type": kind, **obj}

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    kind = "classifier"

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self.kind, asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OfframpConfig":
        data = config_fields(data, cls.kind)
        _refuse_unknown_keys(data, cls)
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_json(Path(directory) / CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "OfframpConfig":
        _, data = read_config(directory, expect=cls.kind)
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{Path(directory) / CONFIG_NAME}: {e}; the checkpoint is damaged or was edited by "
                             "hand") from None


@dataclass
class DecoderExitConfig:
    """What a ``DecoderExitModel`` adds to its decoder backbone (kind ``token_exits``).

    Args:
        exit_layers: layers run before each exit, increasing, each in [1, num_layers - 1].
        num_layers, model_type: of the backbone, checked on load.
        head: exit head type ("tied", "ffn", "block", "mamba") and its keyword arguments.
        confidence_hidden: width of the confidence classifier.
        top_k: an exit counts as correct when its top token is in the final layer's top-k.
        policy: the default exit policy of generation, {"type": name, **parameters}: ``never``
            (every layer) until ``offramp calibrate`` writes a certified one here (its bound goes to
            ``extra["calibration"]``); an uncalibrated rule is never a folder's default.
        cache_strategy: default cache strategy (copy_kv | propagate | catch_up | freeze | update).
        base_model_name_or_path: where ``from_pretrained`` loads the backbone from.
        extra: free-form metadata (training data, calibration results, ...).
        draft_vocab: token ids by falling frequency in the text the exits were fitted on (None:
            not recorded); self-speculation can draft among its first k (``--draft-vocab k``).
    """

    exit_layers: list[int]
    num_layers: int
    model_type: str
    head: dict = field(default_factory=lambda: {"type": "ffn"})
    confidence_hidden: int = 64
    top_k: int = 1
    policy: dict[str, Any] = field(default_factory=lambda: {"type": "never"})
    cache_strategy: str | None = None
    base_model_name_or_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    draft_vocab: list[int] | None = None

    kind = "token_exits"

    def __post_init__(self) -> None:
        if isinstance(self.base_model_name_or_path, os.PathLike):
            self.base_model_name_or_path = os.fspath(self.base_model_name_or_path)
        if not isinstance(self.exit_layers, (list, tuple)) or not all(isinstance(k, int) for k in self.exit_layers):
            raise ValueError(f"exit_layers must be a list of layer numbers, got {self.exit_layers!r}")
        layers = list(self.exit_layers)
        if not layers:
            raise ValueError("exit_layers is empty: give at least one layer in [1, num_layers - 1]")
        bad = [k for k in layers if not 1 <= k < self.num_layers]
        if bad:
            raise ValueError(f"exit_layers {bad} out of range: each must be in [1, {self.num_layers - 1}] "
                             f"for a {self.num_layers}-layer model")
        if layers != sorted(set(layers)):
            raise ValueError(f"exit_layers must be strictly increasing, got {layers}")
        self.exit_layers = layers
        if not isinstance(self.head, dict) or "type" not in self.head:
            raise ValueError("head must name its type, e.g. {'type': 'ffn'}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if isinstance(self.confidence_hidden, bool) or not isinstance(self.confidence_hidden, int) or \
                not 1 <= self.confidence_hidden <= 1 << 16:
            raise ValueError(f"confidence_hidden must be an integer in [1, 65536], got {self.confidence_hidden!r}")
        if self.extra is None:
            self.extra = {}
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a JSON object, got {self.extra!r}")
        if self.draft_vocab is not None and (not isinstance(self.draft_vocab, list) or not self.draft_vocab or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.draft_vocab)):
            raise ValueError("draft_vocab must be a non-empty list of token ids (ints >= 0) or null: fit the exits "
                             "again (offramp fit-exits) to record it")
        if not isinstance(self.policy, dict) or "type" not in self.policy:
            raise ValueError(f"policy must be a dict with a 'type', got {self.policy!r}")
        if self.policy["type"] not in GENERATION_POLICIES:
            raise ValueError(f"policy {self.policy['type']!r} does not exit a decoder's layers; token exits take "
                             f"{', '.join(GENERATION_POLICIES)}")
        make_policy(self.policy)  # a bad stored policy is an error on load, not at the first token
        for f in fields(self):
            try:
                json.dumps(getattr(self, f.name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{f.name} must hold only JSON values: {e}") from None

    def to_dict(self) -> dict:
        return config_dict(self.kind, asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderExitConfig":
        data = config_fields(data, cls.kind)
        _refuse_unknown_keys(data, cls)
        return cls(**data)
