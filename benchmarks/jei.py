"""JEI-DNN vs PABEE / PALBERT / entropy on the offline tweets with a frozen MiniLM-L6; conformal
sets, ECE, and risk-controlled thresholds checked by real early-exit inference on a fresh split.

    nice python benchmarks/jei.py --out runs/jei_bench --json runs/jei_bench/results.json

Stages cache to ``--out`` (pooled states, trained heads), so a rerun resumes. Splits: train (exits,
gates), validation (warm-up freezing, gate weights, model choice), test cut in two halves:
calibration (conformal, Learn-then-Test, CATs) and a fresh half for the checks.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from offramp import EarlyExitModel, OfframpConfig
from offramp.calibration import (CATsStopping, LearnThenTest, MarginalConformal, PerExitConformal, mean_set_size,
                                 miscoverage, reliability)
from offramp.calibration.risk import exit_losses
from offramp.evaluation.collect import ExitTrace, replay
from offramp.flops import model_exit_flops
from offramp.policies import make_policy
from offramp.training.jei import JEIArgs, jei_config, train_jei
from offramp.utils import load_torch_state

LAMBDAS = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
SWEEPS = {"entropy": ("joint", "threshold", np.linspace(0.0, math.log(3), 25)),
          "max_prob": ("joint", "threshold", np.linspace(0.34, 1.0, 25)),
          "patience": ("pabee", "patience", [1, 2, 3, 4, 5]),
          "q_exit": ("palbert", "q", np.linspace(0.05, 0.95, 19))}


def _encode(args, out: Path):
    """Tokenise the splits and cache MiniLM's pooled states at every layer (frozen backbone)."""
    from offramp.data.assets import minilm_path
    from offramp.data import load_data
    from offramp.data.batching import TokenizedSplit

    path = out / "pooled.pt"
    base = EarlyExitModel.from_backbone(minilm_path(), OfframpConfig(num_labels=3, head={"pooling": "mean"}))
    if path.is_file():
        return base, load_torch_state(path, "cached pooled states", "delete it to recompute")
    data = load_data("tweets", seed=args.seed, max_train=args.train, max_eval=2 * args.test)
    test = data.test
    half = len(test) // 2
    splits = {"train": data.train, "validation": data.validation.head(args.val),
              "calibration": test.head(half),
              "fresh": type(test)(test.texts[half:], None if test.pairs is None else test.pairs[half:],
                                  test.labels[half:])}
    cache = {"label_names": data.label_names}
    for name, split in splits.items():
        tok = TokenizedSplit(split, base.tokenizer, max_length=64)
        batches = []
        t0 = time.time()
        for i in range(0, len(tok), args.batch_size):
            b = tok.collate([tok[j] for j in range(i, min(i + args.batch_size, len(tok)))])
            b = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
            b["pooled"] = base.pooled_states(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            batches.append(b)
        cache[name] = batches
        print(f"encoded {name}: {len(tok)} examples in {time.time() - t0:.0f}s", flush=True)
    torch.save(cache, path)
    return base, cache


def _model(base, cfg: OfframpConfig) -> EarlyExitModel:
    cfg.base_model_name_or_path = base.config.base_model_name_or_path
    model = EarlyExitModel(base.backbone, cfg, base.tokenizer)
    model.freeze_backbone(True)
    return model


def _train_plain(model, batches, epochs: int, lr: float, seed: int) -> EarlyExitModel:
    """Train exits (and a halting layer) on cached pooled states with the config's objective."""
    params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for i in torch.randperm(len(batches), generator=g).tolist():
            loss = model(pooled=batches[i]["pooled"], labels=batches[i]["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _models(args, base, cache, out: Path) -> dict[str, EarlyExitModel]:
    """The baseline exit sets and one JEI model per lambda (heads cached under out/heads)."""
    specs = {"joint": dict(head={"pooling": "mean"}, objective={"type": "joint", "weights": "uniform"}),
             "pabee": dict(head={"pooling": "mean"}, objective={"type": "joint", "weights": "pabee"}),
             "palbert": dict(head={"pooling": "mean", "shared": True}, halting={"type": "palbert"},
                             objective={"type": "ponder"})}
    for mode in args.pos_weight:
        for lam in LAMBDAS:
            specs[f"jei_{mode}_{lam:g}"] = dict(head={"pooling": "mean"}, **jei_config(lam, pos_weight=mode))
    models = {}
    for name, spec in specs.items():
        torch.manual_seed(args.seed)
        model = _model(base, OfframpConfig(num_labels=3, label_names=cache["label_names"], **spec))
        heads = out / "heads" / f"{name}.pt"
        if heads.is_file():
            model.load_state_dict(load_torch_state(heads, "cached heads", "delete it to retrain"), strict=False)
        else:
            t0 = time.time()
            if name.startswith("jei_"):
                train_jei(model, cache["train"], cache["validation"],
                          JEIArgs(output_dir=str(out / "jei" / name), epochs=args.jei_epochs, lr=args.lr,
                                  save_backbone=False, seed=args.seed))
            else:
                _train_plain(model, cache["train"], args.epochs, args.lr, args.seed)
            heads.parent.mkdir(parents=True, exist_ok=True)
            tmp = heads.with_suffix(".tmp")
            torch.save(model.head_state_dict(), tmp)
            tmp.replace(heads)
            print(f"trained {name} in {time.time() - t0:.0f}s", flush=True)
        models[name] = model.eval()
    return models


@torch.no_grad()
def _trace(model, batches) -> ExitTrace:
    outs = [model(pooled=b["pooled"]) for b in batches]
    gate = None if outs[0].gate_logits is None else torch.cat([torch.sigmoid(o.gate_logits) for o in outs])
    halting = None if outs[0].halting_logits is None else torch.cat([torch.sigmoid(o.halting_logits) for o in outs])
    return ExitTrace(logits=torch.cat([o.exit_logits for o in outs], dim=1).float(),
                     labels=torch.cat([b["labels"] for b in batches]), exit_layers=list(model.exit_layers),
                     num_layers=model.num_layers, halting=halting, gate=gate)


def _point(policy, trace: ExitTrace, flops) -> dict:
    index, logits = replay(policy, trace)
    layers = torch.tensor(trace.exit_layers, dtype=torch.float32)
    return {"policy": policy.to_dict(), "accuracy": float((logits.argmax(-1) == trace.labels).float().mean()),
            "mean_exit_layer": float(layers[index].mean()),
            "flops_ratio": float(flops.mean(index.numpy()) / flops.full)}


def _pareto(points: list[dict]) -> list[dict]:
    best, front = -1.0, []
    for p in sorted(points, key=lambda p: (p["mean_exit_layer"], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def _uncertainty(policy, cal: ExitTrace, test: ExitTrace) -> dict:
    """Per-exit and marginal conformal at alpha 0.05 / 0.1, and ECE, on the fresh half."""
    ci, _ = replay(policy, cal)
    ti, tl = replay(policy, test)
    cal_probs = cal.logits.double().softmax(-1).numpy()
    taken_cal = cal_probs[ci.numpy(), np.arange(len(cal))]
    probs = tl.double().softmax(-1).numpy()
    y, yc = test.labels.numpy(), cal.labels.numpy()
    out = {"ece": reliability(probs, y, 15).ece, "reliability": reliability(probs, y, 15).to_dict()}
    for alpha in (0.05, 0.1):
        per = PerExitConformal(alpha).fit(cal_probs, yc, ci.numpy())
        sets = per.predict_sets(probs, ti.numpy())
        marg = MarginalConformal(alpha).fit(taken_cal, yc).predict_sets(probs)
        out[f"alpha_{alpha}"] = {"per_exit_miscoverage": miscoverage(sets, y), "per_exit_set_size": mean_set_size(sets),
                                 "marginal_miscoverage": miscoverage(marg, y), "marginal_set_size": mean_set_size(marg),
                                 "fallback_exits": per.fallback_.tolist()}
    return out


@torch.no_grad()
def _real_risk(model, policy, fresh_batches, risk: str) -> dict:
    """Risk of a calibrated policy under REAL early-exit inference (model.predict) on the fresh half."""
    losses, layers = [], []
    for b in fresh_batches:
        pred = model.predict(b["input_ids"], b["attention_mask"], policy)
        full = model(pooled=b["pooled"]).exit_logits[-1]
        z = torch.stack([pred.logits, full]).numpy()  # (2, b, c): "exit 0" = the taken exit
        losses.append(exit_losses(z, b["labels"].numpy(), np.zeros(len(b["labels"]), dtype=int), risk))
        layers.append(pred.exit_layer.float())
    return {"risk": float(np.concatenate(losses).mean()), "mean_exit_layer": float(torch.cat(layers).mean())}


def _calibrated(models, traces, args) -> list[dict]:
    rows = []
    rules = [("entropy", "joint"), ("max_prob", "joint"), ("patience", "pabee"), ("q_exit", "palbert"),
             ("gate", args.gate_model)]
    for risk, delta in (("disagree", args.delta), ("wrong_when_full_right", args.delta / 2)):
        for rule, name in rules:
            ltt = LearnThenTest(delta, args.epsilon, risk=risk).fit(make_policy(rule), traces[name]["calibration"])
            row = {"rule": rule, "model": name, "risk": risk, "delta": delta, "epsilon": args.epsilon,
                   "n_cal": ltt.n_, "bound": ltt.summary(), "threshold": ltt.threshold_}
            if ltt.policy_ is not None:
                row["real"] = _real_risk(models[name], ltt.policy_, traces[name]["fresh_batches"], risk)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "bound"}), flush=True)
    cats = CATsStopping(args.epsilon).fit(traces["joint"]["calibration"].logits.numpy())
    row = {"rule": "cats(max_prob)", "model": "joint", "risk": "disagree", "epsilon": args.epsilon,
           "threshold": cats.threshold_}
    if math.isfinite(cats.threshold_):
        row["real"] = _real_risk(models["joint"], cats.to_policy(), traces["joint"]["fresh_batches"], "disagree")
    rows.append(row)
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, cache = _encode(args, out)
    models = _models(args, base, cache, out)
    seq = float(np.mean([float(b["attention_mask"].sum(1).float().mean()) for b in cache["fresh"]]))
    traces = {name: {split: _trace(m, cache[split]) for split in ("validation", "calibration", "fresh")}
              for name, m in models.items()}
    for name in traces:
        traces[name]["fresh_batches"] = cache["fresh"]
    results: dict = {"n": {k: sum(len(b["labels"]) for b in cache[k]) for k in ("train", "validation",
                                                                              "calibration", "fresh")},
                     "num_layers": base.num_layers, "mean_tokens": seq, "curves": {}, "uncertainty": {}}
    for rule, (name, field, values) in SWEEPS.items():
        flops = model_exit_flops(models[name], seq)
        pts = [_point(make_policy(rule, **{field: type(getattr(make_policy(rule), field))(v)}),
                      traces[name]["fresh"], flops) for v in values]
        results["curves"][rule] = {"points": pts, "pareto": _pareto(pts)}
    for mode in args.pos_weight:
        jei_pts = []
        for lam in LAMBDAS:
            name = f"jei_{mode}_{lam:g}"
            p = _point(make_policy("gate"), traces[name]["fresh"], model_exit_flops(models[name], seq))
            p["val_accuracy"] = _point(make_policy("gate"), traces[name]["validation"],
                                       model_exit_flops(models[name], seq))["accuracy"]
            jei_pts.append({"lambda": lam, "pos_weight": mode, **p})
        results["curves"][f"jei_gate_{mode}"] = {"points": jei_pts, "pareto": _pareto(jei_pts)}
    results["full_model_accuracy"] = {n: float((traces[n]["fresh"].logits[-1].argmax(-1)
                                                == traces[n]["fresh"].labels).float().mean()) for n in traces}
    ops = {"entropy": ("joint", {"type": "entropy", "threshold": 0.6}),
           "max_prob": ("joint", {"type": "max_prob", "threshold": 0.8}),
           "patience": ("pabee", {"type": "patience", "patience": 2}),
           "q_exit": ("palbert", {"type": "q_exit", "q": 0.5}),
           "gate": (args.gate_model, {"type": "gate", "threshold": 0.5}),
           "never": ("joint", {"type": "never"})}
    for rule, (name, spec) in ops.items():
        results["uncertainty"][rule] = {"model": name, "policy": spec,
                                        **_uncertainty(make_policy(spec), traces[name]["calibration"],
                                                       traces[name]["fresh"])}
    results["calibrated"] = _calibrated(models, traces, args)
    return results


def run_digits(args) -> dict:
    """A small ViT trained from scratch with JEI-DNN on scikit-learn digits (8x8): gates on images."""
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTModel

    from offramp.backbones.vit import flatten_images

    torch.set_num_threads(args.threads)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]  # (n, 1, 8, 8)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    cut = {"train": perm[:1200], "validation": perm[1200:1500], "test": perm[1500:]}
    batches = {k: [{"input_ids": flatten_images(x[i]), "labels": y[i]} for i in idx.split(args.batch_size)]
               for k, idx in cut.items()}
    vit = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
               num_attention_heads=4, intermediate_size=128)
    out: dict = {"n": {k: len(v) for k, v in cut.items()}, "points": []}
    for lam in (0.0, 0.1, 0.4, 1.0):
        torch.manual_seed(args.seed)
        model = EarlyExitModel.from_backbone(ViTModel(ViTConfig(**vit)), OfframpConfig(num_labels=10,
                                                                                       **jei_config(lam)))
        t0 = time.time()
        res = train_jei(model, batches["train"], batches["validation"],
                        JEIArgs(output_dir=str(Path(args.out) / f"digits_{lam:g}"), epochs=args.jei_epochs * 3,
                                warmup_epochs=30, lr=1e-3, frozen_backbone=False, save_backbone=True,
                                seq_len=17, seed=args.seed))
        trace = _trace_inputs(model, batches["test"])
        flops = model_exit_flops(model, 17)
        point = {"lambda": lam, **_point(make_policy("gate"), trace, flops), "train_s": time.time() - t0,
                 "warmup_epochs": sum(h["stage"] == "warmup" for h in res["history"]),
                 "full_accuracy": float((trace.logits[-1].argmax(-1) == trace.labels).float().mean())}
        point["entropy"] = [_point(make_policy("entropy", threshold=t), trace, flops) for t in (0.05, 0.2, 0.5)]
        out["points"].append(point)
        print(json.dumps({k: v for k, v in point.items() if k != "entropy"}), flush=True)
    return out


FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist


def _fashion(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images (n, 1, 28, 28) in [0, 1] and labels (n,) from the idx files."""
    import gzip

    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [Path(folder) / f"{prefix}-{kind}-idx{dims}-ubyte.gz" for kind, dims in (("images", 3), ("labels", 1))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"Fashion-MNIST not found ({', '.join(missing)}): install Debian's dataset-fashion-mnist "
                         "(apt-get install dataset-fashion-mnist) or pass --fashion-dir")
    images = np.frombuffer(gzip.decompress(paths[0].read_bytes()), dtype=np.uint8, offset=16)
    labels = np.frombuffer(gzip.decompress(paths[1].read_bytes()), dtype=np.uint8, offset=8)
    x = torch.tensor(images.reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    return x, torch.tensor(labels.astype(np.int64))


def _pretrained_vit(args, x: torch.Tensor, y: torch.Tensor, out: Path):
    """A small ViT trained from scratch for its last layer only (a plain classifier, no exits)."""
    from transformers import ViTConfig, ViTModel

    from offramp.backbones.vit import flatten_images

    torch.manual_seed(args.seed)
    vit = ViTModel(ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=6,
                             num_attention_heads=4, intermediate_size=128), add_pooling_layer=False)
    base = EarlyExitModel.from_backbone(vit, OfframpConfig(num_labels=10, exit_layers=[6]))
    path = out / "vit_pretrained.pt"
    if path.is_file():
        base.load_state_dict(load_torch_state(path, "cached ViT", "delete it to retrain"))
        return base.eval()
    opt = torch.optim.AdamW(base.parameters(), lr=2e-3, weight_decay=0.05)
    steps = args.vit_epochs * math.ceil(len(y) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.vit_epochs):
        base.train()
        for idx in torch.randperm(len(y), generator=g).split(128):
            loss = base(flatten_images(x[idx]), labels=y[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"ViT epoch {epoch + 1}/{args.vit_epochs}: loss {loss.detach().item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    tmp = path.with_suffix(".tmp")
    torch.save(base.state_dict(), tmp)
    tmp.replace(path)
    return base.eval()


def run_fashion(args) -> dict:
    """JEI-DNN where early exits are weak: exits added to a ViT trained on Fashion-MNIST for its last
    layer only (frozen), as in JEI-DNN's vision setting; gates against entropy / max_prob."""
    from offramp.backbones.vit import flatten_images

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = _fashion(args.fashion_dir, "train")
    xt, yt = _fashion(args.fashion_dir, "test")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    tr, va = perm[:args.train], perm[args.train:args.train + args.val]
    pre = _pretrained_vit(args, x[tr], y[tr], out)
    half = len(yt) // 2
    parts = {"train": (x[tr], y[tr]), "validation": (x[va], y[va]), "calibration": (xt[:half], yt[:half]),
             "fresh": (xt[half:], yt[half:])}
    exits = EarlyExitModel.from_backbone(pre.backbone, OfframpConfig(num_labels=10))
    cache = {}
    with torch.no_grad():
        for name, (xi, yi) in parts.items():
            cache[name] = [{"pooled": exits.pooled_states(flatten_images(xi[i:i + 256])), "labels": yi[i:i + 256]}
                           for i in range(0, len(yi), 256)]
    specs = {"joint": dict(objective={"type": "joint", "weights": "uniform"})}
    for mode in args.pos_weight:
        for lam in FASHION_LAMBDAS:
            specs[f"jei_{mode}_{lam:g}"] = jei_config(lam, pos_weight=mode)
    models, results = {}, {"n": {k: len(v[1]) for k, v in parts.items()}, "curves": {}, "uncertainty": {}}
    for name, spec in specs.items():
        torch.manual_seed(args.seed)
        model = EarlyExitModel(pre.backbone, OfframpConfig(num_labels=10, **spec))
        model.freeze_backbone(True)
        t0 = time.time()
        if name.startswith("jei_"):
            train_jei(model, cache["train"], cache["validation"],
                      JEIArgs(output_dir=str(out / "jei" / name), epochs=args.jei_epochs, lr=args.lr, seq_len=50,
                              seed=args.seed))
        else:
            _train_plain(model, cache["train"], args.epochs, args.lr, args.seed)
        print(f"trained {name} in {time.time() - t0:.0f}s", flush=True)
        models[name] = model.eval()
    flops = model_exit_flops(models["joint"], 50)
    traces = {n: {s: _trace(m, cache[s]) for s in ("calibration", "fresh")} for n, m in models.items()}
    results["per_exit_accuracy"] = {n: [float((t["fresh"].logits[e].argmax(-1) == t["fresh"].labels).float().mean())
                                        for e in range(t["fresh"].logits.shape[0])] for n, t in traces.items()}
    for rule, values in (("entropy", np.linspace(0.0, math.log(10), 31)), ("max_prob", np.linspace(0.1, 1.0, 31))):
        for name in ("joint", f"jei_{args.pos_weight[0]}_{FASHION_LAMBDAS[2]:g}"):
            pts = [_point(make_policy(rule, threshold=float(v)), traces[name]["fresh"], flops) for v in values]
            results["curves"][f"{rule} ({name})"] = {"points": pts, "pareto": _pareto(pts)}
    depth = {}
    for mode in args.pos_weight:
        pts = [{"lambda": lam, **_point(make_policy("gate"), traces[f"jei_{mode}_{lam:g}"]["fresh"], flops)}
               for lam in FASHION_LAMBDAS]
        results["curves"][f"jei_gate_{mode}"] = {"points": pts, "pareto": _pareto(pts)}
        depth.update({f"jei_{mode}_{p['lambda']:g}": p["mean_exit_layer"] for p in pts})
    # uncertainty at the exit taken, each gate model against entropy on the joint heads at the same depth
    entropy = results["curves"]["entropy (joint)"]["points"]
    for lam in FASHION_LAMBDAS:
        name = f"jei_{args.pos_weight[0]}_{lam:g}"
        gate = make_policy("gate")
        match = min(entropy, key=lambda p: abs(p["mean_exit_layer"] - depth[name]))
        results["uncertainty"][name] = {"gate": _uncertainty(gate, traces[name]["calibration"], traces[name]["fresh"]),
                                        "entropy_joint": {"policy": match["policy"], "mean_exit_layer":
                                                          match["mean_exit_layer"],
                                                          **_uncertainty(make_policy(match["policy"]),
                                                                         traces["joint"]["calibration"],
                                                                         traces["joint"]["fresh"])}}
    return results


FASHION_LAMBDAS = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]


