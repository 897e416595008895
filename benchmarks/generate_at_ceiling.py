"""Calibrated token exits against their ceiling: realised speed-up at a certified agreement, as a
fraction of the oracle's at the same agreement, at batch 1 and 8 (frozen SmolLM2, offline).

    python benchmarks/generate_at_ceiling.py --json benchmarks/results/generate_at_ceiling.json

SmolLM2-135M-Instruct with the FFN exits of ``generate_speed.py`` (trained on its own greedy
continuations of the first 64 BBC training prompts; cached), their confidence classifiers refitted
on the continuations of ``--confidence-prompts`` further training-split prompts. Learn-then-Test
certifies a ``token_confidence`` threshold on a token trace of ``--cal`` other training-split
prompts (after ``--cal-skip``; unseen by the exits) for the ``token`` risk (mean share of a
sequence's tokens whose exit disagrees with the full model) at each ``--delta`` and with each of
``--pvalues``: agreement >= 1 - delta with probability >= 1 - epsilon. At each batch size, the certified threshold
generates for real on ``--test`` held-out (test-split) prompts beside the never-exiting engine (interleaved,
best of ``--repeats``), with the ``copy_kv`` and ``catch_up`` caches.

Per row: ``tokens_per_s_ratio`` (against never-exit, same run), ``agreement`` (share of generated
tokens equal to the full model's greedy token for the same prefix), ``mean_exit_layer``;
``ideal_ratio``, what that mean exit layer would give if exit decisions, exit heads and cache
fills cost nothing (``(L t_layer + t_head + t_rest) / (E t_layer + t_head + t_rest)``, costs
measured here at that batch size); and ``oracle``: the rule that knows the full model's token,
exiting each token at the first exit that agrees and, to reach the row's agreement, sending the
hardest tokens out at the first exit (``generate_ceiling.oracle``, on the full model's test
continuations), with its ideal ratio. ``of_oracle = tokens_per_s_ratio / oracle.ideal_ratio``
(the target: >= 0.9); ``rule_of_oracle`` (ideal vs ideal: how close the rule's exits are to the
oracle's) and ``engine_of_ideal`` (realised vs its own ideal: what the engine's overheads cost)
split it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_ceiling import agreement_matrix, oracle, step_costs  # noqa: E402
from generate_speed import teacher_forced_agreement, trained_exits  # noqa: E402

from offramp.calibration import LearnThenTest  # noqa: E402
from offramp.calibration.generation import generate_rows  # noqa: E402
from offramp.data.prompts import prompt_batches  # noqa: E402
from offramp.data.assets import CACHE, bbc_prompts  # noqa: E402
from offramp.modeling.causal_lm import load_causal_lm  # noqa: E402
from offramp.evaluation.token_trace import collect_tokens  # noqa: E402
from offramp.policies import make_policy  # noqa: E402
from offramp.training.distill import greedy_continuations  # noqa: E402
from offramp.utils import atomic_write_json  # noqa: E402


def refit_confidence(model, backbone, tok, prompts: int, skip: int, new_tokens: int):
    """The exits with their confidence classifiers refitted on the greedy continuations of
    ``prompts`` training-split prompts after the first ``skip`` (the heads stay as trained); cached."""
    from offramp.modeling import DecoderExitModel
    from offramp.training.distill import fit_exits

    path = CACHE / "exits" / f"smollm2-ffn-confidence{prompts}"
    if path.exists():
        return DecoderExitModel.from_pretrained(path, backbone=backbone)
    t0 = time.time()
    seqs = greedy_continuations(backbone, tok, bbc_prompts(prompts, split="train", instruct=True, skip=skip),
                                max_new_tokens=new_tokens, batch_size=8, chat=True)
    fit = fit_exits(model, seqs, head_epochs=0, confidence_epochs=30, log=None)
    log(f"confidence classifiers refitted on {fit['positions']} positions ({time.time() - t0:.0f}s)")
    model.save_pretrained(path)
    return model


def log(msg: str) -> None:
    print(f"[generate_at_ceiling] {msg}", file=sys.stderr, flush=True)


def ideal(mean_layer: float, costs: dict[str, float], num_layers: int) -> float:
    fixed = costs["lm_head"] + costs["rest"]
    return (num_layers * costs["layer"] + fixed) / (mean_layer * costs["layer"] + fixed)


def agreement(backbone, batches, rows: list[list[int]]) -> float:
    agree = total = 0
    i = 0
    for ids, mask in batches:
        n = ids.shape[0]
        a, t = teacher_forced_agreement(backbone, {"input_ids": ids, "attention_mask": mask}, rows[i:i + n])
        agree, total, i = agree + a, total + t, i + n
    return agree / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cal", type=int, default=150, help="prompts to calibrate on (training-split articles)")
    ap.add_argument("--cal-skip", type=int, default=100, help="training-split articles skipped (the exits' own)")
    ap.add_argument("--test", type=int, default=50, help="held-out prompts to measure on")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--delta", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--strategies", nargs="+", default=["copy_kv", "catch_up"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pvalues", nargs="+", default=["hoeffding", "hoeffding_bentkus"],
                    help="Learn-then-Test's tests, each certifying its own threshold")
    ap.add_argument("--confidence-prompts", type=int, default=400,
                    help="refit the exits' confidence classifiers on the continuations of this many training-split "
                         "prompts after the calibration ones (0: keep those fitted with the heads; cached)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone, tok = load_causal_lm("smollm2-offline")
    model = trained_exits("smollm2", backbone, tok, "ffn", chat=True, train_prompts=64, new_tokens=40, top_k=1,
                          retrain=False, log=log)
    L = model.num_layers
    if args.confidence_prompts:
        model = refit_confidence(model, backbone, tok, args.confidence_prompts, args.cal_skip + args.cal,
                                 args.new_tokens)
    # calibration: training-split articles the exits never saw (they trained on the first 64);
    # measurement: the held-out articles generate_speed.py and generate_ceiling.py measure on
    cal_prompts = bbc_prompts(args.cal, split="train", instruct=True, skip=args.cal_skip)
    test_prompts = bbc_prompts(args.test, split="test", instruct=True)
    t0 = time.time()
    trace = collect_tokens(model, greedy_continuations(backbone, tok, cal_prompts, max_new_tokens=args.new_tokens,
                                                       batch_size=8, chat=True))
    test_seqs = greedy_continuations(backbone, tok, test_prompts, max_new_tokens=args.new_tokens, batch_size=8,
                                     chat=True)
    hits = agreement_matrix(model, test_seqs)  # (tokens, exits): the exit's top-1 is the full model's
    log(f"traces and oracle agreement: {time.time() - t0:.0f}s")
    certified = []
    for delta in args.delta:
        for pvalue in args.pvalues:
            ltt = LearnThenTest(delta, args.epsilon, risk="token", pvalue=pvalue).fit(
                make_policy("token_confidence"), trace)
            if any(ltt.threshold_ == other.threshold_ for d, other in certified if d == delta):
                continue  # the same threshold: measured once
            certified.append((delta, ltt))
            log(f"{pvalue}: {ltt.summary()}")
    rows = []
    for bs in args.batch_sizes:
        costs = step_costs(backbone, batch=bs)
        batches = prompt_batches(tok, test_prompts, True, bs)
        settings = [("never", None, "copy_kv", None)] + [
            (f"token_confidence@{ltt.threshold_:.3f}", ltt.policy_, s, (d, ltt))
            for d, ltt in certified if ltt.policy_ is not None for s in args.strategies]
        best = {i: float("inf") for i in range(len(settings))}
        out: dict[int, tuple] = {}
        for rep in range(args.repeats):  # interleaved: every setting shares the machine's load
            for i, (name, policy, strategy, _) in enumerate(settings):
                t = time.perf_counter()
                gen, layer = generate_rows(model, batches, policy, cache_strategy=strategy,
                                           max_new_tokens=args.new_tokens)
                best[i] = min(best[i], time.perf_counter() - t)
                out[i] = (gen, layer)
            log(f"batch {bs}: repeat {rep + 1}/{args.repeats} done")
        never_tokens = sum(len(r) for r in out[0][0])
        never_rate = never_tokens / best[0]
        for i, (name, policy, strategy, cert) in enumerate(settings[1:], 1):
            gen, layer = out[i]
            ratio = sum(len(r) for r in gen) / best[i] / never_rate
            agree = agreement(backbone, batches, gen)
            o_layer = oracle(hits, list(model.exit_layers), L, agree)
            row = {"batch": bs, "setting": name, "strategy": strategy, "delta": cert[0], "pvalue": cert[1].pvalue,
                   "certified_agreement": 1 - cert[0], "threshold": cert[1].threshold_, "bound": cert[1].summary(),
                   "tokens_per_s_ratio": ratio, "agreement": agree, "mean_exit_layer": layer,
                   "ideal_ratio": ideal(layer, costs, L),
                   "oracle": {"agreement": agree, "mean_exit_layer": o_layer, "ideal_ratio": ideal(o_layer, costs, L),
                              "at_certified": {"agreement": 1 - cert[0],
                                               "ideal_ratio": ideal(oracle(hits, list(model.exit_layers), L,
                                                                           1 - cert[0]), costs, L)}}}
            row["of_oracle"] = ratio / row["oracle"]["ideal_ratio"]
            row["rule_of_oracle"] = row["ideal_ratio"] / row["oracle"]["ideal_ratio"]
            row["engine_of_ideal"] = ratio / row["ideal_ratio"]
            rows.append(row)
            log(f"batch {bs} {name} {strategy}: {ratio:.2f}x at agreement {agree:.3f} (layer {layer:.1f}); "
                f"oracle {row['oracle']['ideal_ratio']:.2f}x -> {row['of_oracle']:.2f} of it")
        rows.append({"batch": bs, "setting": "never", "never_tokens_per_s": never_rate, "step_costs_s": costs})
    result = {"model": "SmolLM2-135M-Instruct", "exits": list(model.exit_layers), "num_layers": L,
              "cal_prompts": args.cal, "test_prompts": args.test, "new_tokens": args.new_tokens,
              "threads": args.threads, "epsilon": args.epsilon, "confidence_prompts": args.confidence_prompts,
              "oracle_tokens": len(hits), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
