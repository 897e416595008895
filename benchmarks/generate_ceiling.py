"""How fast can token exits make SmolLM2 at all? Per-exit agreement and the oracle's ceiling.

    python benchmarks/generate_ceiling.py --json benchmarks/results/generate_ceiling.json

For held-out BBC prompts (the ones ``generate_speed.py`` measures on) the full model's greedy
continuations are teacher-forced once; at every exit layer we record whether the exit's top-1
token equals the full model's. From that:

- ``per_exit_agreement``: top-1 agreement of each exit with the final layer, for the tied head (the
  final norm and LM head applied to the raw hidden state, at every layer from L/2) and for the
  trained FFN and Mamba-block heads of ``generate_speed.py`` (cached under ~/.cache/offramp/exits),
  and FFN heads distilled on far more text (``ffn_text``: ``--text-articles`` BBC training
  articles, teacher-forced, first 256 tokens each, ``--text-epochs`` epochs; trained once, cached);
- ``oracle``: an exit rule that knows the final token exits each token at the first exit that agrees
  (100% agreement), or additionally sends the hardest 10% of tokens out at the first exit (90%);
  its mean exit layer and the tokens/s ratio it would reach if exit decisions and exit heads cost
  nothing: ``(L * t_layer + t_lm_head + t_rest) / (E * t_layer + t_lm_head + t_rest)``, with the
  per-token costs of one decoder layer, the LM head and the rest of a decoding step measured here
  at batch 1 (one thread), so it is an upper bound for any exit rule on these heads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from offramp.data.assets import CACHE, bbc_articles, bbc_prompts  # noqa: E402
from offramp.modeling.causal_lm import load_causal_lm  # noqa: E402
from offramp.modeling import DecoderExitModel  # noqa: E402
from offramp.training.distill import collect_states, greedy_continuations, text_sequences, train_exit_heads  # noqa: E402
from offramp.utils import atomic_write_json  # noqa: E402


@torch.no_grad()
def agreement_matrix(model: DecoderExitModel, seqs) -> torch.Tensor:
    """(tokens, exits) bool: the exit's top-1 equals the final layer's, on generated positions."""
    rows = []
    for ids, first_new in seqs:
        out = model(ids[None])
        final = out.final_logits[0].argmax(-1)
        keep = slice(first_new - 1, ids.numel() - 1)  # positions that predicted a generated token
        hits = [model.exit_logits(f)[0].argmax(-1)[keep] == final[keep] for f in out.exit_features]
        rows.append(torch.stack(hits, dim=-1))
    return torch.cat(rows)


def text_heads(backbone, tok, articles: int, epochs: int) -> DecoderExitModel:
    """FFN exit heads distilled on BBC training articles (the first 100 articles are held out)."""
    path = CACHE / "exits" / f"smollm2-ffn-text{articles}x{epochs}"
    if path.exists():
        return DecoderExitModel.from_pretrained(path, backbone=backbone)
    model = DecoderExitModel.from_backbone(backbone, head="ffn")
    t0 = time.time()
    states = collect_states(model, text_sequences(tok, bbc_articles()[100:100 + articles], max_tokens=256))
    train_exit_heads(model, states, epochs=epochs, log=lambda m: print(m, flush=True))
    print(f"text heads: {sum(int(s.train.sum()) for s in states)} positions, {time.time() - t0:.0f}s", flush=True)
    model.save_pretrained(path)  # heads only: its confidence classifiers are untrained
    return model


def oracle(hits: torch.Tensor, exit_layers: list[int], num_layers: int, target: float) -> float:
    """Mean exit layer of the oracle that reaches ``target`` agreement (1.0: never wrong)."""
    layers = torch.tensor(exit_layers + [num_layers], dtype=torch.float)
    full = torch.cat([hits, torch.ones(len(hits), 1, dtype=torch.bool)], dim=1)
    depth = layers[full.float().argmax(dim=1)]  # first agreeing exit, else the last layer
    n_wrong = int((1 - target) * len(depth))
    if n_wrong:  # the deepest tokens exit wrongly at the first exit instead
        depth = depth.sort().values
        depth[len(depth) - n_wrong:] = float(exit_layers[0])
    return float(depth.mean())


@torch.no_grad()
def step_costs(backbone, repeats: int = 200, batch: int = 1) -> dict[str, float]:
    """Seconds per decoding step of ``batch`` rows: one decoder layer (with a 64-token cache), the
    LM head, a whole step."""
    from transformers import DynamicCache

    ids = torch.randint(0, backbone.config.vocab_size, (batch, 64))
    cache = DynamicCache(config=backbone.config)
    backbone(input_ids=ids, past_key_values=cache, use_cache=True)
    nxt = ids[:, -1:]

    def timed(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    def full_step():
        backbone(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache.crop(-1)

    step = timed(full_step)
    h = torch.randn(batch, 1, backbone.config.hidden_size)
    head = timed(lambda: backbone.lm_head(backbone.model.norm(h)))
    layers = backbone.model.layers
    backbone.model.layers = layers[:0]  # a step without decoder layers: embedding, norm, head, glue
    try:
        no_layers = timed(lambda: backbone(input_ids=nxt, use_cache=False))
    finally:
        backbone.model.layers = layers
    return {"step": step, "lm_head": head, "layer": (step - no_layers) / len(layers), "rest": no_layers - head}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text-articles", type=int, default=250, help="BBC articles for the ffn_text heads (0: skip)")
    p.add_argument("--text-epochs", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone, tok = load_causal_lm("smollm2-offline")
    n = backbone.config.num_hidden_layers
    seqs = greedy_continuations(backbone, tok, bbc_prompts(args.prompts, split="test", instruct=True),
                                max_new_tokens=args.new_tokens, batch_size=8, chat=True)
    models = {"tied": DecoderExitModel.from_backbone(backbone, list(range(n // 2, n)), head="tied")}
    for head in ("ffn", "mamba"):
        path = CACHE / "exits" / f"smollm2-{head}"
        if path.exists():
            models[head] = DecoderExitModel.from_pretrained(path, backbone=backbone)
        else:
            print(f"no trained {head} exits at {path}: run benchmarks/generate_speed.py first", flush=True)
    if args.text_articles:
        models["ffn_text"] = text_heads(backbone, tok, args.text_articles, args.text_epochs)
    costs = step_costs(backbone)
    res = {"model": "SmolLM2-135M-Instruct", "num_layers": n, "settings": vars(args),
           "step_costs_s": costs, "lm_head_in_layers": costs["lm_head"] / costs["layer"], "heads": {}}
    for name, model in models.items():
        hits = agreement_matrix(model, seqs)
        entry = {"exit_layers": model.exit_layers, "tokens": len(hits),
                 "per_exit_agreement": [round(float(x), 4) for x in hits.float().mean(0)]}
        for target in (1.0, 0.9):
            e = oracle(hits, model.exit_layers, n, target)
            ratio = (n * costs["layer"] + costs["lm_head"] + costs["rest"]) / (
                e * costs["layer"] + costs["lm_head"] + costs["rest"])
            entry[f"oracle_{int(target * 100)}"] = {"mean_exit_layer": round(e, 2),
                                                    "ideal_tokens_per_s_ratio": round(ratio, 3)}
        res["heads"][name] = entry
        print(name, json.dumps(entry), flush=True)
    atomic_write_json(Path(args.json), res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
