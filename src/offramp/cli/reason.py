"""``offramp reason``: stop a chain of thought early (LYNX), label cue events, fit the probe.

```
offramp reason build --model M --task gsm_symbolic --n 40 --seed 0 --out runs/events
offramp reason fit runs/events --delta 0.1 --out runs/probe
offramp reason run --model M --probe runs/probe --question "Two apples and three more?"
offramp reason run --model M --policy deer --value 0.95 --task gsm8k --n 20 --out runs/deer.jsonl
```

Chains decode ``--batch-size`` at a time in a continuously refilled batch (each chain is what it
is alone); ``run`` prints or appends one JSON line per problem as its chain ends.

``run`` policies (exit rules over cue events, ``--policy NAME --value V`` as on every command):
``probe`` (LYNX; needs ``--probe``, whose cue, forcing and feature settings are reused), ``deer``
(trial answers at cues, exit when their mean token probability >= V), ``static`` (stop at the
first cue after V tokens) and ``never`` (the whole chain); ``--budget N`` caps the chain at N
tokens and forces the answer. ``--method lynx|deer|budget|full`` and ``--lambda`` are the previous
release's spellings of the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from offramp.cli import common
from offramp.names import CHAIN_RISKS

DEFAULT_WORDS = "hmm,wait,alternatively"


def add_reason_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``reason`` (with ``run``, ``build``, ``fit``) to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("reason", help="stop a chain of thought early with a calibrated probe (LYNX)",
                              description=common.help_text(__doc__))
    sub = p.add_subparsers(dest="reason_command", metavar="{run,build,fit}")
    run = sub.add_parser("run", help="answer questions, stopping the chain at an accepted cue")
    _model_args(run)
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--question", help="one question")
    src.add_argument("--task", help="gsm8k, a reasoning-gym generator name, or a .jsonl / .csv file of questions "
                     "and answers (with --n, --seed; --seed is the first row of a file or of gsm8k)")
    run.add_argument("--n", type=int, default=10, help="problems of --task (default 10)")
    run.add_argument("--seed", type=int, default=0, help="reasoning-gym seed / GSM8K offset (default 0)")
    run.add_argument("--policy", default=None, help="exit rule over cue events: probe (alias lynx), deer, static, "
                     "never (default: probe with --probe, else never)")
    run.add_argument("--value", type=float, default=None,
                     help="its parameter: deer's threshold (default 0.95), static's token count")
    run.add_argument("--probe", help="a calibrated probe folder written by `offramp reason fit`")
    run.add_argument("--budget", type=int, default=None, help="cap the chain at this many tokens, then force the "
                     "answer")
    # the previous release's spellings: lynx = --policy probe, deer = --policy deer, budget = --budget
    # (default 256), full = --policy never; --lambda = --value
    run.add_argument("--method", choices=("lynx", "deer", "budget", "full"), default=None,
                     action=common.DeprecatedOption, new="--policy (probe, deer, never) or --budget",
                     help=argparse.SUPPRESS)
    run.add_argument("--lambda", dest="lam", type=float, default=None, action=common.DeprecatedOption, new="--value",
                     help=argparse.SUPPRESS)
    run.add_argument("--out", help="append one JSON line per problem here (default: print)")
    run.add_argument("--sample", action="store_true", help="sample the chains (forced answers stay greedy)")
    run.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    run.add_argument("--top-p", type=float, default=1.0, help="with --sample (default 1.0)")
    run.add_argument("--sample-seed", type=int, default=0, help="with --sample: seeds each chain's sampler together "
                     "with its prompt (default 0)")
    run.set_defaults(func=cmd_reason_run)
    build = sub.add_parser("build", help="label cue events of training problems by forced exits")
    _model_args(build)
    build.add_argument("--task", required=True, help="gsm8k, a reasoning-gym generator name, or a .jsonl / .csv "
                       "file with question and answer columns")
    build.add_argument("--n", type=int, required=True)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", required=True, help="dataset folder (resumed if it exists)")
    build.set_defaults(func=cmd_reason_build)
    _add_fit_parser(sub)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    return p


def _add_fit_parser(sub: Any) -> None:
    """``reason fit``: the probe trained on an event dataset and calibrated for a risk bound."""
    fit = sub.add_parser("fit", help="train the probe and calibrate its conformal exit rule")
    fit.add_argument("data", help="dataset folder written by `offramp reason build`")
    fit.add_argument("--delta", type=float, required=True,
                     help="the risk bound, in (0, 1): premature exits per event or per chain (--per), or lost "
                          "right answers per chain (--risk lost)")
    fit.add_argument("--per", choices=["event", "chain"], default="event",
                     help="what delta bounds: each cue event (LYNX's conformal sets) or each chain "
                          "(exit where P(right) > Q, Q calibrated on each chain's worst wrong event)")
    fit.add_argument("--risk", choices=CHAIN_RISKS, default="premature",
                     help="with --per chain, the stops delta bounds: premature (any stop at a wrong forced answer, "
                          "LYNX's) or lost (a stop at a wrong answer in a chain whose full answer is right: the "
                          "expected accuracy lost to stopping is then <= delta)")
    fit.add_argument("--fit-fraction", type=float, default=0.6,
                     help="share of problems that train the probe; the rest calibrate it (default 0.6)")
    fit.add_argument("--epochs", type=int, default=300)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", required=True, help="probe folder (refused if it exists, unless --overwrite)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    fit.set_defaults(func=cmd_reason_fit)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF causal LM name or folder, or an offline alias: "
                   "qwen-coder-0.5b-offline, qwen-coder-1.5b-offline (Qwen2.5-Coder-Instruct from GGUF packages)")
    common.add_device_args(p, dtype_help="the LM's dtype")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-answer-tokens", type=int, default=16)
    p.add_argument("--forcing", default=None, help="boxed | r1 | plain | literal text (default boxed)")
    p.add_argument("--cue-words", default=None, help=f"comma-separated (default {DEFAULT_WORDS}; '' for none)")
    p.add_argument("--no-steps", action="store_true", help="no step-boundary cues (blank lines, sentence ends)")
    p.add_argument("--layers", default=None, help="hidden_states indices of the features (default -1)")
    p.add_argument("--prompt-style", dest="prompt", default="plain", help="the instruction after each question: "
                   "plain (solve step by step, box the answer), check (then check the answer), or literal text "
                   "(default plain)")
    common.add_deprecated(p, "--prompt", "--prompt-style", dest="prompt", default="plain")
    p.add_argument("--batch-size", type=int, default=8, help="chains decoded together (default 8)")


def _config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    from offramp.data.tasks import prompt_suffix
    from offramp.engines.reason import ReasonConfig
    from offramp.engines.reason.cues import CueConfig

    base = base or {}
    cues = base.get("cues", {})
    words = args.cue_words if args.cue_words is not None else ",".join(cues.get("words", DEFAULT_WORDS.split(",")))
    steps = (not args.no_steps) and cues.get("step_boundaries", True)
    layers = (tuple(common.parse_ints(args.layers, "--layers", "comma-separated hidden_states indices like 1,-1"))
              if args.layers
              else tuple(base.get("feature_layers", (-1,))))
    return ReasonConfig(cues=CueConfig(words=tuple(w.strip() for w in words.split(",") if w.strip()),
                                       step_boundaries=steps),
                        forcing=args.forcing or base.get("forcing", "boxed"),
                        max_new_tokens=args.max_new_tokens, max_answer_tokens=args.max_answer_tokens,
                        feature_layers=layers, prompt_suffix=prompt_suffix(args.prompt),
                        do_sample=bool(getattr(args, "sample", False)), temperature=getattr(args, "temperature", 1.0),
                        top_p=getattr(args, "top_p", 1.0), seed=getattr(args, "sample_seed", 0))


def _load(args: argparse.Namespace):
    from offramp.modeling.causal_lm import load_causal_lm

    return load_causal_lm(args.model, args.dtype, common.chosen_device(args, f"reason {args.reason_command}"))


def _problems(args: argparse.Namespace):
    from offramp.data.tasks import load_problems

    return load_problems(args.task, args.n, seed=args.seed)


def _run_policy(args: argparse.Namespace) -> tuple[str, dict]:
    """(name for the output rows, policy spec) from --policy/--value or the old --method/--lambda."""
    if args.method is not None and args.policy is not None:
        raise ValueError("give either --policy (with --value) or the older --method, not both")
    if args.lam is not None and args.method != "deer":
        raise ValueError("--lambda goes with --method deer; write --policy deer --value L")
    if args.method is not None:
        if args.method == "budget" and args.budget is None:
            args.budget = 256
        name = {"lynx": "probe", "deer": "deer", "budget": "never", "full": "never"}[args.method]
        value = args.lam if args.method == "deer" else None
        label = args.method
    else:
        name = args.policy or ("probe" if args.probe else "never")
        name = "probe" if name == "lynx" else name
        value = args.value
        label = {"probe": "lynx", "never": "budget" if args.budget else "full"}.get(name, name)
    if name == "probe":
        if not args.probe:
            raise ValueError("the probe (LYNX) policy needs --probe <folder from `offramp reason fit`>")
        if value is not None:
            raise ValueError("the probe policy has no --value: its threshold is the probe's calibration")
        return label, {"type": "probe", "path": args.probe}
    if args.probe:
        raise ValueError(f"--probe is read by the probe policy only, not by {name!r}: drop it or use --policy probe")
    from offramp.engines.reason import SIGNALS
    from offramp.policies import require_signals

    policy = common.make_policy_arg(name, value, {"type": name})
    require_signals(policy, set(SIGNALS), "a chain of thought's cue events", "use never, static, deer or probe")
    return label, policy.to_dict()


def cmd_reason_run(args: argparse.Namespace) -> int:
    from offramp.calibration.lynx import load_policy
    from offramp.engines.reason import iter_reason

    common.require_min(args, max_new_tokens=1, max_answer_tokens=1, n=1, batch_size=1)
    if args.question is not None and not args.question.strip():
        raise ValueError("--question is empty: give the problem text, or --task to run a set of problems")
    if not args.sample and (args.temperature != 1.0 or args.top_p != 1.0):
        raise ValueError("--temperature and --top-p shape sampling: add --sample (chains are greedy without it)")
    if args.budget is not None:
        common.require_min(args, budget=1)
    if args.lam is not None and not 0.0 <= args.lam <= 1.0:  # NaN fails this too
        raise ValueError(f"--lambda must be in [0, 1], got {args.lam}")
    if args.out:
        common.check_out(Path(args.out), True, "--out file", common.inputs(model=args.model, task=args.task),
                         file=True)
    method, spec = _run_policy(args)
    policy = load_policy(spec)
    probe = getattr(policy, "probe", None)
    config = _config(args, getattr(probe, "extra_", {}).get("reason_config") if probe else None)
    if args.budget is not None:
        config = type(config)(**{**config.__dict__, "max_new_tokens": args.budget})
    model, tok = _load(args)
    items = [args.question] if args.question is not None else _problems(args)
    for i, res in iter_reason(model, tok, items, policy=policy, config=config, batch_size=args.batch_size):
        item = items[i]
        row = {"method": method, "policy": spec, **({"uid": item.uid, "gold": item.answer} if hasattr(item, "uid")
                                                     else {}), **res.to_dict()}
        line = json.dumps(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        print(line if not args.out else f"{row.get('uid', 'question')}: {res.answer!r} ({res.stop}, "
              f"{res.tokens} tokens, {res.wall_s:.2f}s)", flush=True)
    return 0


def cmd_reason_build(args: argparse.Namespace) -> int:
    from offramp.evaluation.events import build_dataset

    common.require_min(args, max_new_tokens=1, max_answer_tokens=1, n=1, batch_size=1)
    # an existing dataset folder is resumed (its manifest must match), never replaced
    common.check_out(Path(args.out), True, "dataset folder", common.inputs(model=args.model, task=args.task))
    config = _config(args)
    model, tok = _load(args)
    uids = build_dataset(model, tok, _problems(args), args.out, config=config, model_name=args.model,
                         batch_size=args.batch_size,
                         on_problem=lambda p, t: print(f"{p.uid}: {len(t['events'])} events, "
                                                       f"{t['chain_tokens']} tokens", file=sys.stderr, flush=True))
    print(json.dumps({"problems": len(uids), "out": args.out}))
    return 0


def cmd_reason_fit(args: argparse.Namespace) -> int:
    from offramp.calibration.lynx import LynxProbe
    from offramp.evaluation.events import MANIFEST, load_dataset
    from offramp.utils import read_json

    common.require_unit(args, "fit_fraction", "delta")
    if args.risk == "lost" and args.per != "chain":
        raise ValueError("--risk lost is a per-chain risk: add --per chain")
    common.require_min(args, epochs=1)
    common.check_out(Path(args.out), args.overwrite, "probe folder", {"DATA": args.data})
    data = load_dataset(args.data)
    manifest = read_json(Path(args.data) / MANIFEST, "event dataset manifest",
                         "build the dataset again (offramp reason build)", {"config": dict, "model": str})
    n_fit = int(round(len(data.uids) * args.fit_fraction))
    if n_fit < 1 or n_fit >= len(data.uids):
        raise ValueError(f"{len(data.uids)} problems cannot be split {args.fit_fraction:.2f} / rest: label more")
    fit, cal = data.subset(range(n_fit)), data.subset(range(n_fit, len(data.uids)))
    probe = LynxProbe(epochs=args.epochs, seed=args.seed).fit(fit.features, fit.labels)
    probe = probe.calibrate(cal.features, cal.labels, delta=args.delta, per=args.per, groups=cal.groups,
                            risk=args.risk, chain_right=cal.chain_right)
    probe.save(args.out, extra={"reason_config": manifest["config"], "model": manifest["model"]})
    q = probe.conformal_.quantiles_
    print(json.dumps({"out": args.out, "delta": args.delta, "events_fit": int(fit.labels.size),
                      "events_cal": int(cal.labels.size), "cal_counts": probe.conformal_.counts_.tolist(),
                      "quantiles": [None if v == float("inf") else float(v) for v in q], "per": args.per,
                      "risk": args.risk,
                      **({"chain_threshold": str(probe.chain_threshold_), "chains_cal": probe.chain_count_}
                         if args.per == "chain" else {})}))
    return 0
