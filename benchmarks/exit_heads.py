"""Which exit head to pick: the DYNAMAX Mamba-block head against the FFN and tied heads, in one run.

    python benchmarks/exit_heads.py --models ~/.cache/offramp/smollm2-bbc-layerskip --exit-layers 15,21,24 \\
        --json benchmarks/results/exit_heads_smollm2.json

For every model folder, with the backbone frozen, each head type gets exits at the same layers:
``tied`` (the model's own final norm and LM head, nothing to train but the confidence
classifiers), ``ffn`` (a CALM-style FFN adapter) and ``mamba`` (the DYNAMAX Mamba-block head, with
its own recurrent state), the adapters distilled on BBC News text (teacher-forced, ``--fit-texts``
articles, the held-out ones left out) and every exit's confidence classifier fitted on the same.
It reports, per head and exit:

- the head's cost per token at batch 1 (its own layers, before the shared LM head), in ms and in
  backbone layers (``cost_layers``), and the teacher-forced top-1 agreement with the last layer on
  held-out articles: "agreement at equal cost" compares a head at layer k with the tied head at
  layer k + ``cost_layers``;
- the realised speed-up of lossy exits (``token_confidence``, the threshold fastest at
  ``--agreement`` on calibration prompts; held-out prompts to evaluate) against plain HF
  ``generate`` of the same model in the same run (methods interleaved), with its token agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trained_exits import measure  # noqa: E402

from offramp.data.assets import bbc_articles, bbc_prompts  # noqa: E402
from offramp.engines.generate import generate  # noqa: E402
from offramp.engines.generate.plan import median_seconds  # noqa: E402
from offramp.modeling import DecoderExitModel  # noqa: E402
from offramp.modeling.causal_lm import load_causal_lm  # noqa: E402
from offramp.training.distill import fit_exits, text_sequences  # noqa: E402
from offramp.utils import atomic_write_json  # noqa: E402

HEADS = ("tied", "ffn", "mamba")


@torch.no_grad()
def head_costs(exits: DecoderExitModel, tok, prompt: str) -> tuple[float, list[float]]:
    """(one backbone layer in ms, each exit head's own cost per token in ms), at batch 1 on one token
    (a Mamba head scans that token from an empty state: the arithmetic of a decoding step)."""
    ad, lm = exits.adapter, exits.backbone
    one = tok([prompt], return_tensors="pt")
    step = (median_seconds(lambda: generate(lm, one["input_ids"], one["attention_mask"], max_new_tokens=17))
            - median_seconds(lambda: generate(lm, one["input_ids"], one["attention_mask"], max_new_tokens=1))) / 16
    h = torch.zeros(1, 1, ad.hidden_size, dtype=ad.dtype)
    lm_head = median_seconds(lambda: ad.logits(h))
    layer_ms = (step - lm_head) / ad.num_layers * 1e3
    costs = []
    for e in range(len(exits.exit_layers)):
        costs.append(median_seconds(lambda e=e: exits.features(e, h)) * 1e3)
    return layer_ms, costs


@torch.no_grad()
def agreement(exits: DecoderExitModel, seqs) -> list[float]:
    """Teacher-forced top-1 agreement of each exit with the last layer over ``seqs``' targets."""
    agree = torch.zeros(len(exits.exit_layers))
    count = 0
    for ids, p in seqs:
        out = exits(ids[None])
        final = out.final_logits[0, p - 1:-1].argmax(-1)
        for e, f in enumerate(out.exit_features):
            agree[e] += (exits.exit_logits(f)[0, p - 1:-1].argmax(-1) == final).sum()
        count += len(final)
    return [round(float(a) / max(count, 1), 4) for a in agree]


def bench_model(name: str, args, log) -> dict:
    backbone, tok = load_causal_lm(name)
    tok.padding_side = "left"
    args.pad, args.eos = tok.pad_token_id, tok.eos_token_id
    texts = bbc_articles()
    fit_seqs = text_sequences(tok, texts[100:100 + args.fit_texts], max_tokens=args.fit_max_tokens)
    held = text_sequences(tok, texts[:args.held_texts], max_tokens=256)
    calib = bbc_prompts(args.prompts, split="test", instruct=False, words=args.words, skip=args.held_texts)
    evals = bbc_prompts(args.prompts, split="test", instruct=False, words=args.words,
                        skip=args.held_texts + args.prompts)
    heads, models = {}, {}
    for head in args.heads:
        exits = DecoderExitModel.from_backbone(backbone, exit_layers=args.exit_layers, head=head)
        fit = fit_exits(exits, fit_seqs, head_epochs=0 if head == "tied" else args.head_epochs, log=None)
        exits.eval()
        layer_ms, costs = head_costs(exits, tok, calib[0])
        agree = agreement(exits, held)
        heads[head] = {"exits": [{"layer": k, "agreement": a, "head_ms": round(c, 4),
                                  "cost_layers": round(c / layer_ms, 3)}
                                 for k, a, c in zip(exits.exit_layers, agree, costs)],
                       "layer_ms": round(layer_ms, 4), "fit_positions": fit["positions"]}
        models[head] = exits
        log(f"{name} {head}: {heads[head]}")

    def lossy(exits, t):
        return lambda b: generate(exits, b["input_ids"], b["attention_mask"],
                                  policy={"type": "token_confidence", "threshold": t},
                                  cache_strategy=args.cache_strategy, max_new_tokens=args.new_tokens).new_tokens

    def hf(b):
        out = backbone.generate(**b, do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=args.pad)
        return out[:, b["input_ids"].shape[1]:]

    methods = {"hf_generate": hf, **{f"lossy@{h}/{t:g}": lossy(models[h], t) for h in args.heads
                                     for t in args.thresholds}}
    cal = measure(backbone, tok, methods, calib, 1, log)
    chosen = {}
    for h in args.heads:
        ok = [t for t in args.thresholds if cal[f"lossy@{h}/{t:g}"]["agreement"] >= args.agreement]
        chosen[h] = max(ok, key=lambda t, h=h: cal[f"lossy@{h}/{t:g}"]["ratio"]) if ok else None
    log(f"{name}: chose {chosen}; evaluating")
    ev_methods = {"hf_generate": hf, **{f"lossy@{h}/{t:g}": lossy(models[h], t) for h, t in chosen.items()
                                        if t is not None}}
    ev = measure(backbone, tok, ev_methods, evals, args.repeats, log)
    for h, t in chosen.items():
        heads[h]["lossy"] = None if t is None else {"threshold": t, **ev[f"lossy@{h}/{t:g}"]}
    return {"model": name, "layers": backbone.config.num_hidden_layers, "exit_layers": args.exit_layers,
            "heads": heads, "calibration": cal, "evaluation": ev}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--models", required=True, help="comma-separated model folders or offline aliases")
    p.add_argument("--exit-layers", required=True, help="comma-separated exits, the same for every head")
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--fit-texts", type=int, default=300, help="BBC training articles the heads are fitted on")
    p.add_argument("--fit-max-tokens", type=int, default=128)
    p.add_argument("--head-epochs", type=int, default=2)
    p.add_argument("--held-texts", type=int, default=20, help="held-out articles for agreement (and skipped by "
                   "the prompts)")
    p.add_argument("--prompts", type=int, default=8, help="calibration prompts, and as many evaluation prompts")
    p.add_argument("--words", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--agreement", type=float, default=0.9)
    p.add_argument("--cache-strategy", default="catch_up")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.exit_layers = [int(x) for x in args.exit_layers.split(",")]
    args.heads = [h for h in args.heads.split(",") if h]
    bad = [h for h in args.heads if h not in HEADS]
    if bad:
        p.error(f"--heads takes {', '.join(HEADS)}, got {bad}")
    args.thresholds = [float(x) for x in args.thresholds.split(",")]
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "models": []}
    for name in args.models.split(","):
        results["models"].append(bench_model(name, args, log))
        atomic_write_json(args.json, results)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
