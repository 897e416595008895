"""benchmarks/reasoning.py's ceiling-report: the hindsight frontier of a per-chain score and the
forced-answer signals, on hand-built chains whose best stop is known."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from paths import ROOT

from offramp.evaluation.events import EventDataset


def _bench():
    path = ROOT / "benchmarks" / "reasoning.py"
    spec = importlib.util.spec_from_file_location("reasoning_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _chain(answers, final, right, tokens=100, probs=None):
    evs = [{"fork": 10 * (i + 1), "answer": a, "correct": float(a) == float(right), "answer_tokens": 0,
            "mean_prob": (probs or [0.5] * len(answers))[i]} for i, a in enumerate(answers)]
    return {"source": "gsm8k", "events": evs, "answer": final, "correct": final == right, "tokens": tokens}


def _data(traces):
    n = sum(len(t["events"]) for t in traces)
    groups = np.concatenate([np.full(len(t["events"]), g) for g, t in enumerate(traces)]).astype(np.int64)
    return EventDataset(np.zeros((n, 2), np.float32), np.zeros(n, np.int64), groups,
                        [str(g) for g in range(len(traces))], traces)


def test_hindsight_frontier_takes_the_best_threshold_within_the_margin():
    bench = _bench()
    # chain 0: right from its 2nd cue on; chain 1: right only at the end (full chain right)
    data = _data([_chain(["1", "5", "5"], "5", "5"), _chain(["2", "2", "3"], "7", "7")])
    # a score that ranks chain 0's 2nd cue above every cue of chain 1
    p1 = np.array([0.1, 0.9, 0.9, 0.2, 0.3, 0.4])
    out = bench.hindsight_frontier(data, p1, margin=0.0)["gsm8k"]
    best = out["accuracy_within_margin"]
    assert best["accuracy"] == 1.0 and best["premature_exit_rate"] == 0.0
    assert best["tokens_saved"] == pytest.approx(1 - (20 + 100) / 200)
    # a margin of one chain lets it stop chain 1 at its first cue too (wrong, premature)
    loose = bench.hindsight_frontier(data, p1, margin=0.5, premature=(0.0,))["gsm8k"]
    assert loose["accuracy_within_margin"]["tokens_saved"] == pytest.approx(1 - (20 + 10) / 200)
    assert loose["accuracy_within_margin"]["premature_exit_rate"] == 0.5
    assert loose["and_premature_le_0.0"]["tokens_saved"] == pytest.approx(best["tokens_saved"])


def test_answer_signals_count_agreeing_cues_and_read_deer_confidence():
    bench = _bench()
    # chain 0's forced answer settles at its 2nd cue and agrees twice by its 3rd: stopping once two
    # agree saves 70 tokens; chain 1's early answers agree but are wrong
    data = _data([_chain(["1", "5", "5.0"], "5", "5", probs=[0.2, 0.9, 0.95]),
                  _chain(["2", "3", "4"], "4", "4", probs=[0.99, 0.1, 0.1])])
    out = bench.answer_signals(data)
    agree = out["answer_agreement"]["gsm8k"]["accuracy_within_margin"]
    assert agree["accuracy"] == 1.0
    assert agree["tokens_saved"] == pytest.approx(1 - (30 + 100) / 200)  # "5" and "5.0" agree as numbers
    conf = out["deer_confidence"]["gsm8k"]
    # confidence ranks chain 1's wrong first cue highest: any threshold that stops chain 0 early
    # stops chain 1 wrongly, so within 2 points it saves nothing
    assert conf["accuracy_within_margin"]["tokens_saved"] == 0.0


def test_probe_prompt_other_than_plain_is_refused_for_online_phases_before_any_work(tmp_path, capsys):
    bench = _bench()
    with pytest.raises(SystemExit) as e:
        bench.main(["--phase", "lynx", "--probe-prompt", "check", "--work", str(tmp_path / "w")])
    assert e.value.code == 2
    assert "--probe-prompt check serves --phase build, fit and ceiling-report" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    args = type("A", (), {"work": str(tmp_path), "probe_prompt": "check"})()
    assert bench.training_dir(args) == tmp_path / "events-check"
    assert bench.training_dir(args, "plain") == tmp_path / "events"
    assert bench.probe_path(args, "lynx_chain", 0.1) == tmp_path / "check-probe-chain-delta0.1"
