"""``offramp collect``, ``sweep`` and ``evaluate``: a trace of every exit, every rule swept over it, one rule measured."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from offramp.cli import common


# ----------------------------------------------------------------------------------------- collect
def add_collect_parser(sub: Any) -> None:
    p = sub.add_parser("collect", help="run every exit once over a split and store the trace",
                       description="Run all exits over a data split and store the trace (per-exit logits, "
                                   "halting / gate values, labels, per-exit FLOPs) in a folder.")
    p.add_argument("--model", required=True, help="checkpoint folder: a classifier (`offramp train`) or token "
                   "exits (`offramp fit-exits`: then a token trace of the prompts below)")
    common.add_data_args(p, required=False)
    p.add_argument("--split", choices=["train", "validation", "test"], default="test")
    p.add_argument("--out", required=True, help="trace folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--keep-hidden", action="store_true", help="also store pooled states / exit features "
                   "(saturation rule)")
    from offramp.cli.generate import add_token_collect_args

    common.add_state_cache_arg(p)
    add_token_collect_args(p)
    common.add_device_args(p)
    p.set_defaults(func=cmd_collect)


def cmd_collect(args: argparse.Namespace) -> int:
    common.checkpoint_dir(args.model)  # a wrong path is reported before any library loads
    from offramp.evaluation.collect import collect
    from offramp.flops import model_exit_flops

    out = Path(args.out)
    common.check_out(out, args.overwrite, "trace folder", common.inputs(model=args.model, data=args.data))
    if common.checkpoint_kind(args.model) == "token_exits":
        from offramp.cli.generate import cmd_collect_tokens

        if args.state_cache is not None:
            raise ValueError("--state-cache keeps a frozen encoder's pooled states for classifier checkpoints; "
                             "a token trace decodes with the full model: drop it")

        return cmd_collect_tokens(args, out)
    model, data, settings = common.model_and_data(args)
    split = data.split(args.split)
    loader = common.split_batches(split, common.tokenizer_of(model), settings, lazy=True)
    lengths = loader.dataset.lengths()
    trace = collect(model, loader, keep_hidden=args.keep_hidden, progress=True,
                    state_cache=common.state_cache(args))
    flops = model_exit_flops(model, lengths)
    trace.layer_flops = flops.per_exit.tolist()
    trace.meta = {"model": str(args.model), "data": settings, "split": args.split, "n": len(split),
                  "label_names": data.label_names, "mean_tokens": float(lengths.mean()),
                  "flops": flops.to_dict()}
    if trace.halting is not None:
        from offramp.evaluation.halting import warn_degenerate_halting

        lambda_p = model.config.objective.get("lambda_p", 0.1)
        report = warn_degenerate_halting(trace.halting, lambda_p, f"collect ({args.split} split)")
        trace.meta["halting"] = {"lambda_p": lambda_p, **report.to_dict()}
    trace.save(out)  # written under a temporary name and renamed: never half-written
    print(json.dumps({"trace": str(out), "n": len(split), "exits": trace.exit_layers,
                      "accuracy_per_exit": common.per_exit_metric(trace)}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------- sweep
def add_sweep_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="every exit rule over a grid on a stored trace: Pareto report",
                       description="Replay every exit rule over a grid of its parameter on a trace from "
                                   "`offramp collect`; write report.md, report.json and PNG plots.")
    p.add_argument("--trace", required=True, help="trace folder from `offramp collect`")
    p.add_argument("--out", required=True, help="report folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--rules", default=None, help="comma-separated policies (default: every one the trace supports)")
    p.add_argument("--grid", action="append", default=[], metavar="RULE=V1,V2,...",
                   help="values to sweep for a rule instead of its default grid (repeatable)")
    p.add_argument("--metric", default=None, help="accuracy (default) | macro_f1 | pearson | neg_mse")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="chosen setting: the cheapest within this much of the full model (default 0.01)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from offramp.evaluation.report import write_report
    from offramp.evaluation.sweep import sweep
    from offramp.evaluation.token_trace import TokenTrace, load_trace

    out = Path(args.out)
    common.check_out(out, args.overwrite, "report folder", common.inputs(trace=args.trace))
    trace = load_trace(args.trace)
    if isinstance(trace, TokenTrace):
        return _sweep_tokens(args, trace, out)
    metric = args.metric or ("pearson" if trace.logits.shape[-1] == 1 else "accuracy")
    rules = [r.strip() for r in args.rules.split(",") if r.strip()] if args.rules else None
    if trace.halting is not None and (rules is None or {"q_exit", "ponder_sample"} & set(rules)):
        from offramp.evaluation.halting import warn_degenerate_halting

        warn_degenerate_halting(trace.halting, (trace.meta.get("halting") or {}).get("lambda_p", 0.1),
                                f"sweep ({args.trace})")
    result = sweep(trace, rules, metric=metric, flops=common.trace_flops(trace),
                   grids=common.parse_grids(args.grid))
    chosen = {r: result.best_within(r, args.tolerance) for r in result.rules}
    rel = common.reliability_curves(trace, chosen)
    from offramp.utils import atomic_dir

    with atomic_dir(out) as tmp:  # one folder swap: never a new report.json beside an old report.md
        paths = write_report(tmp, result, chosen=chosen, reliability=rel, title="offramp sweep",
                             split=trace.meta.get("split"), tolerance=args.tolerance, notes=[f"trace: {args.trace} ({len(trace)} examples, split "
                                    f"{trace.meta.get('split', '?')})"])
        summary = paths["markdown"].read_text().split("Pareto frontier")[0].strip()
    print(summary)
    _print_commands(chosen, trace.meta.get("model"), "classifier")
    print(f"\nreport: {out}")
    return 0


def _print_commands(chosen: dict, model: str | None, kind: str) -> None:
    """The command that uses each chosen setting (the sweep's point is exactly what it gives)."""
    import shlex

    lm = "LM"
    if kind == "token_exits" and model:  # the exits name their base model
        try:
            from offramp.config import read_config

            named = read_config(model, expect="token_exits")[1].get("base_model_name_or_path")
            lm = model if named == "." else named or lm  # ".": the model's own folder
        except (ValueError, OSError):
            pass

    lines = []
    for rule, point in chosen.items():
        if point is None or not point.policy:
            continue
        spec = dict(point.policy)
        name = spec.get("type")
        value = [] if point.param is None else ["--value", str(point.value)]
        policy = [name] if point.param is not None or len(spec) == 1 else [json.dumps(spec)]
        target = ["--model", model or "CHECKPOINT"] if kind == "classifier" else ["--exits", model or "EXITS"]
        cmd = (["offramp", "evaluate", *target, "--policy", *policy, *value] if kind == "classifier" else
               ["offramp", "generate", "--model", lm, *target, "--policy", *policy, *value, "--prompt", "..."])
        lines.append(f"  {rule}: {' '.join(shlex.quote(c) for c in cmd)}")
    if lines:
        print("\nTo run a chosen setting (predict takes the same --policy / --value):" if kind == "classifier"
              else "\nTo generate with a chosen setting:")
        print("\n".join(lines))


def _sweep_tokens(args: argparse.Namespace, trace: Any, out: Path) -> int:
    """``offramp sweep`` on a token trace: agreement with the full model vs layers and FLOPs."""
    from offramp.evaluation.report import write_report
    from offramp.evaluation.token_trace import sweep_tokens
    from offramp.utils import atomic_dir

    if args.metric not in (None, "agreement"):
        raise ValueError(f"a token trace is swept on agreement with the full model, not {args.metric!r}: drop --metric")
    rules = [r.strip() for r in args.rules.split(",") if r.strip()] if args.rules else None
    result = sweep_tokens(trace, rules, grids=common.parse_grids(args.grid))
    chosen = {r: result.best_within(r, args.tolerance) for r in result.rules}
    with atomic_dir(out) as tmp:
        paths = write_report(tmp, result, chosen=chosen, title="offramp sweep (token exits)",
                             split="held-out prompts'", tolerance=args.tolerance, notes=[f"trace: {args.trace} ({trace.num_sequences} sequences, {len(trace)} decoded "
                                    "tokens; agreement = the exit's token equals the full model's, teacher-forced; "
                                    "the last exit count is the full model)"])
        summary = paths["markdown"].read_text().split("Pareto frontier")[0].strip()
    print(summary)
    _print_commands(chosen, trace.meta.get("model"), "token_exits")
    print(f"\nreport: {out}")
    return 0


# ---------------------------------------------------------------------------------------- evaluate
def add_evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="one rule at one setting, real early exit, measured time",
                       description="Run real per-row early exit with one policy on a split: metric, mean "
                                   "exit layer, exit histogram, FLOPs, and wall-clock vs the full model "
                                   "measured in the same run.")
    p.add_argument("--model", required=True, help="checkpoint folder")
    common.add_data_args(p, required=False)
    p.add_argument("--split", choices=["train", "validation", "test"], default="test")
    common.add_policy_args(p)
    p.add_argument("--repeats", type=int, default=1, help="timed passes (median kept; default 1)")
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock comparison")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time by wall-clock (default) or by this process's CPU time (steady on a shared "
                        "machine with offramp --threads 1)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    common.add_device_args(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    common.checkpoint_dir(args.model)  # a wrong path is reported before any library loads
    from offramp.evaluation.evaluate import evaluate_policy

    common.require_min(args, repeats=1)
    if args.json:
        common.check_out(Path(args.json), True, "--json file", file=True)
    model, data, settings = common.model_and_data(args)
    policy = common.make_policy_arg(args.policy, args.value, model.config.policy)
    split = data.split(args.split)
    loader = common.split_batches(split, common.tokenizer_of(model), settings, lazy=True)
    result = evaluate_policy(model, list(loader), policy, lengths=loader.dataset.lengths(),
                             timing=not args.no_timing, repeats=args.repeats, progress=True, clock=args.clock)
    result = {"model": str(args.model), "split": args.split, **result}
    text = json.dumps(result, indent=2)
    if args.json:
        from offramp.utils import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    print(text)
    return 0
