"""Learned halting (PonderNet, PALBERT) against PABEE and confidence thresholds on the same exits.

    python benchmarks/halting.py --data tweets --out runs/halting_tweets \
        --json benchmarks/results/halting_tweets_frozen.json
    python benchmarks/halting.py --data tweets --full --epochs 2 --max-train 3000 --max-eval 1000 \
        --models joint,pabee,pondernet,palbert_concat,palbert_row --out runs/halting_tweets_full \
        --json benchmarks/results/halting_tweets_full.json

Every model is trained on the train split (frozen MiniLM-L6 by default, ``--full`` fine-tunes it),
each rule is swept on the test split, and the JSON reports per model and rule:
- the best accuracy at a mean exit layer of at most L, for L on a grid (the Pareto frontier read at
  matched compute), with its standard error;
- the setting chosen on the validation split (cheapest within ``--tolerance`` of that model's last
  exit) and what it gives on test;
- for halting models, the spread of lambda across inputs and the mean exit distribution against
  the prior (``offramp.evaluation.halting_report``).
Trained heads are kept under ``--out`` so a rerun resumes; ``--models`` picks a subset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from offramp import EarlyExitModel, OfframpConfig
from offramp.data.assets import resolve_model_path
from offramp.data.batching import load_from_settings, split_batches  # noqa: E402
from offramp.evaluation.collect import collect, replay
from offramp.evaluation.halting import halting_report
from offramp.evaluation.sweep import sweep
from offramp.modeling.checkpoints import default_pooling  # noqa: E402
from offramp.modeling.predict import tokenizer_of  # noqa: E402
from offramp.names import DATA_DEFAULTS  # noqa: E402
from offramp.training import TrainingArgs, train

PONDER = {"type": "ponder", "beta": 0.5, "lambda_p": 0.1}
MODELS = {
    "joint": ({}, {"type": "joint"}, ["entropy", "max_prob"]),
    "pabee": ({}, {"type": "joint", "weights": "pabee"}, ["patience"]),
    "pondernet": ({"type": "pondernet"}, PONDER, ["ponder_sample", "q_exit"]),
    "palbert_concat": ({"type": "palbert", "variant": "concat"}, PONDER, ["q_exit"]),
    "palbert_diff": ({"type": "palbert", "variant": "diff"}, PONDER, ["q_exit"]),
    "palbert_rnn": ({"type": "palbert", "variant": "rnn"}, PONDER, ["q_exit"]),
    "palbert_shared": ({"type": "palbert", "variant": "concat"}, PONDER, ["q_exit"], {"shared": True}),
    # the papers' per-row KL, and ablations of the fixed recipe
    "pondernet_row": ({"type": "pondernet"}, {**PONDER, "kl_target": "row"}, ["ponder_sample", "q_exit"]),
    "palbert_row": ({"type": "palbert"}, {**PONDER, "kl_target": "row"}, ["q_exit"]),
    # the batch KL with every head's own loss beside it (the last exit keeps its accuracy)
    "palbert_heads": ({"type": "palbert"}, {**PONDER, "heads": 1.0}, ["q_exit"]),
    "pondernet_heads": ({"type": "pondernet"}, {**PONDER, "heads": 1.0}, ["ponder_sample", "q_exit"]),
    "palbert_shared_row": ({"type": "palbert"}, {**PONDER, "kl_target": "row"}, ["q_exit"], {"shared": True}),
    # the reference's PALBERT command: 3 Lambda layers on concat, epsilon truncation, one shared classifier
    "palbert_reference_row": ({"type": "palbert", "num_layers": 3, "position": "random"},
                              {**PONDER, "kl_target": "row", "truncation": "epsilon"}, ["q_exit"], {"shared": True}),
    "palbert_reference_batch": ({"type": "palbert", "num_layers": 3, "position": "random"},
                                {**PONDER, "truncation": "epsilon"}, ["q_exit"], {"shared": True}),
    "palbert_beta0.05": ({"type": "palbert"}, {**PONDER, "beta": 0.05}, ["q_exit"]),
    "palbert_beta5": ({"type": "palbert"}, {**PONDER, "beta": 5.0}, ["q_exit"]),
    "palbert_kl_model_to_prior": ({"type": "palbert"}, {**PONDER, "kl_direction": "model_to_prior"}, ["q_exit"]),
    "palbert_epsilon": ({"type": "palbert"}, {**PONDER, "truncation": "epsilon"}, ["q_exit"]),
    "palbert_row_beta0.05": ({"type": "palbert"}, {**PONDER, "kl_target": "row", "beta": 0.05}, ["q_exit"]),
}
LAYER_GRID = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5]


def _err(msg: str) -> None:
    print(f"halting.py: {msg}", file=sys.stderr, flush=True)


def _at_matched(points: list, n: int, grid: list[float]) -> dict[str, dict]:
    """Best accuracy (± standard error) among settings whose mean exit layer is at most L."""
    out = {}
    for cap in grid:
        ok = [p for p in points if p.mean_exit_layer <= cap + 1e-9]
        if ok:
            best = max(ok, key=lambda p: (p.metric, -p.mean_exit_layer))
            out[f"{cap:g}"] = {"accuracy": round(best.metric, 4),
                               "se": round(math.sqrt(best.metric * (1 - best.metric) / n), 4),
                               "mean_exit_layer": round(best.mean_exit_layer, 3), "value": best.value}
    return out


def _chosen(val, test, rule: str, tolerance: float) -> dict | None:
    swept = sweep(val, [rule])
    point = swept.cheapest_within([rule], tolerance)
    if point is None:
        return None
    index, logits = replay(point.policy, test)
    layers = torch.tensor(test.exit_layers, dtype=torch.float32)[index]
    return {"value": point.value, "validation_accuracy": round(point.metric, 4),
            "test_accuracy": round(float((logits.argmax(-1) == test.labels).float().mean()), 4),
            "test_mean_exit_layer": round(float(layers.mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default="tweets")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--full", action="store_true", help="fine-tune the backbone (default: frozen)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backbone-lr", type=float, default=2e-5)
    ap.add_argument("--max-train", type=int, default=8000)
    ap.add_argument("--max-eval", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**DATA_DEFAULTS, "data": args.data, "seed": args.seed, "max_train": args.max_train,
                "max_eval": args.max_eval, "max_length": args.max_length, "batch_size": args.batch_size}
    data = load_from_settings(settings)
    cache = str(out / "states")
    results = {"data": args.data, "model": args.model, "full": args.full, "epochs": args.epochs, "lr": args.lr,
               "n_train": len(data.train), "n_validation": len(data.validation), "n_test": len(data.test),
               "layer_grid": LAYER_GRID, "models": {}}
    if args.json and Path(args.json).is_file():  # add to the rows of an earlier run with the same settings
        earlier = json.loads(Path(args.json).read_text())
        if all(earlier.get(k) == v for k, v in results.items() if k != "models"):
            results["models"] = earlier.get("models", {})
            _err(f"adding to the {len(results['models'])} models already in {args.json}")
        else:
            ap.error(f"{args.json} holds a run with other settings; give another --json")
    for name in names:
        halting, objective, rules, *head = MODELS[name]
        t0 = time.time()
        torch.manual_seed(args.seed)
        pooling = default_pooling(resolve_model_path(args.model))
        cfg = OfframpConfig(num_labels=data.num_labels, label_names=data.label_names,
                            head={"pooling": pooling, **(head[0] if head else {})}, halting=halting or None,
                            objective=objective)
        model = EarlyExitModel.from_backbone(args.model, cfg)
        tok = tokenizer_of(model)
        ckpt = out / name / "checkpoint"
        resume = (ckpt / "training_state.pt").is_file()
        targs = TrainingArgs(output_dir=str(out / name), epochs=args.epochs, lr=args.lr, seed=args.seed,
                             frozen_backbone=not args.full, backbone_lr=args.backbone_lr if args.full else None,
                             cache_backbone=not args.full, state_cache=False if args.full else cache,
                             save_backbone=args.full, resume=resume, progress=True)
        train(model, split_batches(data.train, tok, settings, shuffle=True),
              split_batches(data.validation, tok, settings), targs)
        sc = False if args.full else cache
        val = collect(model, split_batches(data.validation, tok, settings), state_cache=sc)
        test = collect(model, split_batches(data.test, tok, settings), state_cache=sc)
        swept = sweep(test, rules)
        n = len(test)
        row = {"train_s": round(time.time() - t0, 1), "halting": halting or None, "objective": objective,
               "head": head[0] if head else {},
               "accuracy_per_exit": [round(float((test.logits[i].argmax(-1) == test.labels).float().mean()), 4)
                                     for i in range(test.num_exits)],
               "full": round(swept.full[rules[0]].metric, 4), "rules": {}}
        for rule in rules:
            pts = swept.of(rule)
            row["rules"][rule] = {"at_mean_layer": _at_matched(pts, n, LAYER_GRID),
                                  "chosen_on_validation": _chosen(val, test, rule, args.tolerance),
                                  "frontier": [{"value": p.value, "accuracy": round(p.metric, 4),
                                                "mean_exit_layer": round(p.mean_exit_layer, 3)}
                                               for p in swept.frontier(rule)]}
        if test.halting is not None:
            row["halting_report"] = halting_report(test.halting, objective.get("lambda_p", 0.1)).to_dict()
        results["models"][name] = row
        _err(f"{name}: {json.dumps({k: row[k] for k in ('train_s', 'full', 'accuracy_per_exit')})}")
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
