"""LYNX vs the full chain, a fixed token budget and DEER on held-out math problems (CPU, offline).

Phases (each resumable: every trace, label and per-problem result is cached under --work):

  build      label the cue events of reasoning-gym training problems (forced exits) -> npz files
  ceiling    label the cue events of the evaluation chains too: what an oracle stopping at the
             best cue would save (``offramp.evaluation.events.oracle_ceiling``), per task
  ceiling-report  the oracles of both prompts and of the training chains -> --ceiling-out
  baselines  full chain, fixed budget and DEER on the evaluation problems -> results-<prompt>.jsonl
  fit        train the probe, calibrate it per cue event (LYNX), per chain (premature stops) and per
             chain for lost right answers, at each delta
  lynx       run the LYNX rules online (--lynx-methods), with the full chain timed again beside them
  report     aggregate into the JSON written to --out

Chains run --batch-size at a time in offramp's batched engine (each chain is what it is alone).
The probe is trained on chains of --probe-prompt (default plain); --prompt chooses the evaluation
prompt (plain, or check: solve, then check the answer), so one probe can be measured unchanged on
both, or each prompt measured with a probe trained on its own chains.

Example: ``nice python benchmarks/reasoning.py --phase all --threads 1``; with ``--shard K/N``
N processes share build, baselines and lynx (run fit once in between). benchmarks/README.md
gives the commands of the committed run.

The model is built once from offline GGUF packages into ~/.cache/offramp (see --model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from offramp.engines.reason import ReasonConfig, iter_reason
from offramp.modeling import resolve_dtype
from offramp.policies import DeerPolicy, ProbeExitPolicy, make_policy
from offramp.engines.reason.cues import CueConfig
from offramp.evaluation.events import build_dataset, load_dataset, oracle_ceiling, replay_events, same_answer
from offramp.data.tasks import Problem, gsm8k_problems, prompt_suffix, reasoning_gym_problems

CACHE = Path(os.path.expanduser("~/.cache/offramp"))
MODELS = {  # model folder name in ~/.cache/offramp -> offramp's offline alias (GGUF packages)
    "qwen2.5-coder-0.5b-instruct": "qwen-coder-0.5b-offline",
    "qwen2.5-coder-1.5b-instruct": "qwen-coder-1.5b-offline",
}


def prepare_model(name: str) -> Path:
    """The HF folder of ``name``: a folder, an offline alias, or a cache folder name of ``MODELS``
    (converted once from its GGUF packages by ``offramp.data.assets.gguf_parts_dir``)."""
    from offramp.data.assets import GGUF_PARTS, gguf_parts_dir

    if os.path.isdir(name):
        return Path(name)
    alias = MODELS.get(name, name)
    if alias not in GGUF_PARTS:
        raise ValueError(f"unknown model {name!r}: give an HF folder or one of {sorted(MODELS) + sorted(GGUF_PARTS)}")
    return gguf_parts_dir(alias)


def load_model(name: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_model(name)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never a question on stdin
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=False).eval()
    return model, tok


def problems(args, shard: bool = False) -> tuple[list[Problem], list[Problem]]:
    """Training and evaluation problems; with ``shard``, only this process's share (--shard K/N)."""
    train = reasoning_gym_problems("gsm_symbolic", args.n_train, seed=args.train_seed)
    test = gsm8k_problems(args.n_gsm8k, offset=0) if args.n_gsm8k else []
    if args.n_symbolic:
        test += reasoning_gym_problems("gsm_symbolic", args.n_symbolic, seed=args.test_seed)
    if args.n_transfer:
        test += reasoning_gym_problems(args.transfer_task, args.n_transfer, seed=args.test_seed)
    if shard:
        k, n = args.shard
        train, test = train[k::n], test[k::n]
    return train, test


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def reason_config(args, max_new_tokens: int | None = None, prompt: str | None = None) -> ReasonConfig:
    """The settings of every chain; ``prompt`` defaults to --prompt (the probe's events use "plain")."""
    return ReasonConfig(cues=CueConfig(step_boundaries=True), forcing="boxed",
                        max_new_tokens=max_new_tokens or args.max_new_tokens,
                        max_answer_tokens=16, feature_layers=tuple(args.layers),
                        prompt_suffix=prompt_suffix(prompt or args.prompt))


