"""``offramp generate``: text generation with token-level early exits (DYNAMAX / CALM).

    offramp fit-exits --model smollm2-offline --out exits/smollm2 --chat
    offramp generate --model smollm2-offline --exits exits/smollm2 --chat \\
        --prompt "Write one sentence about the sea." --policy token_confidence --value 0.8 --show-exits
    offramp generate --model smollm2-offline --exits exits/smollm2 --prompts-file prompts.txt --json out.json
    offramp generate --model runs/llama-ls --exits exits/llama-ls --speculative --plan --prompt "..."

Without ``--exits`` no token exits (output equals plain greedy ``generate``). ``--speculative`` is
lossless self-speculation from an exit (greedy, or ``--sample`` with the full model's
distribution); ``--plan`` measures this machine's costs and picks its exit and draft length.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from offramp.cli import common
from offramp.names import CACHE_STRATEGIES, DRAFT_RULES, NGRAM_TOKENS


class FitExitsMoved(argparse.Action):
    """``generate --fit-exits`` of the previous release: fitting is its own command now."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: str | None = None):
        parser.error(f"fitting exits is its own command now: `offramp fit-exits --model MODEL --out {values}`, "
                     f"then `offramp generate --model MODEL --exits {values} ...`")


def add_generate_parser(subparsers: Any) -> None:
    """Register the ``generate`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("generate", help="generate text with token-level early exits",
                              description=common.help_text(__doc__))
    p.add_argument("--model", required=True,
                   help="HF causal LM folder or Hub id, or an offline alias: smollm2-offline, mamba-bbc-offline")
    p.add_argument("--exits", help="folder of trained exits (saved by DecoderExitModel.save_pretrained)")
    p.add_argument("--fit-exits", metavar="OUT", action=FitExitsMoved, help=argparse.SUPPRESS)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    common.add_policy_args(p, generation=True)
    p.add_argument("--threshold", type=float, default=None, action=common.DeprecatedOption,
                   new="--policy token_confidence --value T", help=argparse.SUPPRESS)
    p.add_argument("--cache-strategy", choices=CACHE_STRATEGIES, default=None,
                   help="what skipped layers store (default copy_kv; freeze for Mamba; catch_up is exact on both)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    common.add_device_args(p, dtype_help="the LM's dtype")
    p.add_argument("--speculative", action="store_true",
                   help="lossless self-speculation: an exit drafts, the rest of the model verifies (output = "
                        "greedy decoding's, or with --sample drawn from the full model's distribution; needs "
                        "--exits)")
    p.add_argument("--draft-exit", type=int, default=None,
                   help="with --speculative: the exit layer that drafts (default: the deepest exit)")
    p.add_argument("--draft-tokens", type=int, default=3, help="with --speculative: most tokens the exit drafts per "
                   "round (0 with --ngram: n-gram drafts only)")
    p.add_argument("--draft-confidence", type=float, default=None,
                   help="with --speculative: stop a draft once no row's exit is this sure of its token")
    p.add_argument("--draft-rule", default=None, choices=DRAFT_RULES,
                   help="with --draft-confidence: how sure an exit is (its top probability, default; or its "
                        "confidence classifier)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="with --speculative: draft among the K tokens most frequent in the text the exits were "
                        "fitted on (recorded by offramp fit-exits); the LM head then reads K rows per draft, and the "
                        "output is unchanged")
    p.add_argument("--ngram", type=int, default=None, metavar="K",
                   help="with --speculative: draft up to K tokens from n-gram matches in the prompt and the text so far "
                        "(prompt lookup) where every row has one, from the exit otherwise; the same pass verifies both "
                        f"(default {NGRAM_TOKENS} greedy: the fastest measured on a CPU, where every drafted token adds "
                        "a position to the verify pass; 0 with --sample; 0: exit drafts only)")
    p.add_argument("--min-agreement", type=float, default=0.75,
                   help="exit rules: the probe falls back to plain decoding when the exits' tokens agree with the full "
                        "model's on fewer than this share (default 0.75)")
    p.add_argument("--no-fallback", action="store_true",
                   help="decode as asked even when the probe (a few tokens of the first prompts, plain and with "
                        "exits) finds the mode slower than plain decoding or its tokens too often wrong")
    p.add_argument("--plan", action="store_true",
                   help="with --speculative: measure this machine's costs and the exits' acceptance on the first "
                        "batch, then draft from the exit and length predicted fastest (or decode plainly when "
                        "none is predicted to beat it)")
    p.add_argument("--stream", action="store_true",
                   help="write each token as it is decoded, one JSON line per token on stdout ({index, token, "
                        "text, exit_layer}; index = the prompt's number), then one line per prompt when it ends "
                        "({index, done, text, tokens, exit_layers}); the lines of /generate with \"stream\": true")
    p.add_argument("--show-exits", action="store_true", help="print every token with its exit layer")
    p.add_argument("--json", help="write texts, tokens and exit layers to this file")
    p.set_defaults(func=cmd_generate)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file {path} does not exist")
        from offramp.data.sources import read_user_text

        prompts += [line.strip() for line in read_user_text(path).splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    if any(not p.strip() for p in prompts):
        raise ValueError("a prompt is empty: remove it or give it some text")
    return prompts


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse settings that would fail late or silently change nothing, before the model loads."""
    import math

    common.require_min(args, batch_size=1, max_new_tokens=1)
    if args.threshold is not None and not (0.0 <= args.threshold <= 1.0):  # NaN fails this too
        raise ValueError(f"--threshold must be a number in [0, 1], got {args.threshold}")
    if args.value is not None and math.isnan(args.value):
        raise ValueError("--value must be a number, got nan")
    for name in ("temperature", "top_p", "repetition_penalty"):
        v = getattr(args, name)
        if math.isnan(v) or v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a number > 0, got {v}")
    if args.top_p > 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.ngram is not None and args.ngram and args.sample:
        raise ValueError("--ngram drafts are verified greedily: drop --ngram to sample, or drop --sample")
    if args.speculative and args.ngram is None:
        args.ngram = 0 if args.sample else NGRAM_TOKENS
    common.require_min(args, draft_tokens=0, ngram=0)
    if args.draft_tokens == 0 and not args.ngram:
        raise ValueError("--draft-tokens 0 drafts from n-gram matches only: add --ngram K, or draft >= 1 tokens")
    if not 0.0 <= args.min_agreement <= 1.0:  # NaN fails this too
        raise ValueError(f"--min-agreement must be a share in [0, 1], got {args.min_agreement}")
    if args.stream:
        other = [f for f, on in (("--speculative", args.speculative), ("--show-exits", args.show_exits)) if on]
        if other:
            raise ValueError(f"--stream writes plain early-exit decoding token by token: drop {other[0]}"
                             + (" (--stream lines carry each token's exit layer)" if other[0] == "--show-exits"
                                else ""))
    if not args.speculative:
        given = [f for f, v in (("--draft-exit", args.draft_exit), ("--draft-confidence", args.draft_confidence),
                                ("--draft-vocab", args.draft_vocab), ("--draft-rule", args.draft_rule),
                                ("--plan", args.plan or None), ("--ngram", args.ngram or None)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} is an option of --speculative: add --speculative, or drop it")
        return
    if args.plan and args.draft_exit is not None:
        raise ValueError("--plan picks the drafting exit and the draft length: drop --draft-exit")
    if args.draft_confidence is not None and not 0.0 <= args.draft_confidence <= 1.0:
        raise ValueError(f"--draft-confidence must be in [0, 1], got {args.draft_confidence}")
    if args.draft_rule is not None and args.draft_confidence is None:
        raise ValueError("--draft-rule says how --draft-confidence is read: add --draft-confidence, or drop it")
    if args.draft_vocab is not None and args.draft_vocab < 1:
        raise ValueError(f"--draft-vocab must be >= 1 tokens, got {args.draft_vocab}")
    if not args.exits:
        raise ValueError("--speculative drafts with a token exit: add --exits DIR (fit them with `offramp "
                         "fit-exits`)")
    conflicting = [flag for flag, on in (("--repetition-penalty", args.repetition_penalty != 1.0),
                                         ("--policy / --threshold",
                                          args.policy is not None or args.threshold is not None)) if on]
    if conflicting:
        raise ValueError(f"--speculative keeps the full model's tokens (greedy) or distribution (--sample): "
                         f"drop {conflicting[0]}")


def _check_policy(args: argparse.Namespace) -> None:
    """Resolve --threshold into --policy and refuse a rule generation cannot run, before loading."""
    from offramp.engines.generate import SIGNALS
    from offramp.policies import require_signals

    if args.threshold is not None:
        if args.policy is not None or args.value is not None:
            raise ValueError("give either --threshold T or --policy NAME --value V, not both")
        args.policy, args.value = "token_confidence", args.threshold
    if args.policy is None and args.value is None:
        return
    if not args.exits:
        raise ValueError("--policy / --value / --threshold need exits: add --exits DIR (fit them with `offramp "
                         "fit-exits`)")
    if args.policy is not None:
        policy = common.make_policy_arg(args.policy, args.value, {"type": args.policy})  # its signals only
        require_signals(policy, set(SIGNALS), "token-exit generation",
                        "use one of max_prob, entropy, margin, patience, saturation, static, token_confidence")


def _exit_model(args: argparse.Namespace, backbone: Any) -> Any:
    """The token exits of --exits on ``backbone`` (None without --exits: plain decoding)."""
    from offramp.modeling import DecoderExitModel

    return DecoderExitModel.from_pretrained(args.exits, backbone=backbone) if args.exits else None


def cmd_generate(args: argparse.Namespace) -> int:
    """Handler of ``offramp generate``; ValueError on bad input (the main CLI prints it)."""
    from offramp.data.prompts import chat_texts
    from offramp.engines.generate.sampling import SamplingOptions
    from offramp.modeling.causal_lm import load_causal_lm

    _check_numbers(args)
    _check_policy(args)
    if args.speculative and args.cache_strategy is not None:
        raise ValueError("--cache-strategy chooses how token-exit decoding fills the cache of the layers a token "
                         "skipped; --speculative verifies every token with all layers and keeps an exact cache: "
                         "drop --cache-strategy")
    prompts = _prompts(args)
    if args.json:
        common.check_out(Path(args.json), True, "--json file", file=True)
    backbone, tok = load_causal_lm(args.model, args.dtype, common.chosen_device(args, "generate"))
    exit_model = _exit_model(args, backbone)
    sampling = SamplingOptions.from_model(backbone, do_sample=args.sample, temperature=args.temperature,
                                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                          seed=args.seed)
    texts = chat_texts(tok, prompts, args.chat)
    policy, plan, drafts, probe = None, None, {}, None
    if args.speculative:
        rows, wall, plan, drafts, probe = _decode_speculative(args, exit_model, backbone, tok, texts, prompts,
                                                              sampling)
    else:
        if exit_model is not None:
            policy = common.make_policy_arg(args.policy, args.value, exit_model.config.policy)
            if policy.type == "never" and args.policy is None:
                common.log(f"offramp generate: the exits in {args.exits} have no calibrated rule (their default is "
                           f"never): decoding with every layer; give --policy NAME --value V, or certify one "
                           f"with `offramp calibrate`")
            elif policy.type != "never":
                certified = args.policy is None and bool(exit_model.config.extra.get("calibration"))
                probe = _probe(args, exit_model, tok, texts, sampling, "early exits", not certified,
                               lambda ids, n: exit_model.generate(ids, policy=policy, max_new_tokens=n,
                                                                  cache_strategy=args.cache_strategy))
                if probe is not None and probe.fallback:
                    policy = None
        model = exit_model if exit_model is not None and policy is not None else backbone
        rows, wall = _decode(args, model, tok, texts, prompts, policy, sampling)
    _print(rows, tok, args.show_exits, exit_model if exit_model is not None else backbone, wall, quiet=args.stream)
    if drafts:
        common.log(f"speculation: {drafts['accepted']} of {drafts['drafted']} drafted tokens accepted "
                   f"({drafts['accepted'] / max(1, drafts['drafted']):.0%}), "
                   f"{sum(len(r['tokens']) for r in rows) / max(1, drafts['row_rounds']):.2f} tokens per round")
    if args.json:
        from offramp.utils import atomic_write_json

        atomic_write_json(args.json, {"model": args.model, "policy": None if policy is None else policy.to_dict(),
                                      "cache_strategy": args.cache_strategy, "wall_s": wall, "rows": rows,
                                      **({"plan": plan.to_dict()} if plan is not None else {}),
                                      **({"probe": probe.to_dict()} if probe is not None else {})})
    return 0


def _batches(tok: Any, texts: list[str], batch_size: int) -> Any:
    """(first prompt's number, left-padded encoding) of each batch, with a progress bar."""
    from offramp.utils import progress

    starts = range(0, len(texts), batch_size)
    for i in progress(starts, desc="generate", unit="batch", enabled=len(starts) > 1):
        yield i, tok(texts[i:i + batch_size], return_tensors="pt", padding=True)


def _rows(out: Any, prompts: list[str], first: int) -> list[dict]:
    """The output rows of one decoded batch: prompt, text, tokens and their exit layers."""
    rows = []
    for r in range(len(out.texts)):
        keep = out.exit_layers[r] > 0
        rows.append({"prompt": prompts[first + r], "text": out.texts[r], "tokens": out.new_tokens[r][keep].tolist(),
                     "exit_layers": out.exit_layers[r][keep].tolist()})
    return rows


def _decode(args: argparse.Namespace, model: Any, tok: Any, texts: list[str], prompts: list[str], policy: Any,
            sampling: Any) -> tuple[list[dict], float]:
    """Early-exit decoding (plain greedy / sampled decoding without exits), streamed with --stream:
    (rows, wall-clock seconds)."""
    from offramp.engines.generate import generate

    rows, start = [], time.perf_counter()
    for i, enc in _batches(tok, texts, args.batch_size):
        if args.stream:
            rows += _stream(model, enc, i, prompts, tok, policy, sampling, args)
            continue
        out = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=args.max_new_tokens,
                       policy=policy, cache_strategy=args.cache_strategy, sampling=sampling, tokenizer=tok)
        rows += _rows(out, prompts, i)
    return rows, time.perf_counter() - start


