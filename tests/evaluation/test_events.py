"""The event dataset builder: files per problem, labels from forced exits, resume after a crash."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offramp.data.tasks import Problem
from offramp.engines.reason import ReasonConfig
from offramp.evaluation.events import build_dataset, load_dataset
from reasoning import tiny_lm, tiny_tokenizer

CFG = ReasonConfig(max_new_tokens=24, feature_layers=(1, -1), max_answer_tokens=3)
QUESTIONS = ["add two and three", "add three and two", "Solve it"]


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    return tiny_lm(len(tok), seed=0), tok


def _problems(answer: str = "wait so") -> list[Problem]:
    return [Problem(f"p{i}", q, answer, "test") for i, q in enumerate(QUESTIONS)]


def test_build_load_and_resume_after_a_crash(lm, tmp_path):
    model, tok = lm
    probs = _problems()
    built = []

    def crash_after_two(p, trace):
        built.append(p.uid)
        if len(built) == 2:
            raise KeyboardInterrupt  # the build dies after writing the second problem

    with pytest.raises(KeyboardInterrupt):
        build_dataset(model, tok, probs, tmp_path, config=CFG, model_name="tiny", on_problem=crash_after_two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "p0.npz", "p1.npz"]
    before = {p: (tmp_path / f"{p}.npz").read_bytes() for p in ("p0", "p1")}
    built.clear()
    uids = build_dataset(model, tok, probs, tmp_path, config=CFG, model_name="tiny",
                         on_problem=lambda p, t: built.append(p.uid))
    assert built == ["p2"] and uids == ["p0", "p1", "p2"]  # only the missing one ran
    assert all((tmp_path / f"{p}.npz").read_bytes() == b for p, b in before.items())
    assert not list(tmp_path.glob("*.tmp"))

    data = load_dataset(tmp_path)
    n = sum(len(t["events"]) for t in data.traces)
    assert data.features.shape == (n, 2 * model.config.hidden_size) and n > 0
    assert set(np.unique(data.labels)) <= {0, 1}
    assert data.labels.tolist() == [int(e["correct"]) for t in data.traces for e in t["events"]]
    assert np.bincount(data.groups, minlength=3).tolist() == [len(t["events"]) for t in data.traces]
    sub = data.subset([1, 2])
    assert sub.uids == ["p1", "p2"] and set(sub.groups.tolist()) <= {0, 1}


def test_labels_come_from_the_checker(lm, tmp_path):
    model, tok = lm
    wrong = build_dataset(model, tok, [Problem("p0", QUESTIONS[0], "no such answer", "test")],
                          tmp_path / "b", config=CFG)
    b = load_dataset(tmp_path / "b", wrong)
    answers = [e["answer"] for e in b.traces[0]["events"]]
    gold = answers[0]  # a checker that accepts the first forced answer
    right = build_dataset(model, tok, [Problem("p0", QUESTIONS[0], gold, "test")], tmp_path / "a", config=CFG)
    a = load_dataset(tmp_path / "a", right)
    assert a.labels.tolist() == [int(x.strip().lower() == gold.strip().lower()) for x in answers]
    assert a.labels.sum() > 0 and b.labels.sum() == 0 and np.allclose(a.features, b.features)


def test_resume_with_other_settings_is_refused(lm, tmp_path):
    model, tok = lm
    build_dataset(model, tok, _problems()[:1], tmp_path, config=CFG, model_name="tiny")
    other = ReasonConfig(max_new_tokens=24, feature_layers=(-1,), max_answer_tokens=4)
    with pytest.raises(ValueError, match="other settings"):
        build_dataset(model, tok, _problems()[:2], tmp_path, config=other, model_name="tiny")
    assert json.loads((tmp_path / "manifest.json").read_text())["config"]["feature_layers"] == [1, -1]
    with pytest.raises(ValueError, match="unique"):
        build_dataset(model, tok, _problems()[:1] * 2, tmp_path, config=CFG, model_name="tiny")
    with pytest.raises(ValueError, match="no labelled problems"):
        load_dataset(tmp_path / "empty")


def test_replay_over_stored_events_equals_the_online_engine(lm, tmp_path):
    """Every reasoning rule is an exit policy over cue events: the same decide runs online and over
    the stored event trace, and stops each chain at the same event."""
    from offramp.calibration.lynx import LynxProbe
    from offramp.engines.reason import reason
    from offramp.evaluation.events import replay_events

    model, tok = lm
    probs = _problems()
    build_dataset(model, tok, probs, tmp_path, config=CFG, model_name="tiny")
    data = load_dataset(tmp_path)
    probs_p = [e["mean_prob"] for t in data.traces for e in t["events"] if e["complete"]]
    forks = sorted(e["fork"] for t in data.traces for e in t["events"])
    y = np.arange(len(data.labels)) % 2  # any labels: the probe is only a function of the features here
    # calibrated on other (perturbed) features: on the events themselves a quantile would be one of
    # their own scores, a tie that the last bit of a batched matrix product decides
    noisy = data.features + 0.01 * np.random.default_rng(0).standard_normal(data.features.shape).astype(np.float32)
    probe = LynxProbe(epochs=30).fit(data.features, y).calibrate(noisy, y, delta=0.3)
    scores = 1 - probe.predict_proba(data.features)
    gaps = np.abs(scores - probe.conformal_.quantiles_[None, :])  # (class c is in the set where 1 - p_c <= q_c)
    assert gaps.min() > 1e-4, "a stored event's score sits on a quantile: the comparison would be a tie"
    ps = sorted(probs_p)  # DEER's threshold halfway between two events' probabilities (no tie either)
    deer_threshold = (ps[len(ps) // 2 - 1] + ps[len(ps) // 2]) / 2 if len(ps) > 1 else 0.5
    specs = [{"type": "never"}, {"type": "static", "layer": forks[len(forks) // 2]},
             {"type": "deer", "threshold": deer_threshold},
             {"type": "probe", "probe": probe}]
    stopped = set()
    for spec in specs:
        offline = replay_events(spec, data)
        for i, p in enumerate(probs):
            online = reason(model, tok, p, policy=dict(spec), config=CFG)
            assert (online.exit_event if online.exit_event is not None else -1) == offline[i], (spec["type"], p.uid)
            stopped.add((spec["type"], online.exit_event is not None))
    assert {("static", True), ("never", False), ("probe", True), ("probe", False)} <= stopped
    with pytest.raises(ValueError, match="needs logits"):
        replay_events({"type": "entropy"}, data)


def _trace(source, tokens, correct, answer, events):
    return {"source": source, "tokens": tokens, "correct": correct, "answer": answer,
            "events": [{"fork": f, "answer_tokens": 2, "correct": c, "answer": a} for f, c, a in events]}


def test_oracle_ceiling_counts_the_first_useful_cue():
    from offramp.evaluation.events import oracle_ceiling

    traces = [
        _trace("math", 100, True, "5", [(10, False, "4"), (30, True, "5.0"), (60, True, "5")]),  # both stop at 30
        _trace("math", 100, False, "7", [(20, True, "6"), (40, False, "7")]),  # right: 20 (rescued); same: 40
        _trace("logic", 50, True, "Yes", [(10, False, "no"), (20, True, "yes ")]),  # same (as text) and right at 20
        _trace("logic", 50, True, "yes", []),  # no cue: full chain
    ]
    out = oracle_ceiling(traces)
    assert out["n"] == 4 and out["full"] == {"accuracy": 0.75, "tokens": 75.0}
    right, same = out["oracle_right"], out["oracle_same"]
    assert right["tokens"] == pytest.approx((32 + 22 + 22 + 50) / 4) and right["accuracy"] == 1.0
    assert same["tokens"] == pytest.approx((32 + 42 + 22 + 50) / 4) and same["accuracy"] == 0.75
    assert same["tokens_saved"] == pytest.approx(1 - same["tokens"] / 75.0)
    assert out["by_source"]["logic"]["oracle_same"]["tokens"] == pytest.approx(36.0)
    assert out["by_source"]["math"]["oracle_right"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="no labelled chains"):
        oracle_ceiling([])


def test_ceiling_of_built_chains_never_costs_more_than_the_full_chain(lm, tmp_path):
    from offramp.evaluation.events import oracle_ceiling

    model, tok = lm
    build_dataset(model, tok, _problems(), tmp_path, config=CFG, model_name="tiny")
    data = load_dataset(tmp_path)
    assert all("answer_tokens" in e for t in data.traces for e in t["events"])
    out = oracle_ceiling(data.traces)
    assert out["oracle_same"]["accuracy"] == out["full"]["accuracy"]
    assert out["oracle_right"]["accuracy"] >= out["full"]["accuracy"]
    assert 0.0 <= out["oracle_same"]["tokens_saved"] <= 1.0


def test_reason_config_round_trips_through_its_stored_dict():
    from offramp.engines.reason import ReasonConfig
    from offramp.engines.reason.cues import CueConfig
    from offramp.evaluation.events import _config_dict

    cfg = ReasonConfig(cues=CueConfig(words=("wait", "hmm"), step_boundaries=False), forcing="plain",
                       max_new_tokens=77, feature_layers=(2, -1), prompt_suffix=" go", seed=3)
    assert ReasonConfig.from_dict(_config_dict(cfg)) == cfg
    assert ReasonConfig.from_dict({"max_new_tokens": 9, "unknown_later_key": 1}) == ReasonConfig(max_new_tokens=9)