def results_path(args) -> Path:
    return Path(args.work) / f"results-{args.prompt}.jsonl"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def done_keys(path: Path) -> set[tuple[str, str, str]]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["uid"], r["method"], str(r["delta"])) for r in rows}


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:  # one line per finished run: an interrupted run loses at most one
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_methods(model, tok, test: list[Problem], methods: list[tuple[str, object, object]], args) -> None:
    """Each method over the problems it has not finished, --batch-size chains at a time; one row per
    chain as it ends (``wall_s``: its time in the batch, from joining to its answer)."""
    path = results_path(args)
    done = done_keys(path)
    for method, delta, (policy, cfg) in methods:
        todo = [p for p in test if (p.uid, method, str(delta)) not in done]
        for i, res in iter_reason(model, tok, todo, policy=policy, config=cfg, batch_size=args.batch_size):
            p = todo[i]
            row = {"uid": p.uid, "source": p.source, "method": method, "delta": delta, "prompt": args.prompt,
                   "batch": args.batch_size, "correct": bool(res.correct), "answer": res.answer, "gold": p.answer,
                   "tokens": res.tokens, "chain_tokens": res.chain_tokens, "wall_s": res.wall_s,
                   "stop": res.stop, "exit_event": res.exit_event, "n_events": len(res.events)}
            append_row(path, row)
            log(f"{p.uid} {method} {delta}: {res.stop} tokens={res.tokens} wall={res.wall_s:.1f}s "
                f"correct={res.correct}")


def _built(p, t) -> None:
    log(f"built {p.uid}: {len(t['events'])} events, {t['chain_tokens']} tokens, correct={t['correct']}")


def training_dir(args, prompt: str | None = None) -> Path:
    """The labelled training chains of ``prompt`` (default --probe-prompt)."""
    prompt = prompt or args.probe_prompt
    return Path(args.work) / ("events" if prompt == "plain" else f"events-{prompt}")


def phase_build(model, tok, args) -> None:
    train, _ = problems(args, shard=True)
    build_dataset(model, tok, train, training_dir(args), config=reason_config(args, prompt=args.probe_prompt),
                  model_name=args.model, batch_size=args.batch_size, on_problem=_built)


def ceiling_dir(args) -> Path:
    return Path(args.work) / f"events-test-{args.prompt}"


def phase_ceiling(model, tok, args) -> None:
    _, test = problems(args, shard=True)
    build_dataset(model, tok, test, ceiling_dir(args), config=reason_config(args), model_name=args.model,
                  batch_size=args.batch_size, on_problem=_built)


def evaluation_chains(args):
    """The labelled evaluation chains of --prompt, in problem order (None before the ceiling phase)."""
    _, test = problems(args)
    have = [p.uid for p in test if (ceiling_dir(args) / f"{p.uid}.npz").exists()]
    return load_dataset(ceiling_dir(args), uids=have) if have else None


def ceiling_report(args, chains=None) -> dict | None:
    """The oracle's savings on the labelled evaluation chains (None before the ceiling phase)."""
    chains = chains if chains is not None else evaluation_chains(args)
    if chains is None:
        return None
    return {"problems": len(chains.uids), "prompt": args.prompt, **oracle_ceiling(chains.traces)}