def _decode_speculative(args: argparse.Namespace, exit_model: Any, backbone: Any, tok: Any, texts: list[str],
                        prompts: list[str], sampling: Any) -> tuple[list[dict], float, Any, dict, Any]:
    """Self-speculation (--speculative, with --plan: the setting measured fastest, or plain decoding
    when none beats it; plain decoding too when the probe finds it slower): (rows, wall-clock seconds
    after the plan, the plan or None, draft counts, the probe or None)."""
    from offramp.engines.generate import generate
    from offramp.engines.generate.speculative import check_speculation, speculative_generate

    check_speculation(exit_model, sampling, args.draft_tokens or 1, args.draft_confidence, args.draft_exit,
                      args.draft_rule or "max_prob")
    vocab = _draft_vocab(args, exit_model, sampling)
    plan = None
    if args.plan:
        plan = _plan(args, exit_model, tok(texts[:args.batch_size], return_tensors="pt", padding=True), sampling,
                     vocab)
    # the modes to try, fastest expected first: exit drafts (with n-gram drafts when --ngram), then
    # n-gram drafts only (prompt lookup, no exit run) when the exits' drafts do not pay; else plain
    ngram_only = ("n-gram drafts only (prompt lookup)", 0)
    exit_drafts = plan is None or plan.best is not None
    modes = [("self-speculation", args.draft_tokens)] if args.draft_tokens and exit_drafts else []
    if args.ngram:
        modes.append(ngram_only)
    if not exit_drafts and args.draft_tokens and args.ngram:
        common.log("offramp generate: the exits' drafts do not pay here; trying n-gram drafts only (prompt lookup)")
    plain, probe = not modes, None
    for i, (mode, d) in enumerate(modes):
        then = modes[i + 1][0] if i + 1 < len(modes) else None
        probe = _probe(args, exit_model, tok, texts, sampling, mode, False,
                       lambda ids, n, d=d: speculative_generate(
                           exit_model, ids, exit_layer=args.draft_exit, draft_tokens=d,
                           draft_confidence=args.draft_confidence, draft_rule=args.draft_rule or "max_prob",
                           draft_vocab=vocab, max_new_tokens=n, sampling=sampling, ngram_tokens=args.ngram),
                       then=then)
        if probe is None or not probe.fallback:
            args.draft_tokens = d
            break
        plain = then is None
    rows, drafts, start = [], {}, time.perf_counter()
    for i, enc in _batches(tok, texts, args.batch_size):
        if plain:
            out = generate(backbone, enc["input_ids"], enc["attention_mask"], max_new_tokens=args.max_new_tokens,
                           sampling=sampling, tokenizer=tok)
        else:
            out = speculative_generate(exit_model, enc["input_ids"], enc["attention_mask"],
                                       exit_layer=args.draft_exit, draft_tokens=args.draft_tokens,
                                       draft_confidence=args.draft_confidence, draft_rule=args.draft_rule or "max_prob",
                                       draft_vocab=vocab, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                       ngram_tokens=args.ngram, tokenizer=tok)
            for key in ("row_rounds", "drafted", "accepted"):
                drafts[key] = drafts.get(key, 0) + out.extra["speculation"][key]
        rows += _rows(out, prompts, i)
    return rows, time.perf_counter() - start, plan, drafts, probe


