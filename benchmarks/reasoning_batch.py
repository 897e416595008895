"""Chains of thought in batches: tokens/s of offramp's batched reasoning engine at several batch sizes
against single-chain HF ``generate`` on the same model, in the same run (CPU, offline).

Every chain decodes greedily with the full-chain rule (``never``) up to --max-new-tokens, then its
answer is forced as in every LYNX run, so the engine does all its work: cue detection, features at
every token, forks and forced answers. Throughput is the generated tokens (chain and forced
answers) over the wall-clock of the whole run. Batch 1 and HF ``generate`` run on the first
--n-single problems, larger batches on --n problems (the batch stays full: continuous batching).
``identical`` counts the chains whose tokens equal the batch-1 chain of the same problem.

Example: ``python benchmarks/reasoning_batch.py --model qwen2.5-coder-1.5b-instruct --threads 2``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reasoning import load_model  # noqa: E402

from offramp.engines.reason import ReasonConfig, eos_ids, prompt_ids, reason_batch  # noqa: E402
from offramp.modeling import resolve_dtype  # noqa: E402
from offramp.data.tasks import gsm8k_problems  # noqa: E402
from offramp.utils import atomic_write_json  # noqa: E402


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


@torch.no_grad()
def hf_single(model, tok, problems, max_new: int) -> dict:
    """Each problem alone through ``model.generate`` (greedy, the chain only)."""
    eos = eos_ids(tok, model)
    tokens, t0 = 0, time.perf_counter()
    chains = []
    for p in problems:
        ids = torch.tensor([prompt_ids(tok, p.question)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        gen = out[0, ids.shape[1]:].tolist()
        while gen and gen[-1] in eos:
            gen.pop()
        tokens += len(gen)
        chains.append(gen)
    wall = time.perf_counter() - t0
    return {"method": "hf_generate", "batch": 1, "problems": len(problems), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "chains": chains}


def offramp_batch(model, tok, problems, cfg: ReasonConfig, batch: int) -> dict:
    t0 = time.perf_counter()
    res = reason_batch(model, tok, problems, config=cfg, batch_size=batch)
    wall = time.perf_counter() - t0
    tokens = sum(r.tokens for r in res)
    return {"method": "offramp_reason", "batch": batch, "problems": len(problems), "tokens": tokens,
            "chain_tokens": sum(r.chain_tokens for r in res), "wall_s": wall, "tokens_per_s": tokens / wall,
            "chain_tokens_per_s": sum(r.chain_tokens for r in res) / wall,
            "accuracy": sum(bool(r.correct) for r in res) / len(res), "chains": [r.chain_ids for r in res]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU computes it natively, else float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=16, help="problems for batch sizes > 1")
    ap.add_argument("--n-single", type=int, default=4, help="problems for batch 1 and HF generate")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/results/reasoning_batch.json")
    args = ap.parse_args(argv)
    args.dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")  # the report names the one used
    if args.n_single > args.n or min(args.batches) < 1:
        raise SystemExit("--n-single must be <= --n and every batch size >= 1")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, args.dtype)
    problems = gsm8k_problems(args.n)
    cfg = ReasonConfig(max_new_tokens=args.max_new_tokens, feature_layers=(-1,))
    rows = []
    log(f"hf generate on {args.n_single} problems")
    hf = hf_single(model, tok, problems[: args.n_single], args.max_new_tokens)
    rows.append(hf)
    ref: list[list[int]] | None = None
    for b in args.batches:
        subset = problems[: args.n_single] if b == 1 else problems
        log(f"offramp batch {b} on {len(subset)} problems")
        row = offramp_batch(model, tok, subset, cfg, b)
        if b == 1:
            ref = row["chains"]
            row["identical_to_hf"] = sum(a == h for a, h in zip(row["chains"], hf["chains"]))
        if ref is not None:
            row["identical_to_batch1"] = sum(a == r for a, r in zip(row["chains"], ref))
        rows.append(row)
        log(f"  {row['tokens_per_s']:.2f} tokens/s")
    for r in rows:
        r["ratio_to_hf"] = r["tokens_per_s"] / hf["tokens_per_s"]
        r.pop("chains")
    one = next((r for r in rows if r["method"] == "offramp_reason" and r["batch"] == 1), None)
    if one:
        for r in rows:
            r["ratio_to_batch1"] = r["tokens_per_s"] / one["tokens_per_s"]
    report = {"model": args.model, "dtype": args.dtype, "threads": args.threads,
              "max_new_tokens": args.max_new_tokens, "task": "gsm8k test (first problems)",
              "policy": "never (full chain, answer forced at the budget)", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
