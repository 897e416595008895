"""The online reasoning engine on a tiny random Llama: forks, forced answers, exits, baselines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from offramp.data.tasks import Problem
from offramp.engines.reason import ReasonConfig, prompt_ids, reason
from offramp.engines.reason.forcing import ForcedAnswer, answer_end, force_answer, fork_cache, reencoded_answer
from offramp.policies import DeerPolicy, ExitPolicy, ProbeExitPolicy
from reasoning import always_accepting_probe, tiny_lm, tiny_tokenizer

CFG = ReasonConfig(max_new_tokens=60, feature_layers=(1, -1), max_answer_tokens=6)
QUESTION = "add two and three"


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    return tiny_lm(len(tok), seed=0), tok


@pytest.fixture(scope="module")
def full(lm):
    model, tok = lm
    return reason(model, tok, QUESTION, config=CFG)


def test_full_chain_matches_hf_greedy_generate(lm, full):
    model, tok = lm
    ids = torch.tensor([prompt_ids(tok, QUESTION)])
    out = model.generate(ids, max_new_tokens=CFG.max_new_tokens, do_sample=False, eos_token_id=1,
                         pad_token_id=0)
    assert full.chain == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert full.stop == "budget" and full.chain_tokens == CFG.max_new_tokens
    assert full.exit_event is None and len(full.events) >= 3


def test_fork_from_cache_equals_reencoded_prefix(lm, full):
    model, tok = lm
    prompt = prompt_ids(tok, QUESTION)
    gen = full.chain_ids
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt + gen]), cache=cache, use_cache=True)
    forcing = tok.encode(" so the final answer is \\boxed{", add_special_tokens=False)
    kw = dict(boxed=True, decode=tok.decode, eos_ids={1}, max_answer_tokens=6)
    for ev in full.events:
        n = len(prompt) + ev.get("fork")
        forked = fork_cache(cache, n)
        assert forked.get_seq_length() == n
        a = force_answer(model, forked, forcing, **kw)
        b = reencoded_answer(model, prompt + gen[: ev["fork"]], forcing, **kw)
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.mean_prob == pytest.approx(b.mean_prob, abs=1e-4)
    assert cache.get_seq_length() == len(prompt) + len(gen)  # forks never touch the original


def test_fork_cache_rejects_bad_length(lm):
    model, tok = lm
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[2, 3, 4]]), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="outside the cached prefix"):
        fork_cache(cache, 4)


@dataclass(frozen=True)
class AcceptAt(ExitPolicy):
    """Accept the cue event with index k."""

    k: int = 0

    def decide(self, index, signals, state):
        return torch.tensor([index == self.k]), state


class Seen:
    """An ``on_event`` hook that forces the answer at event k and keeps it."""

    def __init__(self, k: int):
        self.k, self.answer = k, None

    def __call__(self, ctx):
        if ctx.event.index == self.k:
            self.answer = ctx.force()
        return {}


def test_exit_stops_at_the_accepted_cue(lm, full):
    model, tok = lm
    rule = Seen(1)
    res = reason(model, tok, QUESTION, policy=AcceptAt(1), config=CFG, on_event=rule)
    ev = full.events[1]
    assert res.stop == "cue" and res.exit_event == 1
    assert [e["exit"] for e in res.events] == [False, True]
    assert res.chain_ids == full.chain_ids[: ev["fork"]]
    assert ev["token"] < res.chain_tokens <= ev["token"] + 2  # detection lags at most one token
    assert res.answer == rule.answer.text and res.answer_tokens == len(rule.answer.token_ids)
    assert res.tokens < full.tokens


def test_budget_forces_an_answer(lm):
    model, tok = lm
    cfg = ReasonConfig(max_new_tokens=5, feature_layers=(-1,), max_answer_tokens=4)
    res = reason(model, tok, Problem("p", QUESTION, "5", "test"), config=cfg)
    assert res.stop == "budget" and res.chain_tokens == 5 and 1 <= res.answer_tokens <= 4
    assert res.tokens == 5 + res.answer_tokens and res.correct in (True, False)


def test_deer_threshold_extremes():
    tok = tiny_tokenizer()
    model = tiny_lm(len(tok), seed=5)  # a seed whose first trial answer closes its brace
    never = reason(model, tok, QUESTION, policy=DeerPolicy(1.0), config=CFG)
    assert never.stop == "budget" and len(never.events) >= 2
    assert never.trial_tokens > 0 and never.tokens == never.chain_tokens + never.answer_tokens + never.trial_tokens
    first = [e for e in never.events if e["complete"]][0]
    res = reason(model, tok, QUESTION, policy={"type": "deer", "threshold": first["mean_prob"]}, config=CFG)
    assert res.stop == "cue" and res.exit_event == first["index"] and res.answer == first["trial"]
    with pytest.raises(ValueError, match="DEER threshold"):
        DeerPolicy(1.5)


def test_deer_rule_needs_a_complete_confident_answer():
    from offramp.engines.reason import event_signals

    policy = DeerPolicy(0.9)

    def exits(ans: ForcedAnswer) -> bool:
        signals = event_signals(policy, 3, torch.zeros(4), lambda: ans, {})
        return bool(policy.decide(0, signals, policy.start(1, 0))[0][0])

    assert exits(ForcedAnswer("5", (7,), 0.95, True))
    assert not exits(ForcedAnswer("5", (7,), 0.85, True))
    assert not exits(ForcedAnswer("5", (7,), 0.99, False))  # the brace never closed
    assert not exits(ForcedAnswer("", (), 0.99, True))  # nothing inside the braces


def test_lynx_rule_exits_at_first_event_when_probe_accepts(lm, full):
    model, tok = lm
    probe = always_accepting_probe(2 * model.config.hidden_size)
    res = reason(model, tok, QUESTION, policy=ProbeExitPolicy(probe=probe), config=CFG)
    assert res.stop == "cue" and res.exit_event == 0 and len(res.events) == 1
    assert 0.0 <= res.events[0]["p1"] <= 1.0
    probe.conformal_.quantiles_ = np.array([np.inf, np.inf])  # both classes always: never exit
    res = reason(model, tok, QUESTION, policy=ProbeExitPolicy(probe=probe), config=CFG)
    assert res.stop == "budget" and len(res.events) == len(full.events)


def test_bad_input(lm):
    model, tok = lm
    for spec, what in (({"type": "max_prob"}, "logits"), ({"type": "q_exit"}, "halting")):
        with pytest.raises(ValueError, match=f"needs {what}, which a chain of thought's cue events"):
            reason(model, tok, QUESTION, policy=spec, config=CFG)
    with pytest.raises(ValueError, match="question is empty"):
        reason(model, tok, "  ", config=CFG)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ReasonConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="feature_layers"):
        ReasonConfig(feature_layers=())


def test_answer_end():
    assert answer_end("12}.", boxed=True) == 2
    assert answer_end("\\frac{1}{2}} so", boxed=True) == 11
    assert answer_end("12", boxed=True) is None
    assert answer_end("42.\n", boxed=False) == 2
    assert answer_end("3.5 apples\n", boxed=False) == 10
