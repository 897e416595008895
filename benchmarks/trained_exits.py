"""Decoders trained to exit (LayerSkip) against the same decoders trained without it, measured in one run.

    offramp train-lm --arch llama --recipe plain     --out ~/.cache/offramp/llama-bbc-plain ...
    offramp train-lm --arch llama --recipe layerskip --out ~/.cache/offramp/llama-bbc-layerskip ...
    python benchmarks/trained_exits.py --json benchmarks/results/trained_exits.json

For every model folder (default: the ``{llama,mamba}-bbc-{plain,layerskip}`` folders that exist in
~/.cache/offramp) it reports:

- per exit, on held-out BBC text (teacher-forced): perplexity and top-1 agreement with the last layer;
- tokens/s at batch 1 (``--batch B``: B ragged prompts at a time), greedy, on held-out BBC openings
  as continuation prompts, as a ratio to plain HF ``generate`` of the same model in the same run
  (methods interleaved batch by batch, median of repeats):
  - ``lossy``: token exits on the model's own head (``head="tied"``) with a ``token_confidence``
    threshold (its confidence classifiers fitted on the model's greedy continuations of BBC
    training prompts), ``max_prob`` or ``patience`` (the exits' top tokens agree). The (cache
    strategy, threshold) pair is the fastest of the grid whose token agreement (the fraction of
    emitted tokens the full model would also emit after the same prefix) is >= ``--agreement`` on
    calibration prompts; the row reports speed and agreement on disjoint evaluation prompts;
  - ``speculative``: lossless self-speculation from the exit and draft length
    that were fastest on the calibration prompts; the row says whether every evaluation output is
    identical to greedy;
  - the peers (attention models; ``benchmarks/peers.py``): HF ``assistant_early_exit`` and prompt
    lookup, and economize's early-exit self-drafter on the model's own head and its prompt lookup
    when economize is installed, each at its fastest calibration setting;
  - ``plan``: ``plan_speculation``'s predicted speed-up for every speculation setting (costs timed
    on the first calibration prompt) beside the one measured on the calibration prompts;
  - ``ceiling``: the oracle exit rule on the same exits at the lossy row's realised agreement (the
    most any rule can gain, from costs measured here) and the share of its gain the lossy row got;
    on Mamba also ``freeze``: the oracle under the freeze cache, whose skipped layers never see the
    exited tokens (its agreement, mean exit and ideal ratio).
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

from exit_schedule import step_costs  # noqa: E402
from generate_speed import interleaved, real_tokens, teacher_forced_agreement  # noqa: E402
from peers import economize_methods, hf_methods  # noqa: E402

from offramp.data.assets import CACHE, bbc_articles, bbc_prompts  # noqa: E402
from offramp.modeling.causal_lm import load_causal_lm  # noqa: E402
from offramp.engines.generate import frequent_tokens, generate, speculative_generate  # noqa: E402
from offramp.engines.generate.run import ATTENTION_STRATEGIES, SSM_STRATEGIES  # noqa: E402
from offramp.modeling import DecoderExitModel  # noqa: E402
from offramp.training.distill import fit_exits, greedy_continuations  # noqa: E402
from offramp.training.layerskip import exit_report  # noqa: E402
from offramp.utils import atomic_write_json  # noqa: E402

DEFAULT_MODELS = [f"{arch}-bbc-{recipe}" for arch in ("llama", "mamba") for recipe in ("plain", "layerskip")]


def _family(name: str) -> str:
    return name.split("@")[0].split("/")[0]


def _methods(backbone, exits: DecoderExitModel, args, thresholds, spec_settings, drafters: dict,
             peers=None) -> dict:
    """offramp's methods (and the peers' ones, or only those named in ``peers``) by name;
    ``spec_settings`` are (drafter, exit, d, draft confidence or None, draft vocabulary or None,
    n-gram draft length or 0), drafter a key of ``drafters`` (exit models by head)."""
    new, pad = args.new_tokens, args.pad

    def hf(b):
        out = backbone.generate(**b, do_sample=False, max_new_tokens=new, pad_token_id=pad)
        return out[:, b["input_ids"].shape[1]:]

    methods = {"hf_generate": hf,
               "offramp_never_exit": lambda b: generate(backbone, b["input_ids"], b["attention_mask"],
                                                        max_new_tokens=new).new_tokens}
    for strategy, t in thresholds:
        methods[f"lossy@{args.policy}{t:g}/{strategy}"] = lambda b, t=t, strategy=strategy: generate(
            exits, b["input_ids"], b["attention_mask"], policy=_policy(args.policy, t),
            cache_strategy=strategy, max_new_tokens=new).new_tokens
    for head, layer, d, conf, vocab, ngram in spec_settings:
        methods[_spec_name(head, layer, d, conf, vocab, ngram)] = lambda b, m=drafters[head], layer=layer, d=d, \
                c=conf, v=vocab, g=ngram: speculative_generate(
                    m, b["input_ids"], b["attention_mask"], exit_layer=layer, draft_tokens=d, draft_confidence=c,
                    draft_rule=args.draft_rule, draft_vocab=v, ngram_tokens=g, max_new_tokens=new).new_tokens
    if exits.adapter.kind == "attention" and args.batch == 1:  # (HF's early-exit drafting runs at batch 1 only)
        L = exits.adapter.num_layers
        layers = [k for k in args.spec_exits if k < L]
        found = {**hf_methods(backbone, new_tokens=new, pad=pad, exits=layers)}
        for cycle in args.cycles:
            found.update(economize_methods(backbone, new_tokens=new, eos=args.eos, exits=layers, cycle=cycle,
                                           lookup=cycle == args.cycles[0], log=lambda m: None))
        methods.update({k: v for k, v in found.items() if peers is None or k in peers})
    return methods


def _policy(name: str, value: float) -> dict:
    """The lossy exit rule at one value of the grid: a threshold, or patience's count of exits."""
    return {"type": name, "patience": int(value)} if name == "patience" else {"type": name, "threshold": value}