def replayed_rules(data, probes: dict, oracle: dict | None = None) -> list[dict]:
    """Each LYNX rule replayed over the labelled evaluation chains ``data`` (the engine's own
    ``decide`` over stored events; a chain is what it is alone, so the stop, its tokens and its
    forced answer are the online run's): accuracy, tokens saved and premature exits per source, and
    with ``oracle`` (``ceiling_report``) the saving as a share of the same-answer oracle's. Not timed."""
    out = []
    for (method, delta), probe in sorted(probes.items()):
        stops = replay_events(ProbeExitPolicy(probe=probe), data)
        per_source: dict[str, list[tuple]] = {}
        for t, i in zip(data.traces, stops):
            e = t["events"][i] if i >= 0 else None
            tokens = int(e["fork"]) + int(e.get("answer_tokens", 0)) if e else int(t["tokens"])
            right = bool(e["correct"]) if e else bool(t["correct"])
            per_source.setdefault(t["source"], []).append((right, tokens, int(t["tokens"]), i >= 0,
                                                           bool(t["correct"])))
        for src, rs in sorted(per_source.items()):
            a = np.array(rs, dtype=np.float64)
            out.append({"method": method, "delta": delta, "per": PER[method], "source": src, "n": len(rs),
                        "accuracy": float(a[:, 0].mean()), "tokens": float(a[:, 1].mean()),
                        "tokens_saved": float(1 - a[:, 1].sum() / a[:, 2].sum()),
                        "exit_rate": float(a[:, 3].mean()),
                        "premature_exit_rate": float(((a[:, 3] == 1) & (a[:, 0] == 0)).mean()),
                        "wrong_where_full_right": float(((a[:, 4] == 1) & (a[:, 0] == 0)).mean()),
                        "full_accuracy": float(a[:, 4].mean())})
            possible = (oracle or {}).get("by_source", {}).get(src, {}).get("oracle_same", {}).get("tokens_saved")
            if possible:
                out[-1]["of_oracle_same"] = out[-1]["tokens_saved"] / possible
    return out


def hindsight_frontier(data, p1: np.ndarray, oracle: dict | None = None, margin: float = 0.02,
                       premature: tuple[float, ...] = (0.1, 0.3)) -> dict:
    """The most a probe's ranking can save: the per-chain rule "stop at the first cue with
    P(right) > t" (scores ``p1``, one per event of ``data``) at the threshold t chosen on these
    chains themselves (so not a method, a ceiling for this probe): the best saving with accuracy
    within ``margin`` of the full chain, alone and with premature exits at most each of
    ``premature``. Per source."""
    out: dict[str, dict] = {}
    for src in sorted({t["source"] for t in data.traces}):
        chains = []
        for g, t in enumerate(data.traces):
            if t["source"] != src:
                continue
            evs = t["events"]
            stops = [(bool(e["correct"]), int(e["fork"]) + int(e.get("answer_tokens", 0))) for e in evs]
            chains.append((np.maximum.accumulate(p1[data.groups == g]) if evs else np.zeros(0), stops,
                           bool(t["correct"]), int(t["tokens"])))
        full_acc = float(np.mean([c[2] for c in chains]))
        full_tokens = float(np.sum([c[3] for c in chains]))
        best: dict[str, dict] = {}
        for thr in np.unique(np.concatenate([c[0] for c in chains] + [np.array([np.inf])])):
            right = tokens = early_wrong = 0
            for run_max, stops, full_right, n in chains:
                k = int(np.searchsorted(run_max, thr, side="right")) if run_max.size else 0
                ok, used = stops[k] if k < len(stops) else (full_right, n)
                right, tokens = right + ok, tokens + used
                early_wrong += int(k < len(stops) and not ok)
            row = {"threshold": float(thr), "accuracy": right / len(chains), "tokens_saved": 1 - tokens / full_tokens,
                   "premature_exit_rate": early_wrong / len(chains)}
            if row["accuracy"] < full_acc - margin - 1e-12:
                continue
            for name, cap in [("accuracy_within_margin", 1.0)] + [(f"and_premature_le_{p}", p) for p in premature]:
                if row["premature_exit_rate"] <= cap + 1e-12 and row["tokens_saved"] > best.get(name, {}).get(
                        "tokens_saved", -1.0):
                    best[name] = row
        possible = (oracle or {}).get("by_source", {}).get(src, {}).get("oracle_same", {}).get("tokens_saved")
        for row in best.values():
            if possible:
                row["of_oracle_same"] = row["tokens_saved"] / possible
        out[src] = {"n": len(chains), "full_accuracy": full_acc, "margin": margin, **best}
    return out


