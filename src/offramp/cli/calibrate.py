"""``offramp calibrate``: pick an exit threshold with a stated guarantee and store it in the checkpoint.

```
offramp calibrate --model runs/jei --trace runs/jei/trace-cal --policy entropy --risk disagree --delta 0.05 --epsilon 0.05
offramp calibrate --model runs/jei --split validation --policy gate --delta 0.1
offramp calibrate --model exits/smollm2 --trace exits/trace-cal --policy token_confidence --risk sequence \
    --delta 0.2 --epsilon 0.1
```

On token exits (``offramp fit-exits``) the risks are per generated sequence: ``sequence``
(the share of positions where the text differs from the full model's exceeds ``--tolerance``) or
``token`` (that share itself). Without ``--trace`` the losses come from real greedy generations of
the calibration prompts (``--prompts N`` held-out offline ones, or ``--prompt`` /
``--prompts-file``) with each candidate threshold and ``--cache-strategy``, as CALM calibrates;
with a token trace (``offramp collect --model EXITS``) they are replayed, which is exact for
``--risk sequence --tolerance 0`` with the ``catch_up`` cache and teacher-forced otherwise.

Learn-then-Test (``--method ltt``, any threshold rule) or the CATs shared rule (``--method cats``,
consistency with the full model at level epsilon). The chosen policy is written into the
checkpoint's ``offramp_config.json`` (atomically, with the bound under ``extra.calibration``) so
``predict`` uses it; nothing is written when no threshold can be certified. The calibration data
must not have been used to train the model, its exits or its gates.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from offramp.names import CACHE_STRATEGIES, PVALUES, RISKS, TOKEN_RISKS


def add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``calibrate`` sub-command to an argparse ``subparsers`` object."""
    from offramp.cli import common

    p = subparsers.add_parser("calibrate", help="choose an exit threshold with a risk guarantee",
                              description=common.help_text(__doc__))
    p.add_argument("--model", required=True, help="checkpoint folder (or the --out folder of `offramp train`)")
    p.add_argument("--trace", default=None,
                   help="a trace folder from `offramp collect` on held-out data (else one is collected "
                        "from --data / the checkpoint's data, split --split)")
    common.add_data_args(p, required=False)
    p.add_argument("--split", choices=["train", "validation", "test"], default="validation",
                   help="split to calibrate on when no --trace is given (default: validation)")
    p.add_argument("--policy", default=None, help="rule to calibrate (default: the checkpoint's policy)")
    p.add_argument("--method", choices=("ltt", "cats"), default="ltt")
    p.add_argument("--risk", choices=RISKS + TOKEN_RISKS, default=None,
                   help="disagree (default) | wrong_when_full_right for classifiers; sequence (default) | token "
                        "for token exits")
    p.add_argument("--token-tolerance", dest="tolerance", type=float, default=0.0,
                   help="risk sequence: the share of differing tokens a sequence may have and still count as "
                        "consistent (default 0: any difference counts)")
    common.add_deprecated(p, "--tolerance", "--token-tolerance", dest="tolerance", type=float, default=0.0)
    p.add_argument("--delta", type=float, default=0.05, help="risk level to control (ltt)")
    p.add_argument("--epsilon", type=float, default=0.05, help="failure probability (ltt) / inconsistency (cats)")
    p.add_argument("--pvalue", choices=PVALUES, default="hoeffding",
                   help="Learn-then-Test's test: hoeffding (default), hoeffding_bentkus (tighter, any loss in "
                        "[0, 1]) or binomial (the tightest, 0/1 losses only)")
    p.add_argument("--grid", default=None,
                   help="comma-separated thresholds, most conservative first (default: a fixed grid per rule)")
    p.add_argument("--check", metavar="SPLIT", choices=["train", "validation", "test"], default=None,
                   help="classifiers: also measure the certified rule's risk on this split of the data, with its "
                        "binomial interval, and say whether it is consistent with the bound")
    p.add_argument("--alpha", type=float, default=None,
                   help="also fit per-exit conformal sets at this miscoverage and store their quantiles")
    from offramp.cli.generate import add_token_collect_args

    add_token_collect_args(p)
    p.add_argument("--cache-strategy", choices=CACHE_STRATEGIES, default=None,
                   help="token exits: the cache strategy the threshold is certified for (default: the exits' own)")
    common.add_device_args(p)
    p.set_defaults(func=run_calibrate)
    return p


