"""``offramp train``: exits (and a halting layer or gates) trained on a classification set."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from offramp.cli import common


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="add exits to a model and train them",
                       description="Add exits to a Hugging Face encoder and train them (frozen backbone "
                                   "by default). Writes OUT/checkpoint and OUT/metrics.json.")
    p.add_argument("--model", help="HF model name or folder, or an offline alias: minilm (all-MiniLM-L6-v2), mpnet "
                   "(all-mpnet-base-v2) (not needed with --resume)")
    common.add_data_args(p, required=False)
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    common.add_state_cache_arg(p)
    common.add_device_args(p, dtype_help="training precision: float32, or bfloat16 / float16 mixed precision "
                                         "(autocast, float32 weights)")
    p.add_argument("--select-policy", default=None, metavar="RULES",
                   help="after training, sweep these rules (comma-separated, or 'all') on the validation split "
                        "and store the cheapest setting within --select-tolerance of the full model as the "
                        "checkpoint's policy (predict and evaluate then use it)")
    p.add_argument("--select-tolerance", type=float, default=0.01,
                   help="metric points the selected setting may lose against the last exit (default 0.01)")
    _add_run_args(p)
    p.set_defaults(func=cmd_train)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """The options stored with the run (extra.train): --resume reuses them, and a flag given with
    --resume that contradicts one is an error. Defaults: TRAIN_DEFAULTS."""
    p.add_argument("--exit-layers", dest="exits", default=None, metavar="LAYERS",
                   help="'all' or 1-based layers, e.g. 2,4,6 (default all)")
    common.add_deprecated(p, "--exits", "--exit-layers", dest="exits", default=None)
    p.add_argument("--shared-head", action="store_true", default=None, help="one classifier for every exit (PALBERT)")
    p.add_argument("--head", choices=["linear", "mlp"], default=None,
                   help="the exit classifier: mlp (the default: one hidden layer of --head-hidden units) or linear")
    p.add_argument("--head-hidden", type=int, default=None, help="the mlp head's hidden width (default 256)")
    p.add_argument("--pooling", choices=["auto", "cls", "mean"], default=None,
                   help="auto (default): mean for sentence-transformers models trained with mean pooling, else cls")
    p.add_argument("--no-pooler", action="store_true", default=None, help="CLS pooling without the model's pooler")
    p.add_argument("--halting", choices=["none", "pondernet", "palbert"], default=None,
                   help="add a PonderNet / PALBERT halting layer (implies --objective ponder)")
    p.add_argument("--halting-variant", choices=["concat", "diff", "rnn"], default=None, help="default concat")
    p.add_argument("--objective", choices=["joint", "ponder", "jei"], default=None,
                   help="joint (default), ponder (with --halting), jei (JEI-DNN gates, trained with its schedule)")
    _add_objective_args(p)
    p.add_argument("--full", action="store_true", default=None, help="fine-tune the backbone too (default: exits only)")
    p.add_argument("--epochs", type=int, default=None,
                   help="the most epochs (default 30, or 10 with --full; with --resume the run's own, or more "
                        "to extend it); training stops earlier once --patience epochs bring no better "
                        "validation score")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many epochs without a better validation score (the exits' mean "
                        "accuracy; default 3; 0: train every epoch)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3")
    p.add_argument("--backbone-lr", type=float, default=None, help="backbone lr with --full (default 2e-5)")
    p.add_argument("--policy", default=None, help="default exit policy stored in the checkpoint")
    p.add_argument("--value", type=float, default=None, help="its parameter (threshold, patience, q, layer)")
    p.add_argument("--regression", action="store_true", default=None, help="numeric labels, one output, MSE")
    p.add_argument("--backbone-by-reference", action="store_true", default=None,
                   help="frozen backbone: store only the exits; the backbone is loaded from --model again")


def _add_objective_args(p: argparse.ArgumentParser) -> None:
    """The options of each objective (jei, joint, ponder)."""
    p.add_argument("--cost-weight", type=float, default=None,
                   help="jei objective: lambda, the CE / cost trade-off (default 0.1)")
    p.add_argument("--gate-pos-weight", choices=["none", "balanced", "exact"], default=None,
                   help="jei objective: the gates' positive-class weight. none (default): each gate estimates "
                        "whether exiting here is optimal, so --cost-weight moves the exits from deep to shallow; "
                        "balanced: #neg/#pos per gate (the paper's statement; it cancels most of the cost weight's "
                        "effect); exact: the paper's code")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="jei objective: most epochs of the warm-up that trains every exit classifier before the "
                        "gates (default 10; 0 skips it); an exit stops early after --warmup-patience epochs "
                        "without a validation gain")
    p.add_argument("--warmup-patience", type=int, default=None,
                   help="jei objective: warm-up epochs without validation gain before an exit is frozen (default 3)")
    p.add_argument("--weights", choices=["uniform", "pabee"], default=None,
                   help="joint objective: per-exit loss weights (pabee: j / sum j; default uniform)")
    p.add_argument("--distill", type=float, default=None,
                   help="joint objective: weight of self-distillation from the last exit (default 1; 0: none)")
    p.add_argument("--distill-temperature", dest="temperature", type=float, default=None,
                   help="joint objective: the self-distillation temperature (default 2)")
    p.add_argument("--converge", type=float, default=None,
                   help="joint objective with --full: weight of the LEAP-style term pulling each exit's pooled state "
                        "towards the last layer's (default 0)")
    p.add_argument("--beta", type=float, default=None, help="ponder objective: KL weight (default 0.5)")
    p.add_argument("--lambda-p", type=float, default=None, help="ponder objective: geometric prior (default 0.1)")
    p.add_argument("--head-loss", type=float, default=None,
                   help="ponder objective: weight of every exit's own loss beside the halting-weighted one "
                        "(default 1: the last exit keeps its accuracy; 0: the papers' loss)")
    p.add_argument("--kl-target", choices=["batch", "row"], default=None,
                   help="ponder objective: pull the batch's mean exit distribution to the prior (batch, default: "
                        "the halting then differs by input) or every row's (row: PonderNet's and PALBERT's "
                        "papers; the halting tends to copy the prior for every input)")


TRAIN_DEFAULTS: dict[str, Any] = {
    "exits": "all", "shared_head": False, "head": "mlp", "head_hidden": 256, "pooling": "auto", "no_pooler": False, "halting": "none",
    "halting_variant": "concat", "objective": None, "cost_weight": 0.1, "gate_pos_weight": "none",
    "warmup_epochs": None,
    "warmup_patience": None, "weights": "uniform", "distill": 1.0, "temperature": 2.0, "converge": 0.0,
    "beta": 0.5, "lambda_p": 0.1, "kl_target": "batch", "head_loss": 1.0, "full": False, "epochs": None,
    "patience": 3, "lr": 1e-3,
    "backbone_lr": None,
    "regression": False, "backbone_by_reference": False}
RESUME_MAY_CHANGE = ("epochs", "patience")  # a resumed run may be extended; everything else is the run's own
DEFAULT_EPOCHS = {False: 30, True: 10}  # the cap on epochs, frozen backbone / --full (early stopping ends sooner)


def _train_options(args: argparse.Namespace, stored: dict[str, Any] | None) -> dict[str, Any]:
    """The run's training options: the given flags over the defaults, or on resume the stored ones,
    with an error for every given flag that contradicts them."""
    given = {k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k, None) is not None}
    for key in ("lr", "backbone_lr"):
        if key in given and not given[key] > 0:
            raise ValueError(f"--{key.replace('_', '-')} must be > 0, got {given[key]}")
    common.require_min(given, epochs=1, warmup_epochs=0, warmup_patience=1, patience=0)
    objective = given.get("objective", (stored or {}).get("objective"))
    jei_only = [k for k in ("cost_weight", "gate_pos_weight", "warmup_epochs", "warmup_patience") if k in given]
    if jei_only and objective != "jei":
        flag = "--" + jei_only[0].replace("_", "-")
        raise ValueError(f"{flag} is an option of the JEI-DNN schedule and would do nothing here: add "
                         "--objective jei, or drop it")
    halting = given.get("halting", (stored or {}).get("halting", "none"))
    ponder_only = [k for k in ("beta", "lambda_p", "kl_target", "head_loss") if k in given]
    if ponder_only and (halting in (None, "none") or objective not in (None, "ponder")):
        flag = "--" + ponder_only[0].replace("_", "-")
        raise ValueError(f"{flag} is an option of the ponder objective (a halting layer) and would do nothing "
                         "here: add --halting palbert or --halting pondernet, or drop it")
    if stored is None:
        opts = {**TRAIN_DEFAULTS, **given}
        if opts["epochs"] is None:  # JEI-DNN runs its own schedule (a warm-up with patience, then phases)
            opts["epochs"] = 3 if opts["objective"] == "jei" else DEFAULT_EPOCHS[bool(opts["full"])]
        return opts
    for key, value in given.items():
        if key not in RESUME_MAY_CHANGE and key in stored and stored[key] != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"--resume: this run was trained with {flag} {stored[key]!r}, not {value!r}; drop "
                             f"{flag} to continue it as it was trained, or start a new run in another --out")
    return {**TRAIN_DEFAULTS, **stored, **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}}


def _stored_train_options(model: Any, ckpt: Path) -> dict[str, Any]:
    """The options a run in ``ckpt`` was trained with (``extra.train``; for checkpoints written before
    it was stored, what the training state and the config still tell)."""
    from offramp.training.loop import STATE_NAME
    from offramp.utils import load_torch_state

    if isinstance(model.config.extra.get("train"), dict):
        return dict(model.config.extra["train"])
    known: dict[str, Any] = {}
    if (ckpt / STATE_NAME).is_file():
        targs = load_torch_state(ckpt / STATE_NAME, "training state", "start a new run without --resume").get("args", {})
        known = {"full": not targs.get("frozen_backbone", True), "lr": targs.get("lr", 1e-3),
                 "backbone_lr": targs.get("backbone_lr"), "epochs": targs.get("epochs", 3),
                 "backbone_by_reference": not targs.get("save_backbone", True)}
    jei = model.config.extra.get("jei", {}).get("args")
    if jei:
        known.update(full=not jei.get("frozen_backbone", True), lr=jei.get("lr", 1e-3), epochs=jei.get("epochs", 3),
                     cost_weight=jei.get("cost_weight", 0.1), objective="jei",
                     gate_pos_weight=jei.get("pos_weight") or "balanced")
    return known


def _train_config(args: argparse.Namespace, data: Any) -> Any:
    from offramp.config import OfframpConfig

    halting = None if args.halting == "none" else {"type": args.halting, "variant": args.halting_variant}
    kind = args.objective or ("ponder" if halting else "joint")
    gate = None
    if kind == "jei":
        from offramp.training.jei import jei_config

        if halting:
            raise ValueError("--objective jei uses exit gates, not a halting layer: drop --halting")
        jei = jei_config(cost_weight=args.cost_weight, pos_weight=args.gate_pos_weight)
        objective, gate, default_policy = jei["objective"], jei["gate"], jei["policy"]
    else:
        if args.converge and not args.full:
            raise ValueError("--converge pulls the backbone's middle layers towards its last one, which a frozen "
                             "backbone cannot do: add --full, or drop --converge")
        objective = ({"type": "joint", "weights": args.weights, "distill": args.distill,
                      "temperature": args.temperature, "converge": args.converge}
                     if kind == "joint"
                     else {"type": "ponder", "beta": args.beta, "lambda_p": args.lambda_p,
                           "kl_target": args.kl_target, "heads": args.head_loss})
        default_policy = {"type": "never"}
    policy = common.make_policy_arg(args.policy, args.value, default_policy).to_dict()
    return OfframpConfig(base_model_name_or_path=_model_ref(args.model), num_labels=data.num_labels,
                         exit_layers=common.parse_exits(args.exits),
                         head={"shared": args.shared_head, "type": args.head, "hidden": args.head_hidden,
                               "pooling": common.default_pooling(_resolved(args.model)) if args.pooling == "auto"
                               else args.pooling,
                               "use_pooler": not args.no_pooler},
                         halting=halting, gate=gate, objective=objective, policy=policy,
                         label_names=data.label_names,
                         extra={"data": common.data_settings(args)})


def _model_ref(model: str) -> str:
    """How a checkpoint names its base model: a local folder as an absolute path, else the Hub id or
    the offline alias (resolved again at load, so moving the environment does not break it)."""
    local = Path(model)
    return str(local.resolve()) if local.exists() else model


def _resolved(model: str) -> str:
    from offramp.data.assets import resolve_model_path

    return resolve_model_path(model)


def _resumed(args: argparse.Namespace, out: Path, given_data: dict[str, Any]) -> tuple[Any, Any, dict, dict]:
    """--resume: (model, data, data settings, train options) of the run in ``out``; a flag that
    contradicts what the run was trained with is an error."""
    from offramp.modeling import EarlyExitModel

    ckpt = common.checkpoint_dir(out)
    common.check_out(ckpt, True, "checkpoint folder")
    model = EarlyExitModel.from_pretrained(ckpt)
    opts = _train_options(args, _stored_train_options(model, ckpt))
    vars(args).update(opts)  # the JEI schedule reads the resolved options
    if args.model and _model_ref(args.model) != model.config.base_model_name_or_path:
        raise ValueError(f"--resume: this run was trained from {model.config.base_model_name_or_path!r}, not "
                         f"{args.model!r}; drop --model to continue it")
    stored_data = model.config.extra.get("data", {})
    changed = [k for k, v in given_data.items() if k in stored_data and stored_data[k] != v]
    if changed:
        k = changed[0]
        raise ValueError(f"--resume: this run was trained with --{k.replace('_', '-')} {stored_data[k]!r}, not "
                         f"{given_data[k]!r}; drop it to continue on the run's own data")
    settings = {**common.DATA_DEFAULTS, **stored_data, **given_data}
    if args.policy is not None or args.value is not None:
        model.config.policy = common.make_policy_arg(args.policy, args.value, model.config.policy).to_dict()
    data = common.load_from_settings(settings, label_names=model.config.label_names,
                                     regression=model.config.is_regression)
    if _trains_further(ckpt, opts):
        _retire_stale_rule(model, args)
    return model, data, settings, opts


def _trains_further(ckpt: Path, opts: dict[str, Any]) -> bool:
    """Whether resuming the run in ``ckpt`` with ``opts`` trains any epoch: it has epochs left and
    has not stopped on validation."""
    from offramp.training.loop import STATE_NAME, load_training_state, stalled

    if not (ckpt / STATE_NAME).is_file():
        return True
    state = load_training_state(ckpt)
    stopped = bool(opts.get("patience")) and stalled(state["history"], opts["patience"])
    return opts["epochs"] > state["epoch"] + 1 and not stopped


def _retire_stale_rule(model: Any, args: argparse.Namespace) -> None:
    """The resumed run trains further, so a rule chosen or certified on the earlier weights no longer
    holds: a selected one is chosen again with its rules and tolerance (unless --select-policy names
    others); a calibrated one keeps its setting, but its bound moves to ``extra.stale_calibration``
    and a warning says to calibrate again."""
    extra = model.config.extra
    selected = extra.get("selected")
    if isinstance(selected, dict) and args.select_policy is None and selected.get("rules"):
        args.select_policy = ",".join(selected["rules"])
        args.select_tolerance = float(selected.get("tolerance", args.select_tolerance))
        common.log(f"--resume: the rule selected on the earlier weights ({selected.get('policy')}) is chosen again "
                   f"after training, among {args.select_policy}")
    if "calibration" in extra:
        extra["stale_calibration"] = extra.pop("calibration")
        warnings.warn(f"--resume: the rule {model.config.policy} was calibrated on the earlier weights; its bound no "
                      "longer holds for the weights this run trains. Run offramp calibrate again", stacklevel=1)


def _started(args: argparse.Namespace, out: Path, given_data: dict[str, Any]) -> tuple[Any, Any, dict, dict]:
    """A new run: (model, data, data settings, train options), ``out`` checked before any work."""
    from offramp.modeling import EarlyExitModel
    from offramp.utils import process_rank

    if not args.model:
        raise ValueError("--model is required (a HF model name or folder) unless --resume")
    if args.data is None:
        raise ValueError("--data is required: an offline name (tweets, bbc), a .csv/.jsonl file or a "
                         "HF dataset name")
    if process_rank() == 0:  # the other processes of a multi-process run write nothing
        common.check_out(out, args.overwrite, "output folder", common.inputs(model=args.model, data=args.data))
    opts = _train_options(args, None)
    vars(args).update(opts)  # _train_config reads the resolved options
    settings = {**common.DATA_DEFAULTS, **given_data}
    data = common.load_from_settings(settings, regression=opts["regression"])
    import torch

    torch.manual_seed(settings["seed"])  # the exit heads' initialisation is part of the run's seed
    model = EarlyExitModel.from_backbone(args.model, _train_config(args, data))
    return model, data, settings, opts


def cmd_train(args: argparse.Namespace) -> int:
    from offramp.training import TrainingArgs, train
    from offramp.utils import process_rank

    out = Path(args.out)
    given_data = common.data_settings(args, only_given=True)
    device = common.chosen_device(args, "train")  # a missing GPU is an error before any loading
    model, data, settings, opts = (_resumed if args.resume else _started)(args, out, given_data)
    settings["max_length"] = common.fit_max_length(model, settings["max_length"], given="max_length" in given_data)
    model.config.extra["train"] = dict(opts)  # what --resume continues with
    select = _selection_rules(args, model, data)  # refused before any training
    if opts["full"] and args.state_cache not in (None, "off"):  # off: no cache, which --full needs anyway
        raise ValueError("--state-cache keeps a frozen backbone's states; with --full the backbone is trained "
                         "and its states change every step: drop one of them")
    tok = common.tokenizer_of(model)
    train_batches = common.split_batches(data.train, tok, settings, shuffle=True)
    eval_batches = common.split_batches(data.validation, tok, settings) if len(data.validation) else None
    full = opts["full"]
    targs = TrainingArgs(output_dir=str(out), epochs=opts["epochs"], patience=opts.get("patience"), lr=opts["lr"],
                         frozen_backbone=not full,
                         backbone_lr=opts["backbone_lr"] or (2e-5 if full else None), seed=settings["seed"],
                         resume=args.resume, cache_backbone=not full, state_cache=common.state_cache(args),
                         save_backbone=not opts["backbone_by_reference"], device=str(device), dtype=args.dtype)
    common.log(f"training {model.num_exits} exits on {len(data.train)} examples "
               f"({'full fine-tuning' if full else 'frozen backbone'}), {opts['epochs']} epochs"
               + (" (resumed)" if args.resume else ""))
    if model.config.objective["type"] == "jei":
        result = _train_jei(model, train_batches, eval_batches, targs, args)
    else:
        result = train(model, train_batches, eval_batches, targs)
    metrics = result["history"][-1] if result["history"] else {}
    if select is not None:
        metrics["selected"] = _select_and_store(model, data, settings, select, args, Path(result["checkpoint"]),
                                                frozen=not full)
    if process_rank() == 0:  # one report from a multi-process run
        print(json.dumps({"checkpoint": result["checkpoint"], **metrics}, indent=2))
    return 0


def _selection_rules(args: argparse.Namespace, model: Any, data: Any) -> list[str] | None:
    """The rules of --select-policy, checked against what this model's exits supply."""
    from offramp.evaluation.sweep import NOT_SWEPT
    from offramp.policies import POLICIES

    if args.select_policy is None:
        return None
    if not 0.0 <= args.select_tolerance < 1.0:
        raise ValueError(f"--select-tolerance must be in [0, 1), got {args.select_tolerance}")
    if not len(data.validation):
        raise ValueError("--select-policy chooses on the validation split, which is empty: use "
                         "--validation-fraction > 0 or give a validation file")
    have = {"logits", "labels", "hidden", "row_key"} | ({"halting"} if model.halting is not None else set()) | (
        {"gate"} if model.gates is not None else set())
    usable = [n for n, cls in POLICIES.items() if n not in NOT_SWEPT and set(cls.needs) <= have]
    if args.select_policy.strip() == "all":
        return usable
    rules = [r.strip() for r in args.select_policy.split(",") if r.strip()]
    for r in rules:
        if r not in POLICIES:
            raise ValueError(f"--select-policy: unknown rule {r!r}; choose from {usable} or 'all'")
        if r not in usable:
            need = sorted(set(POLICIES[r].needs) - have) or ["a parameter to sweep"]
            raise ValueError(f"--select-policy: the rule {r!r} needs {need}, which these exits do not have; "
                             f"choose from {usable}")
    if not rules:
        raise ValueError("--select-policy is empty: name rules (e.g. entropy,max_prob,patience) or 'all'")
    return rules