def _probe(args: argparse.Namespace, exit_model: Any, tok: Any, texts: list[str], sampling: Any, mode: str,
           lossy: bool, run: Any, then: str | None = None) -> Any:
    """The probe of a decoding mode on the first two prompts (None with --no-fallback): a warning
    on stderr when it falls back, to plain decoding or to the mode ``then`` (tried next)."""
    if args.no_fallback:
        return None
    from offramp.engines.generate.guard import probe_decoding, unpadded_rows

    enc = tok(texts[:2], return_tensors="pt", padding=True)
    probe = probe_decoding(exit_model.backbone, unpadded_rows(enc["input_ids"], enc["attention_mask"], 2), run,
                           mode=mode, lossy=lossy, tokens=min(16, max(2, args.max_new_tokens)),
                           min_agreement=args.min_agreement, sampling=sampling)
    if probe.fallback and then is not None:
        common.log(f"offramp generate: {probe.summary()}. Trying {then} next; --no-fallback keeps {mode}")
    elif probe.fallback:
        common.log(f"offramp generate: {probe.summary()}. Decoding plainly (every layer), the fastest correct mode "
                   f"here; --no-fallback keeps {mode}")
    return probe


def _draft_vocab(args: argparse.Namespace, exit_model: Any, sampling: Any) -> Any:
    """--draft-vocab K: the first K of the exits' recorded token frequencies, and EOS (None without it)."""
    if args.draft_vocab is None:
        return None
    import torch

    stored = exit_model.config.draft_vocab
    if not stored:
        raise ValueError(f"the exits in {args.exits} record no draft vocabulary (fitted before it was recorded): "
                         "fit them again with `offramp fit-exits`, or drop --draft-vocab")
    eos = sampling.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    top = list(stored[:args.draft_vocab])
    return torch.tensor(top + [t for t in eos if t not in top], dtype=torch.long)