def _trace(args: argparse.Namespace, split: str | None = None):
    """The calibration trace (--trace, or one collected on --split); with ``split``, that split's."""
    from offramp.cli import common
    from offramp.evaluation.collect import collect
    from offramp.evaluation.token_trace import load_trace

    if args.trace and split is None:
        return load_trace(args.trace)
    model, data, settings = common.model_and_data(args)
    loader = common.split_batches(data.split(split or args.split), common.tokenizer_of(model), settings, lazy=True)
    return collect(model, loader)


def run_calibrate(args: argparse.Namespace) -> int:
    """The ``calibrate`` handler: 0 when a threshold was written, 1 when none could be certified."""
    from offramp.cli import common
    from offramp.config import CONFIG_NAME, DecoderExitConfig, OfframpConfig, read_config
    from offramp.utils import atomic_write_json

    ckpt = common.checkpoint_dir(args.model)
    kind, data = read_config(ckpt)
    config = (OfframpConfig if kind == "classifier" else DecoderExitConfig).from_dict(data)
    common.check_out(ckpt, True, "checkpoint folder")  # the chosen rule is written into it
    common.require_unit(args, "delta", "epsilon", "alpha")
    if not 0.0 <= args.tolerance < 1.0:
        raise ValueError(f"--token-tolerance must be in [0, 1), got {args.tolerance}")
    allowed = RISKS if kind == "classifier" else TOKEN_RISKS
    risk = args.risk or allowed[0]
    if risk not in allowed:
        raise ValueError(f"--risk {risk} is for {'token exits' if kind == 'classifier' else 'classifiers'}; "
                         f"this checkpoint is {kind}: use --risk {' or '.join(allowed)}")
    if args.check is not None and (kind != "classifier" or args.method != "ltt"):
        raise ValueError("--check measures a classifier's Learn-then-Test bound on another split: drop it here")
    if args.check is not None and not args.trace and args.check == args.split:
        raise ValueError(f"--check {args.check} is the split calibrate certifies on: check on another one")
    if kind == "token_exits" and not args.trace:
        return _calibrate_generation(args, ckpt, config, risk)
    rule = args.policy or config.policy["type"]
    grid = None if args.grid is None else common.parse_grids([f"{rule}={args.grid}"])[rule]
    trace = _trace(args)
    from offramp.calibration.calibrate import ASSUMPTION, calibrate, check_risk
    from offramp.policies import make_policy

    policy, text, record = calibrate(config, trace, policy=args.policy, method=args.method, risk=risk,
                                     delta=args.delta, epsilon=args.epsilon, pvalue=args.pvalue, grid=grid,
                                     alpha=args.alpha, tolerance=args.tolerance)
    if policy is None:
        print(f"{text}\nnothing written to {ckpt}", file=sys.stderr)
        return 1
    config.policy = policy
    config.extra = {**(config.extra or {}), "calibration": _jsonable(record)}
    atomic_write_json(ckpt / CONFIG_NAME, config.to_dict())  # atomic: temp file + rename
    if record.get("ideal_speedup"):
        common.log(f"certified: mean exit layer {record['mean_exit_layer']:.2f} of {trace.num_layers} (ideal "
                   f"speed-up {record['ideal_speedup']:.2f}x) on {record['n']} calibration rows; {ASSUMPTION}")
    print(text)
    if args.check is not None:
        check = check_risk(make_policy(policy), _trace(args, args.check), risk=risk, delta=args.delta,
                           epsilon=args.epsilon)
        lo, hi = check["interval"]
        verdict = "consistent with" if check["consistent"] else "NOT consistent with (the splits differ in kind?)"
        print(f"check on {args.check}: {risk} risk {check['risk']:.4f} on n={check['n']}, {check['level']:.0%} "
              f"interval [{lo:.4f}, {hi:.4f}]: {verdict} the bound {args.delta:g}; mean exit layer "
              f"{check['mean_exit_layer']:.2f}")
        config.extra["calibration"]["check"] = _jsonable({"split": args.check, **check})
        atomic_write_json(ckpt / CONFIG_NAME, config.to_dict())
    print(f"wrote policy {policy} to {ckpt / 'offramp_config.json'}")
    return 0