def same_labels(data) -> np.ndarray:
    """(n,) 1 where an event's forced answer equals its full chain's answer (the answer is ready)."""
    return np.array([int(same_answer(e.get("answer"), t.get("answer"))) for t in data.traces for e in t["events"]],
                    dtype=np.int64)


def answer_signals(data, oracle: dict | None = None) -> dict:
    """The hindsight frontier of the signals a forced answer gives (no probe): the forced
    answer's mean token probability (DEER's confidence) and the number of consecutive cues, up
    to this one, whose forced answers agree (stop once k agree)."""
    agree = []
    for t in data.traces:
        run, last = 0, None
        for e in t["events"]:
            run = run + 1 if (e.get("answer") is not None and same_answer(e.get("answer"), last)) else 1
            last = e.get("answer")
            agree.append(float(run))
    confidence = np.array([float(e.get("mean_prob", 0.0)) for t in data.traces for e in t["events"]])
    return {"deer_confidence": hindsight_frontier(data, confidence, oracle),
            "answer_agreement": hindsight_frontier(data, np.array(agree), oracle)}


def ranking(test, p1: np.ndarray, oracle: dict | None = None) -> dict:
    """How scores ``p1`` (one per event of ``test``) rank the events (AUROC for a right forced
    answer and for the full chain's answer), and their hindsight frontier."""
    from sklearn.metrics import roc_auc_score

    return {"auroc_right": float(roc_auc_score(test.labels, p1)),
            "auroc_same": float(roc_auc_score(same_labels(test), p1)),
            "hindsight": hindsight_frontier(test, p1, oracle)}