def _spec_name(head: str, layer: int, d: int, conf: float | None = None, vocab=None, ngram: int = 0) -> str:
    """speculative@E/dD[/cC][/HEAD][/vK][/ngN]: exit, draft length, draft confidence, drafting head, draft
    vocabulary, n-gram drafts of up to N tokens where the text has a match; speculative_ngram/ngN with
    d 0 (n-gram drafts only: prompt lookup on offramp's engine, no exit run)."""
    if not d:
        return f"speculative_ngram/ng{ngram}"
    return (f"speculative@{layer}/d{d}" + ("" if conf is None else f"/c{conf:g}")
            + ("" if head == "tied" else f"/{head}") + ("" if vocab is None else f"/v{len(vocab)}")
            + (f"/ng{ngram}" if ngram else ""))


def distilled_drafter(backbone, seqs, layers: list[int], head: str, epochs: int, log,
                      confidence: bool = False) -> DecoderExitModel:
    """Exits at ``layers`` with ``head`` adapters distilled towards the last layer on the model's own
    greedy continuations ``seqs`` (the backbone stays frozen), and with ``confidence`` their
    confidence classifiers fitted on them too."""
    model = DecoderExitModel.from_backbone(backbone, exit_layers=layers, head=head)
    fit = fit_exits(model, seqs, head_epochs=epochs, confidence_epochs=30 if confidence else 0, log=None)
    hist = fit["head_loss"]
    log(f"  {head} drafting heads at {layers} distilled: loss {hist[0]:.3f} -> {hist[-1]:.3f}")
    return model.eval()