def _plan(args: argparse.Namespace, exit_model: Any, enc: dict, sampling: Any, vocab: Any = None) -> Any:
    """--plan: measure, print the plan on stderr, and set --draft-exit / --draft-tokens from it."""
    from offramp.engines.generate.plan import plan_speculation

    plan = plan_speculation(exit_model, enc["input_ids"], enc["attention_mask"], max_new_tokens=args.max_new_tokens,
                            sampling=sampling, draft_vocab=vocab, repeats=3, probe_rows=2, probe_tokens=24)
    common.log(plan.summary())
    if plan.best is not None:
        args.draft_exit, args.draft_tokens = plan.best["exit_layer"], plan.best["draft_tokens"]
    return plan


def _stream(model: Any, enc: dict, first: int, prompts: list[str], tok: Any, policy: Any, sampling: Any,
            args: argparse.Namespace) -> list[dict]:
    """--stream: decode one batch, writing a JSON line per token as soon as it is decoded and one
    per prompt when it ends; returns the batch's rows (as the non-streamed path builds them)."""
    import sys

    from offramp.engines.generate import TextPieces, stream_generate

    n = len(enc["input_ids"])
    texts = TextPieces(tok, n, index=range(first, first + n))
    rows: list[dict | None] = [None] * n
    for step in stream_generate(model, enc["input_ids"], enc["attention_mask"], policy=policy,
                                cache_strategy=args.cache_strategy, max_new_tokens=args.max_new_tokens,
                                sampling=sampling):
        lines = texts.lines(step)
        for line in lines:
            if line.get("done"):
                rows[line["index"] - first] = {"prompt": prompts[line["index"]],
                                               **{k: line[k] for k in ("text", "tokens", "exit_layers")}}
        sys.stdout.write("".join(json.dumps(line) + "\n" for line in lines))
        sys.stdout.flush()
    return rows  # type: ignore[return-value]