@torch.no_grad()
def _trace_inputs(model, batches) -> ExitTrace:
    outs = [model(b["input_ids"]) for b in batches]
    return ExitTrace(logits=torch.cat([o.exit_logits for o in outs], dim=1).float(),
                     labels=torch.cat([b["labels"] for b in batches]), exit_layers=list(model.exit_layers),
                     num_layers=model.num_layers,
                     gate=torch.cat([torch.sigmoid(o.gate_logits) for o in outs]))


def plot(results: dict, out: Path) -> None:
    """Pareto curves (accuracy vs mean exit layer) and reliability diagrams, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from offramp.calibration.ece import Reliability, plot_reliability

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for rule, curve in results["curves"].items():
        pts = curve["points"] if rule.startswith("jei_gate") else curve["pareto"]
        ax.plot([p["mean_exit_layer"] for p in pts], [p["accuracy"] for p in pts],
                marker="o" if rule.startswith("jei_gate") else ".", label=rule)
    ax.set_xlabel("mean exit layer")
    ax.set_ylabel("accuracy (fresh test half)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png.tmp.png", dpi=120)
    plt.close(fig)
    (out / "pareto.png.tmp.png").replace(out / "pareto.png")
    curves = {}
    for rule, u in results["uncertainty"].items():
        r = {k: np.array([np.nan if v is None else v for v in u["reliability"][k]], dtype=float)
             for k in ("edges", "confidence", "accuracy", "count")}
        curves[rule] = Reliability(r["edges"], r["confidence"], r["accuracy"], r["count"].astype(int), u["ece"])
    plot_reliability(curves, out / "reliability.png")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/jei_bench")
    p.add_argument("--json", default=None)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--test", type=int, default=1500, help="size of each test half (calibration, fresh)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--jei-epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--pos-weight", default="none,balanced,exact",
                   help="comma-separated gate positive weights to train JEI models with (objective.pos_weight)")
    p.add_argument("--gate-model", default=None,
                   help="the JEI model whose gate rule is calibrated (default jei_<first --pos-weight>_0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--task", choices=("tweets", "digits", "fashion", "plot"), default="tweets",
                   help="tweets: the text comparison; digits: JEI-DNN on a small ViT; fashion: exits on a ViT "
                        "trained on Fashion-MNIST for its last layer (weak early exits); plot: PNGs from --json")
    p.add_argument("--fashion-dir", default=FASHION_DIR, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--vit-epochs", type=int, default=12, help="fashion: epochs of the ViT's own training")
    args = p.parse_args(argv)
    args.pos_weight = [m for m in args.pos_weight.split(",") if m]
    args.gate_model = args.gate_model or f"jei_{args.pos_weight[0]}_0.1"
    if args.task == "plot":
        results = json.loads(Path(args.json).read_text())
        plot(results, Path(args.out))
        return results
    results = {"tweets": run, "digits": run_digits, "fashion": run_fashion}[args.task](args)
    text = json.dumps(results, indent=1)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    if args.task == "tweets":
        plot(results, Path(args.out))
    print(json.dumps({k: v for k, v in results.items() if k != "uncertainty"}, indent=1)[:20000])
    return results


if __name__ == "__main__":
    main()