def measure(backbone, tok, methods: dict, prompts: list[str], repeats: int, log, batch: int = 1) -> dict:
    """Per method: tokens/s ratio to HF generate, teacher-forced agreement, identical rows; the
    prompts run ``batch`` at a time (left-padded)."""
    eos = {tok.eos_token_id}
    batches = [tok(prompts[i:i + batch], return_tensors="pt", padding=True) for i in range(0, len(prompts), batch)]
    for fn in methods.values():
        fn(batches[0])  # warm-up
    times, res = interleaved(methods, batches, repeats, log, label="  ")
    outs = {name: [real_tokens(r, eos) for r in res[name]] for name in methods}  # per batch, per row
    ref = [g for rows in outs["hf_generate"] for g in rows]
    base = sum(len(r) for r in ref) / statistics.median(times["hf_generate"])
    rows = {}
    for name in methods:
        agree = total = 0
        for b, g in zip(batches, outs[name]):
            a, n = teacher_forced_agreement(backbone, b, g)
            agree, total = agree + a, total + n
        gens = [g for rows_ in outs[name] for g in rows_]
        secs = statistics.median(times[name])
        rows[name] = {"tokens_per_s": round(total / secs, 1), "ratio": round(total / secs / base, 3),
                      "agreement": round(agree / max(total, 1), 4),
                      "identical": f"{sum(g == r for g, r in zip(gens, ref))}/{len(ref)}"}
    return rows


def oracle_ceiling(exits: DecoderExitModel, tok, prompts: list[str], new_tokens: int, agreement: float) -> dict:
    """The most any exit rule on these exits can gain at ``agreement``: per token, the first exit
    whose greedy token is the full model's (teacher-forced on its greedy output); the hardest
    ``1 - agreement`` of the tokens leave at the first exit. Costs measured here (batch 1): a
    token exiting after k layers costs k layers + the LM head (a layer: the engine's decoding
    step less the head, over L); exit decisions are free."""
    from offramp.engines.generate import SamplingOptions
    from offramp.engines.generate.plan import exit_matches

    enc = tok(prompts, return_tensors="pt", padding=True)
    matches, lengths = exit_matches(exits, enc["input_ids"], enc["attention_mask"], new_tokens,
                                    SamplingOptions.from_model(exits.backbone))
    # a layer and the LM head alone, timed here (any backbone kind)
    layer, head = step_costs(exits.backbone, exits.adapter, tok(prompts[:1], return_tensors="pt"))
    L, layers = exits.adapter.num_layers, list(exits.exit_layers)
    depth = []
    for r, n in enumerate(lengths):
        for i in range(1, n):
            depth.append(next((k for k in layers if matches[k][r][i]), L))
    depth.sort()
    wrong = int(round((1 - agreement) * len(depth)))
    oracle = depth[:len(depth) - wrong] + [layers[0]] * wrong  # the deepest tokens sent out first
    mean = sum(oracle) / len(oracle)
    step = lambda k: k * layer + head  # noqa: E731
    return {"agreement": agreement, "mean_exit_layer": round(mean, 2),
            "ratio_vs_full_step": round(step(L) / (sum(step(k) for k in oracle) / len(oracle)), 3),
            "layer_ms": round(layer * 1e3, 3), "head_ms": round(head * 1e3, 3)}