def _print(rows: list[dict], tok: Any, show_exits: bool, model: Any, wall: float, *, quiet: bool = False) -> None:
    """The texts and a summary on stdout; ``quiet`` (--stream, whose lines were the output): the
    summary on stderr only."""
    from offramp.backbones import adapter_for

    num_layers = adapter_for(getattr(model, "backbone", model), role="decoder").num_layers
    layers = [x for r in rows for x in r["exit_layers"]]
    mean = sum(layers) / max(1, len(layers))
    if quiet:
        common.log(f"{len(layers)} tokens in {wall:.1f}s ({len(layers) / wall:.1f} tokens/s); "
                   f"mean exit layer {mean:.1f} of {num_layers}")
        return
    for r in rows:
        print(f"### {r['prompt']}\n{r['text']}")
        if show_exits:
            print(" ".join(f"{tok.decode([t])!r}@{k}" for t, k in zip(r["tokens"], r["exit_layers"])))
    print(f"--- {len(layers)} tokens in {wall:.1f}s ({len(layers) / wall:.1f} tokens/s); "
          f"mean exit layer {mean:.1f} of {num_layers}")
    print(json.dumps({"tokens": len(layers), "mean_exit_layer": round(mean, 2), "num_layers": num_layers}))


# ------------------------------------------------------------------------------ token traces (collect)
def add_token_collect_args(p: argparse.ArgumentParser) -> None:
    """Options of ``offramp collect`` on a token-exits folder (the prompts to continue)."""
    g = p.add_argument_group("token exits (--model is a folder of token exits)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a text file with one prompt per line")
    g.add_argument("--prompts", type=int, default=None,
                   help="this many offline BBC News prompts (held-out articles) when no prompt is given (default 32)")
    g.add_argument("--skip", type=int, default=0, help="with --prompts: skip the first K held-out articles "
                   "(keep calibration and evaluation prompts disjoint)")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=48, help="length of the full model's continuations")
    g.add_argument("--backbone", default=None, help="the LM to load instead of the one the exits name "
                   "(a folder, Hub id or offline alias such as smollm2-offline)")


