"""Resumable on-disk dataset of cue events: hidden-state features and forced-exit labels.

For each training problem the full chain is generated once; at every cue event the generation is
forked, the answer forced and checked (label y = 1 if correct). One file per problem,
``<out>/<uid>.npz``, holds the event features (n_events, d), labels (n_events,) and the trace as
JSON; it is written to a temporary name and renamed, so an interrupted build keeps every problem
already finished and a rerun skips them.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from offramp.data.tasks import Problem, numbers_equal
from offramp.engines.reason import SIGNALS, ReasonConfig, event_signals, iter_reason
from offramp.engines.reason.forcing import ForcedAnswer
from offramp.policies import make_policy, require_signals
from offramp.utils import atomic_write_bytes, atomic_write_text, read_json

MANIFEST = "manifest.json"


@dataclass
class EventDataset:
    """Events of many problems: ``groups[i]`` is the problem index of event i in ``uids``."""

    features: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int64
    groups: np.ndarray  # (n,) int64
    uids: list[str]
    traces: list[dict[str, Any]]

    @property
    def chain_right(self) -> np.ndarray:
        """(n,) bool: whether the full chain of each event's problem answers right."""
        right = np.array([bool(t.get("correct")) for t in self.traces], dtype=bool)
        return right[self.groups] if self.groups.size else np.zeros(0, dtype=bool)

    def subset(self, problem_idx: Iterable[int]) -> "EventDataset":
        keep = sorted(set(int(i) for i in problem_idx))
        remap = {p: j for j, p in enumerate(keep)}
        mask = np.isin(self.groups, keep)
        groups = np.array([remap[g] for g in self.groups[mask]], dtype=np.int64)
        return EventDataset(self.features[mask], self.labels[mask], groups,
                            [self.uids[p] for p in keep], [self.traces[p] for p in keep])


def _config_dict(config: ReasonConfig) -> dict[str, Any]:
    d = asdict(config)
    d["cues"]["words"] = list(d["cues"]["words"])
    d["feature_layers"] = list(d["feature_layers"])
    return d


def _atomic_savez(path: Path, **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _check_manifest(out: Path, config: ReasonConfig, model_name: str) -> None:
    want = {"model": model_name, "config": _config_dict(config)}
    path = out / MANIFEST
    if path.exists():
        have = read_json(path, "event dataset manifest", "use a new --out folder")
        if isinstance(have, dict) and isinstance(have.get("config"), dict):  # settings added later: defaults
            have["config"] = {**_config_dict(ReasonConfig()), **have["config"]}
        if have != want:
            raise ValueError(f"{out} was built with other settings ({have}); use a new directory "
                             "or the same model and ReasonConfig to resume")
        return
    atomic_write_text(path, json.dumps(want, indent=1))


def build_dataset(model, tokenizer, problems: list[Problem], out_dir: str | Path, *,
                  config: ReasonConfig | None = None, model_name: str = "", batch_size: int = 8,
                  on_problem: Callable[[Problem, dict[str, Any]], None] | None = None) -> list[str]:
    """Label the cue events of ``problems`` into ``out_dir``; problems already there are skipped.

    The chains decode ``batch_size`` at a time (``iter_reason``); when one ends, the answers of all
    its cue events are forced in batches from its own cached prefixes, and its file is written.

    Args:
        model, tokenizer: the HF causal LM and its tokenizer.
        problems: problems with checkers (``Problem.check``).
        out_dir: one ``<uid>.npz`` per problem plus ``manifest.json`` (settings must match to resume).
        config: cue, forcing and feature settings (the same must be used online).
        model_name: recorded in the manifest, checked on resume.
        batch_size: chains decoded together.
        on_problem: called after each newly built problem with its trace (for progress logs).

    Returns:
        The uids of all problems now on disk, in the order of ``problems``.
    """
    config = config or ReasonConfig()
    if config.do_sample:
        raise ValueError("event labels come from greedy chains: build the dataset with do_sample=False")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, config, model_name)
    if len({p.uid for p in problems}) != len(problems):
        raise ValueError("problem uids must be unique: they name the files of the dataset")
    todo = [p for p in problems if not (out / f"{p.uid}.npz").exists()]
    for i, res in iter_reason(model, tokenizer, todo, config=config, batch_size=batch_size, label_events=True):
        p = todo[i]
        for ev in res.events:
            ev["correct"] = bool(p.check(ev["answer"]))
        trace = res.to_dict()
        trace.update(uid=p.uid, gold=p.answer, source=p.source)
        feats = (res.features.numpy().astype(np.float32) if res.features is not None
                 else np.zeros((0, 0), np.float32))
        labels = np.array([int(e["correct"]) for e in res.events], dtype=np.int64)
        _atomic_savez(out / f"{p.uid}.npz", features=feats, labels=labels, trace=np.array(json.dumps(trace)))
        if on_problem is not None:
            on_problem(p, trace)
    return [p.uid for p in problems if (out / f"{p.uid}.npz").exists()]