def probe_variants(args, test, base, oracle: dict | None = None) -> list[dict]:
    """Probes on the evaluation chains ``test``, each with its ``ranking``: the benchmark's MLP
    ``base`` (trained on right-answer labels), the MLP on same-answer labels and a logistic
    regression (standardised features, C = 0.001) on each, all of the same fitting events. Then the
    logistic regression cross-fitted on the evaluation chains themselves (5 folds by chain;
    ``"fit": "evaluation"``): no shift between the training and evaluation chains, so a ceiling for
    any probe of its kind."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from offramp.calibration.lynx import LynxProbe

    def logistic():
        return make_pipeline(StandardScaler(), LogisticRegression(C=1e-3, max_iter=2000, class_weight="balanced"))

    train, _ = problems(args)
    data = load_dataset(training_dir(args), uids=[p.uid for p in train])
    fit = data.subset(range(int(round(len(data.uids) * args.fit_fraction))))
    out = []
    for label, y in (("right", fit.labels), ("same", same_labels(fit))):
        for name in ("mlp", "logistic"):
            if name == "mlp":
                model = base if label == "right" else LynxProbe(seed=0).fit(fit.features, y)
            else:
                model = logistic().fit(fit.features, y)
            p1 = model.predict_proba(test.features)[:, 1]
            out.append({"probe": name, "trained_on": label, "fit": "training", **ranking(test, p1, oracle)})
            log(f"variant {name} on {label}: AUROC {out[-1]['auroc_right']:.3f} / {out[-1]['auroc_same']:.3f}")
    for label, y in (("right", test.labels), ("same", same_labels(test))):
        p1 = np.zeros(len(y))
        for tr, te in GroupKFold(5).split(test.features, y, test.groups):
            p1[te] = logistic().fit(test.features[tr], y[tr]).predict_proba(test.features[te])[:, 1]
        out.append({"probe": "logistic", "trained_on": label, "fit": "evaluation", **ranking(test, p1, oracle)})
        log(f"cross-fitted logistic on {label}: AUROC {out[-1]['auroc_right']:.3f} / {out[-1]['auroc_same']:.3f}")
    return out


def phase_baselines(model, tok, args) -> None:
    _, test = problems(args, shard=True)
    methods = [("full", None, (make_policy("never"), reason_config(args))),
               ("budget", None, (make_policy("never"), reason_config(args, args.budget))),
               ("deer", None, (DeerPolicy(args.deer_lambda), reason_config(args)))]
    run_methods(model, tok, test, [m for m in methods if m[0] in args.baselines], args)


PER = {"lynx": "event", "lynx_chain": "chain", "lynx_lost": "chain"}  # method -> what delta bounds
RISK = {"lynx": "premature", "lynx_chain": "premature", "lynx_lost": "lost"}  # (LynxProbe.calibrate)


def probe_path(args, method: str, delta: float) -> Path:
    name = {"lynx": "probe", "lynx_chain": "probe-chain", "lynx_lost": "probe-lost"}[method]
    prefix = "" if args.probe_prompt == "plain" else f"{args.probe_prompt}-"
    return Path(args.work) / f"{prefix}{name}-delta{delta}"


def fit_probes(args) -> dict[tuple[str, float], object]:
    """Probes per (method, delta): loaded when already on disk (runs that used them stay valid),
    else fitted on the first --fit-fraction of the training problems and calibrated on the rest."""
    from offramp.calibration.lynx import LynxProbe

    out = {(m, d): LynxProbe.load(probe_path(args, m, d)) for m in PER for d in args.deltas
           if probe_path(args, m, d).exists()}
    if len(out) == len(PER) * len(args.deltas):
        return out
    train, _ = problems(args)
    data = load_dataset(training_dir(args), uids=[p.uid for p in train])  # in problem order
    n = len(data.uids)
    n_fit = int(round(n * args.fit_fraction))
    fit, cal = data.subset(range(n_fit)), data.subset(range(n_fit, n))
    base = LynxProbe(seed=0).fit(fit.features, fit.labels)
    for method, per in PER.items():
        for delta in args.deltas:
            if (method, delta) in out:
                continue
            probe = base.calibrate(cal.features, cal.labels, delta=delta, per=per, groups=cal.groups,
                                   risk=RISK[method], chain_right=cal.chain_right)
            probe.save(probe_path(args, method, delta))
            out[method, delta] = probe
    summary = {"events_fit": int(fit.labels.size), "positives_fit": int(fit.labels.sum()),
               "events_cal": int(cal.labels.size), "positives_cal": int(cal.labels.sum()),
               "problems_fit": n_fit, "problems_cal": n - n_fit,
               "chain_thresholds": {str(d): str(out["lynx_chain", d].chain_threshold_) for d in args.deltas},
               "lost_thresholds": {str(d): str(out["lynx_lost", d].chain_threshold_) for d in args.deltas}}
    name = "probe_summary.json" if args.probe_prompt == "plain" else f"probe_summary-{args.probe_prompt}.json"
    (Path(args.work) / name).write_text(json.dumps(summary, indent=1))
    log(f"probe: {summary}")
    return out


def phase_lynx(model, tok, args) -> None:
    _, test = problems(args, shard=True)
    probes = fit_probes(args)
    # the full chain again, interleaved with LYNX, so wall-clock ratios share the machine's load
    methods = [("full", "lynx-phase", (make_policy("never"), reason_config(args)))]
    methods += [(m, d, (ProbeExitPolicy(probe=probes[m, d]), reason_config(args))) for m in args.lynx_methods
                for d in args.deltas]
    run_methods(model, tok, test, methods, args)


def event_accepts(policy, features: np.ndarray) -> np.ndarray:
    """(n,) whether ``policy`` (its own decide) would stop at each stored event, each taken alone."""
    import torch

    from offramp.policies import ExitSignals

    signals = ExitSignals(hidden=torch.as_tensor(features))
    return policy.decide(0, signals, policy.start(len(features), 0))[0].numpy()


def event_level_check(args) -> dict:
    """Per-event premature-exit rate on held-out labelled events (rotating fit / cal / test thirds)."""
    import itertools

    from offramp.calibration.lynx import LynxProbe

    data = load_dataset(training_dir(args))
    parts = [list(range(i, len(data.uids), 3)) for i in range(3)]
    out = {}
    for delta in args.deltas:
        exits_wrong = wrong = exits_right = right = 0
        chains, premature = {"event": 0, "chain": 0}, {"event": 0, "chain": 0}
        for a, b, c in itertools.permutations(range(3)):
            fit, cal, test = data.subset(parts[a]), data.subset(parts[b]), data.subset(parts[c])
            if len(set(fit.labels.tolist())) < 2:
                continue
            base = LynxProbe(seed=0).fit(fit.features, fit.labels)
            probe = base.calibrate(cal.features, cal.labels, delta)
            acc = event_accepts(ProbeExitPolicy(probe=probe), test.features)
            for per in ("event", "chain"):  # share of held-out chains whose first exit is at a wrong event
                rule = probe if per == "event" else base.calibrate(cal.features, cal.labels, delta, per="chain",
                                                                   groups=cal.groups)
                stops = replay_events(ProbeExitPolicy(probe=rule), test)  # the online rule, over stored events
                for c, i in enumerate(stops):
                    chains[per] += 1
                    premature[per] += int(i >= 0 and test.labels[test.groups == c][i] == 0)
            exits_wrong += int(acc[test.labels == 0].sum())
            wrong += int((test.labels == 0).sum())
            exits_right += int(acc[test.labels == 1].sum())
            right += int((test.labels == 1).sum())
        out[str(delta)] = {"p_exit_given_wrong": exits_wrong / max(wrong, 1), "wrong_events": wrong,
                           "p_exit_given_right": exits_right / max(right, 1), "right_events": right,
                           "premature_chain_rate": {per: premature[per] / max(chains[per], 1) for per in chains},
                           "held_out_chains": chains["event"]}
    return out


def _stopped_early(row: dict) -> bool:
    return row["stop"] == "cue" or (row["method"] == "budget" and row["stop"] == "budget")


def _summarise(rs: list[dict], full_correct: dict[str, bool]) -> dict:
    return {
        "accuracy": float(np.mean([r["correct"] for r in rs])),
        "tokens": float(np.mean([r["tokens"] for r in rs])),
        "wall_s": float(np.mean([r["wall_s"] for r in rs])),
        # the method stopped before the chain's end and its answer is wrong (reaching --max-new-tokens
        # is the end of every chain; only the budget method's own budget stops it early)
        "premature_exit_rate": float(np.mean([_stopped_early(r) and not r["correct"] for r in rs])),
        "exit_rate": float(np.mean([_stopped_early(r) for r in rs])),
        "wrong_where_full_right": float(np.mean([full_correct.get(r["uid"], False) and not r["correct"]
                                                 for r in rs])),
    }


def phase_report(args) -> dict:
    """Aggregate the problems on which every method finished; savings against the full chain timed
    in the same phase (baselines: full, budget, DEER; lynx: full again, LYNX at each delta)."""
    _, test = problems(args)
    uids = {p.uid for p in test}
    path = results_path(args)
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if r["uid"] in uids]
    keys = [("full", None, "baselines"), ("budget", None, "baselines"), ("deer", None, "baselines"),
            ("full", "lynx-phase", "lynx")] + [(m, d, "lynx") for m in PER for d in args.deltas]
    have = {(r["uid"], r["method"], r["delta"]) for r in rows}
    keys = [k for k in keys if any((m, d) == k[:2] for _, m, d in have)]  # the phases that ran
    keys.sort(key=lambda k: k[0] != "full")  # the full chains first: every other row refers to one
    complete = sorted(u for u in uids if all((u, m, d) in have for m, d, _ in keys))
    full_correct = {r["uid"]: r["correct"] for r in rows if r["method"] == "full" and r["delta"] == "lynx-phase"}
    full_correct.update({r["uid"]: r["correct"] for r in rows if r["method"] == "full" and r["delta"] is None})
    table, full_of = [], {}
    for m, d, group in keys:
        rs = [r for r in rows if r["method"] == m and r["delta"] == d and r["uid"] in complete]
        if not rs:
            continue
        row = {"method": m, "delta": None if d == "lynx-phase" else d, "timing_group": group,
               **({"per": PER[m], "risk": RISK[m]} if m in PER else {}),
               **_summarise(rs, full_correct),
               "by_source": {src: _summarise([r for r in rs if r["source"] == src], full_correct)
                             for src in sorted({r["source"] for r in rs})}}
        if m == "full":
            full_of[group] = row
        # without a full chain of its own phase (--baselines budget,deer), the lynx phase's one
        ref = full_of.get(group) or full_of.get("lynx")
        if ref and ref["timing_group"] != group:
            row["timing_reference"] = ref["timing_group"]
        if ref:
            row["tokens_saved"] = 1 - row["tokens"] / ref["tokens"]
            row["wall_saved"] = 1 - row["wall_s"] / ref["wall_s"]
        table.append(row)
    reruns = {r["uid"]: r["answer"] for r in rows if r["method"] == "full" and r["delta"] == "lynx-phase"}
    summary_path = Path(args.work) / "probe_summary.json"
    report = {
        "model": args.model, "dtype": args.dtype, "threads": args.threads, "prompt": args.prompt,
        "prompt_text": prompt_suffix(args.prompt), "batch": args.batch_size,
        "tasks": sorted({r["source"] for r in rows if r["uid"] in complete}),
        "problems": {"n": len(complete), "uids": complete,
                     "sets": {"gsm8k_test_first": args.n_gsm8k, "gsm_symbolic_seed": args.test_seed,
                              "gsm_symbolic_n": args.n_symbolic, "transfer_task": args.transfer_task,
                              "transfer_n": args.n_transfer}},
        "train": {"set": "reasoning-gym gsm_symbolic", "seed": args.train_seed, "n": args.n_train,
                  "fit_fraction": args.fit_fraction,
                  **(json.loads(summary_path.read_text()) if summary_path.exists() else {})},
        "settings": {"max_new_tokens": args.max_new_tokens, "budget": args.budget,
                     "deer_lambda": args.deer_lambda, "layers": args.layers, "cues": "step boundaries + cue words",
                     "forcing": "boxed"},
        "full_rerun_same_answers": (all(reruns.get(u) == r["answer"] for u in complete for r in rows
                                        if r["uid"] == u and r["method"] == "full" and r["delta"] is None)
                                    if any(r["method"] == "full" and r["delta"] is None for r in rows) else None),
        "rows": table,
        "oracle": ceiling_report(args),
        "event_level": event_level_check(args) if training_dir(args).exists() else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    print(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["build", "ceiling", "ceiling-report", "baselines", "fit", "lynx", "report",
                                        "all"],
                    default="all")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU computes it natively, else float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(CACHE / "reasoning-bench"))
    ap.add_argument("--out", default="benchmarks/results/reasoning.json")
    ap.add_argument("--ceiling-out", default="benchmarks/results/reasoning_ceiling.json")
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--train-seed", type=int, default=1000)
    ap.add_argument("--n-gsm8k", type=int, default=15)
    ap.add_argument("--n-symbolic", type=int, default=15)
    ap.add_argument("--test-seed", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--deer-lambda", type=float, default=0.95)
    ap.add_argument("--baselines", type=lambda t: t.split(","), default=["full", "budget", "deer"],
                    help="baselines phase: which of full,budget,deer to run (without full, their savings are "
                         "against the lynx phase's full chain)")
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--lynx-methods", nargs="+", choices=list(PER), default=list(PER),
                    help="lynx phase: the rules run online (lynx: per event; lynx_chain: per chain, premature "
                         "stops; lynx_lost: per chain, lost right answers)")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, -1])
    ap.add_argument("--fit-fraction", type=float, default=0.6)
    ap.add_argument("--n-transfer", type=int, default=0, help="problems of --transfer-task (non-math) to evaluate")
    ap.add_argument("--transfer-task", default="family_relationships")
    ap.add_argument("--prompt", default="plain", choices=["plain", "check"],
                    help="evaluation prompt (offramp.data.tasks.PROMPT_PRESETS)")
    ap.add_argument("--probe-prompt", default="plain", choices=["plain", "check"],
                    help="prompt of the training chains (build) and so of the probe (fit, ceiling-report); "
                         "the online phases use the plain-prompt probe")
    ap.add_argument("--batch-size", type=int, default=8, help="chains decoded together")
    ap.add_argument("--shard", type=parse_shard, default=(0, 1),
                    help="K/N: build / baselines / lynx only every N-th problem from the K-th, so N "
                         "processes can share the work (all write to the same --work)")
    args = ap.parse_args(argv)
    if args.probe_prompt != "plain" and args.phase not in ("build", "fit", "ceiling-report"):
        ap.error(f"--probe-prompt {args.probe_prompt} serves --phase build, fit and ceiling-report; the online "
                 "phases and their report use the plain-prompt probe (leave --probe-prompt out)")
    args.dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")  # the report names the one used
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.phase == "report":
        phase_report(args)
        return
    if args.phase == "fit":
        fit_probes(args)
        return
    if args.phase == "ceiling-report":  # the oracles of every labelled prompt, and the training chains
        from offramp.utils import atomic_write_json

        out = {"model": args.model, "max_new_tokens": args.max_new_tokens, "batch": args.batch_size, "prompts": {}}
        probes = fit_probes(args)
        for prompt in ("plain", "check"):
            args.prompt = prompt
            chains = evaluation_chains(args)
            if chains is None:  # that prompt's chains are not labelled
                out["prompts"][prompt] = None
                continue
            rep = out["prompts"][prompt] = ceiling_report(args, chains)
            rep["replayed_lynx"] = replayed_rules(chains, probes, rep)
            # every calibrated probe shares the fitted MLP's scores
            rep["probe_variants"] = probe_variants(args, chains, next(iter(probes.values())), rep)
            rep["probe_hindsight"] = rep["probe_variants"][0]["hindsight"]
            rep["answer_signals"] = answer_signals(chains, rep)
            if prompt != args.probe_prompt and training_dir(args, prompt).exists():
                own = argparse.Namespace(**{**vars(args), "probe_prompt": prompt})
                own_probes = fit_probes(own)
                ranked = ranking(chains, next(iter(own_probes.values())).predict_proba(chains.features)[:, 1], rep)
                rep["own_prompt_probe"] = {"probe_prompt": prompt, "auroc_right": ranked["auroc_right"],
                                           "auroc_same": ranked["auroc_same"],
                                           "replayed_lynx": replayed_rules(chains, own_probes, rep),
                                           "probe_hindsight": ranked["hindsight"]}
        train, _ = problems(args)
        out["probe_prompt"] = args.probe_prompt
        out["training"] = oracle_ceiling(load_dataset(training_dir(args), uids=[p.uid for p in train]).traces)
        atomic_write_json(args.ceiling_out, out)
        print(json.dumps(out, indent=1))
        return
    model, tok = load_model(args.model, args.dtype)
    phases = ["build", "ceiling", "baselines", "fit", "lynx", "report"] if args.phase == "all" else [args.phase]
    for ph in phases:
        log(f"phase {ph}")
        if ph == "report":
            phase_report(args)
        else:
            {"build": phase_build, "ceiling": phase_ceiling, "baselines": phase_baselines,
             "fit": lambda m, t, a: fit_probes(a),
             "lynx": phase_lynx}[ph](model, tok, args)


if __name__ == "__main__":
    sys.exit(main())