@torch.no_grad()
def freeze_ceiling(exits: DecoderExitModel, tok, prompts: list[str], new_tokens: int, layer_ms: float,
                   head_ms: float) -> dict:
    """The oracle exit rule under the ``freeze`` cache (Mamba): a token leaves at the first exit whose
    greedy token is the full model's, and its deeper layers never see it, so later tokens run on
    the states those exits left (replayed teacher-forced on the full model's greedy output with
    ``LayerTaps(unit="token")``, which is what the freeze engine computes). Its agreement is below
    1 where those stale states change a token that ran every layer: the most any rule can keep
    with exits this frequent. Costs as in :func:`oracle_ceiling`."""
    from offramp.training.layerskip import LayerTaps

    lm, ad = exits.backbone, exits.adapter
    L, agree, depths_all = ad.num_layers, 0, []
    with LayerTaps(ad.layers(), unit="token") as taps:
        for text in prompts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            taps.depths = None
            y = lm.generate(ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
            depths = torch.full((1, y.shape[1] - 1), L)
            for p in range(ids.shape[1] - 1, y.shape[1] - 1):  # position p predicts token p + 1
                taps.depths = depths[:, :p + 1]
                lm(input_ids=y[:, :p + 1])
                top = {k: int(ad.logits(taps.outputs[k - 1][:, p]).argmax(-1)) for k in (*exits.exit_layers, L)}
                depths[0, p] = next((k for k in exits.exit_layers if top[k] == int(y[0, p + 1])), L)
                agree += top[int(depths[0, p])] == int(y[0, p + 1])
                depths_all.append(int(depths[0, p]))
    mean = sum(depths_all) / len(depths_all)
    step = lambda k: k * layer_ms + head_ms  # noqa: E731
    return {"agreement": round(agree / len(depths_all), 4), "mean_exit_layer": round(mean, 2),
            "ratio_vs_full_step": round(step(L) / (sum(step(k) for k in depths_all) / len(depths_all)), 3)}


def _last_layer_ppl(model, tok, held: torch.Tensor, windows: int) -> float:
    L = model.config.num_hidden_layers
    return exit_report(model, held, exit_layers=[L], seq_len=256, max_windows=windows)["exits"][-1]["perplexity"]


def _perplexities(name: str, backbone, tok, held: torch.Tensor, args, log) -> dict:
    """The last layer's held-out perplexity on BBC (the training domain) and on ``--other-text``, for
    the model and for ``--baseline`` (the model it was continued-trained from), and their ratios."""
    from offramp.data import load_texts

    sets = {"bbc": held}
    if args.other_text:
        other = load_texts(args.other_text, limit=2000)
        sets[args.other_text] = torch.tensor([t for text in other for t in tok(text)["input_ids"] + [tok.eos_token_id]])
    out = {"model": {k: _last_layer_ppl(backbone, tok, v, args.report_windows) for k, v in sets.items()}}
    if args.baseline:
        base, _ = load_causal_lm(args.baseline)
        out["baseline"] = {k: _last_layer_ppl(base, tok, v, args.report_windows) for k, v in sets.items()}
        out["ratio_to_baseline"] = {k: round(out["model"][k] / out["baseline"][k], 4) for k in sets}
        del base
    log(f"{name}: last-layer perplexity {out}")
    return out


def _training_record(path: Path) -> dict | None:
    """What ``offramp train-lm --model`` recorded (steps, tokens seen, the recipe), when it did."""
    report = path / "exit_report.json"
    if not report.is_file():
        return None
    data = json.loads(report.read_text())
    return {k: data.get(k) for k in ("steps", "max_steps", "tokens_seen", "seconds_this_run", "recipe", "model",
                                     "data", "train_loss")}


def bench_model(name: str, args, log) -> dict:
    path = Path(name) if Path(name).exists() else CACHE / name
    backbone, tok = load_causal_lm(str(path))
    tok.padding_side = "left"
    args.pad, args.eos = tok.pad_token_id, tok.eos_token_id
    state = json.loads((path / "layerskip_state.json").read_text()) if (path / "layerskip_state.json").exists() else {}
    L = backbone.config.num_hidden_layers
    arch = backbone.config.model_type
    texts = bbc_articles()[:100]
    held = torch.tensor([t for text in texts for t in tok(text)["input_ids"] + [tok.eos_token_id]])
    report = exit_report(backbone, held, exit_layers=args.exit_layers, seq_len=256, max_windows=args.report_windows)
    texts_ppl = _perplexities(name, backbone, tok, held, args, log)
    log(f"{name}: perplexity {report['exits'][-1]['perplexity']}, agreement per exit "
        f"{[e['agreement'] for e in report['exits']]}")
    exit_layers = args.exit_layers or [k for k in range(args.exit_every, L, args.exit_every)]
    exits = DecoderExitModel.from_backbone(backbone, exit_layers=exit_layers, head="tied")
    spec_layers = [k for k in args.spec_exits if k in exit_layers]
    distil = [h for h in args.spec_heads if h != "tied"] if spec_layers else []
    seqs = None  # the model's greedy continuations of training prompts, when something is fitted on them
    confident = args.draft_rule == "token_confidence" and any(c is not None for c in args.draft_confidences)
    if args.policy == "token_confidence" or distil or confident or args.draft_vocab:
        seqs = greedy_continuations(backbone, tok, bbc_prompts(args.train_prompts, split="train", instruct=False,
                                                                words=args.words), max_new_tokens=48)
    if args.policy == "token_confidence" or confident:  # the exits' confidence classifiers, on the same
        fit = fit_exits(exits, seqs, head_epochs=0, confidence_epochs=30, log=None)
        log(f"{name}: confidence classifiers fitted; exit-ok rate {[round(x, 2) for x in fit['exit_ok_rate']]}")
    drafters = {"tied": exits, **{h: distilled_drafter(backbone, seqs, spec_layers, h, args.head_epochs, log,
                                                       confidence=confident) for h in distil}}
    vocab = None  # the draft vocabulary: the tokens most frequent in the model's own continuations
    if args.draft_vocab:
        vocab = frequent_tokens([seq[p:] for seq, p in seqs], args.draft_vocab, always=[tok.eos_token_id])
    spec = [(h, k, d, c, v, g) for h in args.spec_heads for k in spec_layers for d in args.drafts
            for c in args.draft_confidences for v in ([vocab, None] if vocab is not None and args.both_vocabs
                                                      else [vocab]) for g in args.ngram
            if d or (g and k == spec_layers[-1] and h == args.spec_heads[0] and v is vocab
                          and c == args.draft_confidences[0])]
    # d 0: n-gram drafts only, the same whatever the exit, head and vocabulary: measured once
    calib = bbc_prompts(args.prompts, split="test", instruct=False, words=args.words)
    evals = bbc_prompts(args.prompts, split="test", instruct=False, words=args.words,
                        skip=args.prompts if args.eval_skip is None else args.eval_skip)
    allowed = SSM_STRATEGIES if exits.adapter.kind == "ssm" else ATTENTION_STRATEGIES
    strategies = [x for x in args.cache_strategies if x in allowed]
    log(f"{name}: calibration ({len(args.thresholds)} thresholds x {len(strategies)} caches, "
        f"{len(spec)} speculation settings)")
    grid = [(x, t) for x in strategies for t in args.thresholds]
    cal = measure(backbone, tok, _methods(backbone, exits, args, grid, spec, drafters), calib, 1, log, args.batch)
    ok = [(x, t) for x, t in grid if cal[f"lossy@{args.policy}{t:g}/{x}"]["agreement"] >= args.agreement]
    chosen_t = max(ok, key=lambda s: cal[f"lossy@{args.policy}{s[1]:g}/{s[0]}"]["ratio"]) if ok else None
    chosen_s = max(spec, key=lambda s: cal[_spec_name(*s)]["ratio"]) if spec else None
    peers = {}  # each peer's fastest setting on the calibration prompts
    for m, row in cal.items():
        fam = _family(m)
        if fam.startswith(("hf_assistant", "hf_prompt", "economize")) and (
                fam not in peers or row["ratio"] > cal[peers[fam]]["ratio"]):
            peers[fam] = m
    spec_label = chosen_s and _spec_name(*chosen_s)
    # the fastest setting that drafts from an exit (the chosen one, unless n-gram drafts alone won)
    exit_s = max((s for s in spec if s[2]), key=lambda s: cal[_spec_name(*s)]["ratio"], default=None)
    log(f"{name}: chose {args.policy} {chosen_t}, speculation {spec_label} (from an exit: "
        f"{exit_s and _spec_name(*exit_s)}), peers {sorted(peers.values())}; evaluating")
    ev_spec = [chosen_s] if chosen_s else []
    if exit_s and exit_s != chosen_s:
        ev_spec.append(exit_s)
    if exit_s and vocab is not None and exit_s[4] is not None:  # the same setting drafting the whole vocabulary
        ev_spec.append(exit_s[:4] + (None, exit_s[5]))
    if exit_s and exit_s[5]:  # and without n-gram drafts
        ev_spec.append(exit_s[:5] + (0,))
    ev = measure(backbone, tok, _methods(backbone, exits, args, [chosen_t] if chosen_t else [], ev_spec, drafters,
                                         set(peers.values())), evals, args.repeats, log, args.batch)
    plan = None
    if spec:  # the cost model's predictions for every setting, against what the calibration run measured
        from offramp.engines.generate import plan_speculation

        one = tok(calib[:1], return_tensors="pt")
        never = cal["offramp_never_exit"]["tokens_per_s"]
        plan = {}
        for head in args.spec_heads:
            pl = plan_speculation(drafters[head], one["input_ids"], one["attention_mask"],
                                  max_new_tokens=args.new_tokens, draft_tokens=[d for d in args.drafts if d] or [1],
                                  exit_layers=spec_layers,
                                  draft_vocab=vocab)
            rows = []
            for row in pl.settings:  # (settings that always draft d tokens: what the plan models)
                got = cal.get(_spec_name(head, row["exit_layer"], row["draft_tokens"], None, vocab))
                got = got or cal.get(_spec_name(head, row["exit_layer"], row["draft_tokens"], None, None))
                rows.append({**row, "measured_vs_never_exit": got and round(got["tokens_per_s"] / never, 3)})
            plan[head] = {"best": pl.best, "acceptance": pl.acceptance, "plain_step_s": pl.plain_step_s,
                          "draft_head_s": pl.draft_head_s, "settings": rows}
            log(f"{name}: plan ({head} heads) {pl.summary()}")
    ceiling = None
    if chosen_t is not None and args.batch == 1:  # (the oracle's costs are batch-1 costs)
        lossy = ev[f"lossy@{args.policy}{chosen_t[1]:g}/{chosen_t[0]}"]
        ceiling = oracle_ceiling(exits, tok, evals, args.new_tokens, lossy["agreement"])
        ceiling["realised_vs_never_exit"] = round(lossy["tokens_per_s"] / ev["offramp_never_exit"]["tokens_per_s"], 3)
        ceiling["fraction_of_oracle"] = round((ceiling["realised_vs_never_exit"] - 1)
                                              / max(ceiling["ratio_vs_full_step"] - 1, 1e-9), 3)
        if arch == "mamba":
            ceiling["freeze"] = freeze_ceiling(exits, tok, evals, args.new_tokens, ceiling["layer_ms"],
                                               ceiling["head_ms"])
        log(f"{name}: oracle at agreement {lossy['agreement']}: {ceiling}")
    possible = {}  # each offramp row as "x of y possible": gains over the never-exit engine, measured / ceiling
    never_tps = ev["offramp_never_exit"]["tokens_per_s"]
    if exit_s and plan:  # (the plan models exit drafts: n-gram drafts have no all-accepted ceiling of their own)
        row = next((r for r in plan[exit_s[0]]["settings"]
                    if r["exit_layer"] == exit_s[1] and r["draft_tokens"] == exit_s[2]), None)
        got = ev[_spec_name(*exit_s)]["tokens_per_s"] / never_tps
        if row is not None:
            top = row["all_accepted_speedup"]
            possible["lossless"] = {"setting": _spec_name(*exit_s), "vs_never_exit": round(got, 3),
                                    "all_accepted": top,
                                    "of_possible": round((got - 1) / (top - 1), 3) if top > 1 else None}
    if ceiling is not None:
        possible["lossy"] = {"vs_never_exit": ceiling["realised_vs_never_exit"],
                             "oracle_at_agreement": ceiling["ratio_vs_full_step"],
                             "of_possible": ceiling["fraction_of_oracle"]}
    if possible:
        log(f"{name}: x of y possible {possible}")
    trained = state.get("args", {})
    out = {"model": name, "arch": arch, "layers": L, "recipe": state.get("recipe"),
           "layer_dropout": {k: trained.get(k) for k in ("dropout_unit", "p_max", "e_scale", "weighting")}
           if state.get("recipe") == "layerskip" else None, "train_steps": state.get("step"),
           "train_seconds": state.get("seconds"), "exit_report": report["exits"], "perplexity": texts_ppl,
           "training": _training_record(path),
           "calibration": cal, "lossy_threshold": chosen_t, "speculation": spec_label,
           "peers": sorted(peers.values()), "evaluation": ev, "ceiling": ceiling, "plan": plan,
           "possible": possible}
    log(json.dumps({k: out[k] for k in ("model", "lossy_threshold", "speculation", "evaluation")}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--models", default=None, help="comma-separated folders or ~/.cache/offramp names")
    p.add_argument("--prompts", type=int, default=8, help="calibration prompts, and as many evaluation prompts")
    p.add_argument("--words", type=int, default=24, help="words of each article's opening in a prompt")
    p.add_argument("--eval-skip", type=int, default=None,
                   help="evaluation prompts start after this many test articles (default: --prompts, right after "
                        "the calibration prompts); a larger value checks a choice on prompts not seen before")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--agreement", type=float, default=0.9)
    p.add_argument("--policy", default="token_confidence", choices=("token_confidence", "max_prob", "patience"),
                   help="lossy exits: the exit rule (token_confidence fits the exits' confidence classifiers; "
                        "patience exits once that many consecutive exits agreed with the one before, and takes "
                        "--thresholds as those counts)")
    p.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.98")
    p.add_argument("--cache-strategies", default="copy_kv,propagate,catch_up,freeze,update",
                   help="lossy: the cache strategies tried (the backbone's kind picks its own)")
    p.add_argument("--train-prompts", type=int, default=64, help="continuations the confidence classifiers fit on")
    p.add_argument("--exit-every", type=int, default=2, help="lossy: an exit every this many layers")
    p.add_argument("--exit-layers", default=None, help="lossy: these exits (default one every --exit-every layers)")
    p.add_argument("--spec-exits", default="3,4,6")
    p.add_argument("--ngram", default="0", help="speculation: n-gram draft lengths to try (0: exit drafts only)")
    p.add_argument("--both-vocabs", action="store_true",
                   help="with --draft-vocab: try every speculation setting with and without the draft vocabulary")
    p.add_argument("--baseline", default=None, help="another model (the one continued-trained from) whose held-out "
                   "perplexity is reported beside each model's")
    p.add_argument("--other-text", default=None, help="text of another domain (e.g. tweets) whose perplexity is "
                   "reported for each model and the baseline")
    p.add_argument("--drafts", default="2,3,4")
    p.add_argument("--spec-heads", default="tied",
                   help="drafting heads: tied (the model's own head) and/or ffn / block adapters distilled on "
                        "the model's greedy continuations of the --train-prompts")
    p.add_argument("--head-epochs", type=int, default=3, help="distillation epochs of the ffn / block heads")
    p.add_argument("--draft-confidences", default="none",
                   help="speculation: draft confidences to try (none: always draft d tokens)")
    p.add_argument("--draft-rule", default="max_prob", choices=("max_prob", "token_confidence"),
                   help="speculation: how sure a drafting exit is (token_confidence fits its confidence classifiers)")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="speculation: draft among the K tokens most frequent in the model's continuations of the "
                        "--train-prompts (0: the whole vocabulary); evaluation also runs the chosen setting without")
    p.add_argument("--cycles", default="3,4,5", help="economize: cycle lengths to try")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--report-windows", type=int, default=32, help="256-token windows of held-out text per report")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1,
                   help="prompts decoded together (ragged, left-padded); above 1 the batch-1-only peers and the "
                        "oracle ceiling are left out")
    args = p.parse_args(argv)
    args.thresholds = [float(x) for x in args.thresholds.split(",")]
    args.cache_strategies = [x for x in args.cache_strategies.split(",") if x]
    args.spec_exits = [int(x) for x in args.spec_exits.split(",") if x]
    args.drafts = [int(x) for x in args.drafts.split(",") if x]
    args.ngram = [int(x) for x in args.ngram.split(",") if x]
    args.exit_layers = [int(x) for x in args.exit_layers.split(",")] if args.exit_layers else None
    args.draft_confidences = [None if x == "none" else float(x) for x in args.draft_confidences.split(",") if x]
    args.spec_heads = [x for x in args.spec_heads.split(",") if x]
    bad = [h for h in args.spec_heads if h not in ("tied", "ffn", "block")]
    if bad:
        p.error(f"--spec-heads takes tied, ffn and block, got {bad}")
    args.cycles = [int(x) for x in args.cycles.split(",") if x]
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else [m for m in DEFAULT_MODELS if (CACHE / m).exists()]
    if not names:
        p.error(f"no trained models in {CACHE} ({', '.join(DEFAULT_MODELS)}): train them with offramp train-lm")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json",)}, "models": []}
    for name in names:
        results["models"].append(bench_model(name, args, log))
        atomic_write_json(args.json, results)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
