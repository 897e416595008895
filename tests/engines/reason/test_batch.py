"""Chains of thought in a continuously refilled batch: each chain is what it is alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offramp.data.tasks import Problem
from offramp.engines.reason import ReasonConfig, iter_reason, prompt_ids, reason, reason_batch
from offramp.engines.reason.forcing import force_answer, force_answers, fork_cache
from offramp.engines.reason.rowcache import RowCache
from offramp.evaluation.events import build_dataset, load_dataset
from offramp.policies import ProbeExitPolicy
from reasoning import QUESTIONS, AcceptEvery, always_accepting_probe, tiny_lm, tiny_tokenizer

CFG = ReasonConfig(max_new_tokens=40, feature_layers=(1, -1), max_answer_tokens=5)



@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    model = tiny_lm(len(tok), seed=5)
    with torch.no_grad():  # make EOS likely enough that some chains end on their own
        model.lm_head.weight[1] *= 2.0
    return model, tok


def _same(a, b) -> None:
    for key in ("answer", "correct", "chain", "tokens", "chain_tokens", "answer_tokens", "trial_tokens", "stop",
                "exit_event", "chain_ids"):
        assert getattr(a, key) == getattr(b, key), key
    assert len(a.events) == len(b.events)
    for ea, eb in zip(a.events, b.events):
        assert {k: v for k, v in ea.items() if not isinstance(v, float)} == \
            {k: v for k, v in eb.items() if not isinstance(v, float)}
        for k, v in ea.items():
            if isinstance(v, float):
                assert v == pytest.approx(eb[k], abs=1e-5), k


def _problems():
    return [Problem(f"q{i}", q, "5", "test") for i, q in enumerate(QUESTIONS)]


@pytest.mark.parametrize("policy", ["never", {"type": "static", "layer": 12}, {"type": "deer", "threshold": 0.2},
                                    AcceptEvery(), "probe"])
def test_each_chain_in_the_batch_is_the_chain_alone(lm, policy):
    model, tok = lm
    if policy == "probe":
        policy = ProbeExitPolicy(probe=always_accepting_probe(2 * model.config.hidden_size))
    probs = _problems()
    alone = [reason(model, tok, p, policy=policy, config=CFG) for p in probs]
    batched = reason_batch(model, tok, probs, policy=policy, config=CFG, batch_size=3)
    for a, b in zip(alone, batched):
        _same(a, b)
    stops = {r.stop for r in alone}
    if policy == "never":
        assert stops == {"eos", "budget"}  # ragged finishes: rows leave and the queue refills the batch
    elif isinstance(policy, dict) and policy["type"] == "deer":  # this random model's trials never close
        assert all(r.trial_tokens > 0 for r in alone if r.events)  # trial answers forced in batches
    else:
        assert "cue" in stops


def test_rows_leave_and_join_as_chains_end(lm):
    model, tok = lm
    order = [i for i, _ in iter_reason(model, tok, QUESTIONS, config=CFG, batch_size=3)]
    assert sorted(order) == list(range(len(QUESTIONS)))
    assert order != list(range(len(QUESTIONS)))  # a short chain finished before one that started earlier


def test_sampled_chains_are_the_same_in_any_batch(lm):
    model, tok = lm
    cfg = ReasonConfig(**{**CFG.__dict__, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "seed": 7})
    alone = [reason(model, tok, q, config=cfg) for q in QUESTIONS]
    batched = reason_batch(model, tok, QUESTIONS, config=cfg, batch_size=4)
    for a, b in zip(alone, batched):
        _same(a, b)
    greedy = reason_batch(model, tok, QUESTIONS, config=CFG, batch_size=4)
    other = reason_batch(model, tok, QUESTIONS, config=ReasonConfig(**{**cfg.__dict__, "seed": 8}), batch_size=4)
    assert [r.chain_ids for r in alone] != [r.chain_ids for r in greedy]
    assert [r.chain_ids for r in alone] != [r.chain_ids for r in other]


def test_forced_answers_in_one_batch_equal_each_alone(lm):
    model, tok = lm
    full = reason(model, tok, QUESTIONS[0], config=ReasonConfig(max_new_tokens=30, max_answer_tokens=6))
    prompt = prompt_ids(tok, QUESTIONS[0])
    ids = prompt + full.chain_ids
    rows = RowCache.empty_like(model)
    with torch.no_grad():
        rows.step(model, torch.tensor([ids]))
    lengths = [len(prompt) + 3, len(ids), len(prompt) + 11, len(prompt) + 3]
    texts = [tok.encode(t, add_special_tokens=False) for t in
             (" so the answer is \\boxed{", "\\boxed{", " the final answer is \\boxed{", "\\boxed{")]
    kw = dict(boxed=True, decode=tok.decode, eos_ids={1}, max_answer_tokens=6)
    together = force_answers(model, rows.fork(model, [0] * 4, lengths), texts, **kw)
    for n, t, got in zip(lengths, texts, together):
        single = force_answer(model, fork_cache(rows.cache, n), t, **kw)
        assert got.token_ids == single.token_ids and got.text == single.text and got.complete == single.complete
        assert got.mean_prob == pytest.approx(single.mean_prob, abs=1e-5)
    assert int(rows.pos[0]) == len(ids)  # forks leave the running cache as it was
    with pytest.raises(ValueError, match="outside row 0's cached prefix"):
        rows.fork(model, [0], [len(ids) + 1])


def test_batched_labelling_equals_one_chain_at_a_time(lm, tmp_path):
    model, tok = lm
    probs = _problems()
    build_dataset(model, tok, probs, tmp_path / "one", config=CFG, batch_size=1)
    build_dataset(model, tok, probs, tmp_path / "four", config=CFG, batch_size=4)
    a, b = load_dataset(tmp_path / "one"), load_dataset(tmp_path / "four")
    assert a.labels.tolist() == b.labels.tolist() and a.groups.tolist() == b.groups.tolist()
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    for ta, tb in zip(a.traces, b.traces):
        assert [e["answer"] for e in ta["events"]] == [e["answer"] for e in tb["events"]]
        assert ta["chain_ids"] == tb["chain_ids"]
    with pytest.raises(ValueError, match="greedy"):
        build_dataset(model, tok, probs, tmp_path / "s", config=ReasonConfig(do_sample=True))


def test_models_that_cannot_be_batched_are_refused():
    from decoder_models import tiny_decoder

    model = tiny_decoder("gemma3")
    with pytest.raises(ValueError, match="full attention"):
        RowCache.empty_like(model).step(model, torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="batch_size"):
        reason_batch(model, tiny_tokenizer(), ["two"], batch_size=0)
    with pytest.raises(ValueError, match="problem 1 is a int"):
        reason_batch(model, tiny_tokenizer(), ["two", 3])


@pytest.mark.parametrize("policy", ["never", {"type": "deer", "threshold": 0.5}, "lynx"])
def test_chains_joining_a_running_batch_are_what_they_are_alone(lm, policy):
    """A server's continuous batching: questions added while others reason, each joining at the next step."""
    from offramp.engines.reason import ReasonBatch

    model, tok = lm
    if policy == "lynx":
        policy = ProbeExitPolicy(probe=always_accepting_probe(2 * model.config.hidden_size))
    batch = ReasonBatch(model, tok, policy=policy, config=CFG, batch_size=3)
    arrivals = {0: [0, 1], 3: [2], 5: [3, 4], 9: [5, 6]}  # step -> questions added then
    got, step, most = {}, 0, 0
    while len(got) < len(QUESTIONS):
        for q in arrivals.get(step, []):
            batch.add(f"q{q}", QUESTIONS[q])
        most = max(most, len(batch.engine.chains))
        for key, res in batch.step():
            got[key] = res
        step += 1
        assert step < 500
    assert most == 3 and len(batch) == 0  # chains shared steps, at most batch_size at once
    for q, question in enumerate(QUESTIONS):
        _same(got[f"q{q}"], reason(model, tok, question, policy=policy, config=CFG))