def _select_and_store(model: Any, data: Any, settings: dict, rules: list[str], args: argparse.Namespace,
                      ckpt: Path, *, frozen: bool) -> dict[str, Any] | None:
    """Sweep ``rules`` on the validation split and write the cheapest setting within the tolerance
    into the checkpoint's config (atomically); None (and a warning) when none is within it."""
    from offramp.config import CONFIG_NAME
    from offramp.evaluation.collect import collect
    from offramp.evaluation.sweep import select_policy
    from offramp.flops import model_exit_flops
    from offramp.utils import atomic_write_json

    loader = common.split_batches(data.validation, common.tokenizer_of(model), settings, lazy=True)
    trace = collect(model, loader, keep_hidden=True, state_cache=common.state_cache(args) if frozen else False)
    flops = model_exit_flops(model, loader.dataset.lengths())
    metric = "pearson" if model.config.is_regression else "accuracy"
    point, result = select_policy(trace, rules, tolerance=args.select_tolerance, metric=metric, flops=flops)
    full = result.full[result.rules[0]].metric if result.rules else None
    if point is None:
        warnings.warn(f"--select-policy: no setting of {', '.join(rules)} is within {args.select_tolerance:g} of the "
                    f"last exit's validation {metric} ({full:.4g}); the checkpoint keeps the policy "
                    f"{model.config.policy.get('type')!r}", stacklevel=1)
        return None
    chosen = result.selection(point, tolerance=args.select_tolerance, split="validation", n=len(data.validation),
                              rules=rules)
    chosen["epochs"] = int(model.config.extra.get("train", {}).get("epochs", 0))  # the weights it was chosen on
    model.config.policy = dict(point.policy)
    model.config.extra["selected"] = chosen
    atomic_write_json(ckpt / CONFIG_NAME, model.config.to_dict())
    common.log(f"selected {point.policy} on validation: {metric} {point.metric:.4g} (last exit {full:.4g}), "
               f"mean exit layer {point.mean_exit_layer:.2f} of {model.num_layers}; stored in {ckpt / CONFIG_NAME}")
    return chosen


def _train_jei(model: Any, train_batches: list, eval_batches: list | None, targs: Any,
               args: argparse.Namespace) -> dict:
    """JEI-DNN's own schedule (warm-up with per-exit freezing, alternating gate / IM phases)."""
    from offramp.training.jei import JEIArgs, train_jei

    if not eval_batches:
        raise ValueError("--objective jei needs a validation split (gate weights and warm-up freezing are "
                         "measured on it): use --validation-fraction > 0")
    jargs = JEIArgs(output_dir=targs.output_dir, cost_weight=args.cost_weight, pos_weight=args.gate_pos_weight,
                    epochs=targs.epochs, lr=targs.lr,
                    warmup_epochs=args.warmup_epochs, patience=args.warmup_patience,
                    frozen_backbone=targs.frozen_backbone, save_backbone=targs.save_backbone, seed=targs.seed,
                    progress=True, resume=targs.resume, state_cache=targs.state_cache, device=targs.device,
                    dtype=targs.dtype)
    return train_jei(model, train_batches, eval_batches, jargs)