def _calibrate_generation(args: argparse.Namespace, ckpt, config, risk: str) -> int:
    """``calibrate`` on token exits from real generations of the calibration prompts."""
    from offramp.calibration.generation import calibrate_generation
    from offramp.cli import common
    from offramp.cli.generate import token_prompts
    from offramp.config import CONFIG_NAME
    from offramp.data.prompts import prompt_batches
    from offramp.engines.generate import SIGNALS
    from offramp.modeling.causal_lm import load_exits_and_lm
    from offramp.policies import require_signals
    from offramp.utils import atomic_write_json

    if args.method != "ltt":
        raise ValueError("token exits are calibrated with Learn-then-Test (--method ltt)")
    batch_size = args.batch_size or 8  # --batch-size: prompts generated together
    common.require_min({"batch_size": batch_size}, batch_size=1)
    stored = config.policy
    if args.policy is None and stored.get("type") == "never":  # nothing certified yet: the exits' natural rule
        stored = {"type": "max_prob" if config.head.get("type") == "tied" else "token_confidence"}
    policy = common.make_policy_arg(args.policy, None, stored if args.policy is None else {"type": args.policy})
    require_signals(policy, set(SIGNALS), "token-exit generation")
    grid = None if args.grid is None else common.parse_grids([f"{policy.type}={args.grid}"])[policy.type]
    prompts = token_prompts(args)
    model, tok = load_exits_and_lm(str(ckpt), args.backbone, args.dtype, common.chosen_device(args, "calibrate"))
    strategy = args.cache_strategy or config.cache_strategy
    ltt = calibrate_generation(model, prompt_batches(tok, prompts, args.chat, batch_size), policy,
                               delta=args.delta, epsilon=args.epsilon, risk=risk, tolerance=args.tolerance,
                               pvalue=args.pvalue, cache_strategy=strategy, max_new_tokens=args.max_new_tokens,
                               candidates=grid, log=lambda m: common.log(f"calibrate: {m}"))
    text = f"{policy.type}: {ltt.summary()} (real greedy generations, cache {ltt.source_['cache_strategy']})"
    if ltt.policy_ is None:
        print(f"{text}\nnothing written to {ckpt}", file=sys.stderr)
        return 1
    step = ltt.steps_[ltt.index_]
    config.policy = ltt.policy_.to_dict()
    config.cache_strategy = ltt.source_["cache_strategy"]
    config.extra = {**(config.extra or {}), "calibration": _jsonable({
        "method": "ltt", "risk": risk, "tolerance": args.tolerance, "delta": args.delta, "epsilon": args.epsilon,
        "pvalue": args.pvalue, "n": ltt.n_, "threshold": ltt.threshold_, "empirical_risk": step.risk,
        "mean_exit_layer": step.mean_exit_layer, "policy": config.policy, "bound": text, **ltt.source_,
        "prompts": len(prompts)})}
    atomic_write_json(ckpt / CONFIG_NAME, config.to_dict())
    print(text)
    print(f"wrote policy {config.policy} (cache {config.cache_strategy}) to {ckpt / CONFIG_NAME}")
    return 0


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else str(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