def load_dataset(out_dir: str | Path, uids: list[str] | None = None) -> EventDataset:
    """Load the events of ``uids`` (default: every problem in ``out_dir``, sorted by uid)."""
    out = Path(out_dir)
    if uids is None:
        uids = sorted(p.stem for p in out.glob("*.npz"))
    if not uids:
        raise ValueError(f"no labelled problems in {out}: build them with `offramp reason build --out {out}` "
                         "(or build_dataset) first")
    feats, labels, groups, traces = [], [], [], []
    for g, uid in enumerate(uids):
        path = out / f"{uid}.npz"
        if not path.exists():
            raise ValueError(f"{path} is missing: build it with `offramp reason build` (or build_dataset) "
                             f"or drop {uid!r}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if z["labels"].size:
                    feats.append(z["features"].astype(np.float32))
                    labels.append(z["labels"])
                    groups.append(np.full(z["labels"].size, g, dtype=np.int64))
                traces.append(json.loads(str(z["trace"])))
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable event file ({type(e).__name__}: {e}; pickled objects are "
                             f"refused): delete it and run the build again to relabel {uid!r}") from None
    if not feats:
        raise ValueError(f"the problems in {out} have no cue events: change the CueConfig")
    return EventDataset(np.concatenate(feats), np.concatenate(labels), np.concatenate(groups), uids, traces)


def replay_events(policy: Any, data: EventDataset) -> np.ndarray:
    """(problems,) the event index where ``policy`` stops each chain (-1: it never does), calling the
    same ``decide`` the online engine calls, in the same order: each chain's state started once and
    its events decided in order until the first exit (in a batch, each chain has its own state)."""
    import torch

    policy = make_policy(policy)
    require_signals(policy, set(SIGNALS), "stored cue events")
    out = np.full(len(data.uids), -1, dtype=np.int64)
    for g, trace in enumerate(data.traces):
        feats = data.features[data.groups == g]
        state = policy.start(1, 0)
        for k, ev in enumerate(trace["events"]):
            stored = ForcedAnswer(ev.get("answer") or "", (), float(ev["mean_prob"]), bool(ev["complete"]))
            signals = event_signals(policy, ev["fork"], torch.as_tensor(feats[k]), lambda a=stored: a, {})
            accept, state = policy.decide(ev["index"], signals, state)
            if bool(accept[0]):
                out[g] = k
                break
    return out


def oracle_ceiling(traces: list[dict[str, Any]]) -> dict[str, Any]:
    """What stopping at the best cue could save on labelled chains (``EventDataset.traces``).

    Two oracles read the forced answers of every cue event:

    * ``oracle_right`` stops at the first cue whose forced answer is right (its accuracy is at least
      the full chain's: it may also rescue a chain whose end is wrong);
    * ``oracle_same`` stops at the first cue whose forced answer equals the full chain's answer (its
      accuracy is exactly the full chain's).

    A chain with no such cue runs to its end. A stop costs the tokens before the cue plus the forced
    answer. Returned per source (task) and over all: accuracy, mean tokens and ``tokens_saved``
    (1 - oracle tokens / full-chain tokens), so an exit rule's saving reads as "x of y possible".
    """
    if not traces:
        raise ValueError("no labelled chains: build them with `offramp reason build` first")
    rows: dict[str, list[tuple[bool, int, bool, int, bool, int]]] = {}
    for t in traces:
        full_tokens, full_right = int(t["tokens"]), bool(t["correct"])
        right = next((e for e in t["events"] if e["correct"]), None)
        same = (next((e for e in t["events"] if same_answer(e.get("answer"), t["answer"])), None)
                if t.get("answer") else None)

        def stop(e, when_none: bool) -> tuple[bool, int]:
            return (when_none, full_tokens) if e is None else \
                (bool(e["correct"]), int(e["fork"]) + int(e.get("answer_tokens", 0)))

        rows.setdefault(str(t.get("source", "")), []).append(
            (full_right, full_tokens, *stop(right, full_right), *stop(same, full_right)))

    def summary(rs: list[tuple]) -> dict[str, Any]:
        a = np.array(rs, dtype=np.float64)
        full = {"accuracy": float(a[:, 0].mean()), "tokens": float(a[:, 1].mean())}
        out = {"n": len(rs), "full": full}
        for name, col in (("oracle_right", 2), ("oracle_same", 4)):
            tokens = float(a[:, col + 1].mean())
            out[name] = {"accuracy": float(a[:, col].mean()), "tokens": tokens,
                         "tokens_saved": 1.0 - tokens / full["tokens"] if full["tokens"] else 0.0}
        return out

    every = [r for rs in rows.values() for r in rs]
    return {**summary(every), "by_source": {src: summary(rs) for src, rs in sorted(rows.items())}}


def same_answer(a: str | None, b: str | None) -> bool:
    """Equal as numbers, else as whitespace- and case-normalised text."""
    if a is None or b is None:
        return False
    return numbers_equal(a, b) or " ".join(a.lower().split()) == " ".join(b.lower().split())