def token_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of ``add_token_collect_args``: the user's, or ``--prompts N`` offline held-out ones."""
    from offramp.data.assets import bbc_prompts

    common.require_min(args, max_new_tokens=2, skip=0)
    if args.prompts is not None:
        common.require_min(args, prompts=1)
    given = bool(args.prompt or args.prompts_file)
    if given and args.prompts is not None:
        raise ValueError("give either your prompts (--prompt / --prompts-file) or --prompts N offline ones, not both")
    return _prompts(args) if given else bbc_prompts(args.prompts or 32, split="test", skip=args.skip,
                                                     instruct=args.chat)


def cmd_collect_tokens(args: argparse.Namespace, out: Path) -> int:
    """``offramp collect`` on token exits: the full model's greedy continuations, teacher-forced once."""
    from offramp.evaluation.token_trace import collect_tokens
    from offramp.modeling.causal_lm import load_exits_and_lm
    from offramp.training.distill import greedy_continuations

    prompts = token_prompts(args)
    given = bool(args.prompt or args.prompts_file)
    model, tok = load_exits_and_lm(args.model, args.backbone, args.dtype, common.chosen_device(args, "collect"))
    seqs = greedy_continuations(model.backbone, tok, prompts, max_new_tokens=args.max_new_tokens, chat=args.chat,
                                progress=True)
    trace = collect_tokens(model, seqs, keep_hidden=args.keep_hidden, progress=True,
                           meta={"model": str(args.model), "prompts": len(prompts), "chat": args.chat,
                                 "skip": None if given else args.skip, "max_new_tokens": args.max_new_tokens})
    trace.save(out)
    agree = trace.agree().double().mean(1).tolist()
    print(json.dumps({"trace": str(out), "sequences": trace.num_sequences, "tokens": len(trace),
                      "exits": trace.exit_layers, "agreement_per_exit": [round(a, 4) for a in agree]}, indent=2))
    return 0


