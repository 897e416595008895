"""LYNX and DEER as a StoppingCriteria in HF's own generate: the decisions of offramp's engine."""

from __future__ import annotations

import pytest
import torch

from offramp.engines.reason import ReasonConfig, prompt_ids, reason
from offramp.engines.reason.rowcache import left_pad
from offramp.engines.reason.stopping import CueStoppingCriteria
from offramp.policies import ProbeExitPolicy
from reasoning import QUESTIONS, AcceptEvery, always_accepting_probe, tiny_lm, tiny_tokenizer

CFG = ReasonConfig(max_new_tokens=40, feature_layers=(0, 2, -1), max_answer_tokens=5)


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    model = tiny_lm(len(tok), seed=5)
    with torch.no_grad():
        model.lm_head.weight[1] *= 2.0
    return model, tok


def _generate(model, tok, policy, questions, cfg=CFG):
    ids, mask = left_pad([prompt_ids(tok, q) for q in questions])
    stop = CueStoppingCriteria(model, tok, policy, attention_mask=mask, config=cfg)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             stopping_criteria=[stop], return_dict_in_generate=True, eos_token_id=1, pad_token_id=0)
        return stop.results(out)
    finally:
        stop.close()


@pytest.mark.parametrize("policy", ["never", {"type": "static", "layer": 12}, AcceptEvery(), "probe",
                                    {"type": "deer", "threshold": 0.0}])
def test_generate_with_the_criterion_decides_as_the_engine(lm, policy):
    model, tok = lm
    if policy == "probe":
        policy = ProbeExitPolicy(probe=always_accepting_probe(3 * model.config.hidden_size))
    rows = _generate(model, tok, policy, QUESTIONS)
    for q, row in zip(QUESTIONS, rows):
        ref = reason(model, tok, q, policy=policy, config=CFG)
        assert row["stop"] == ref.stop and row["exit_event"] == ref.exit_event
        assert row["chain_ids"] == ref.chain_ids and row["answer"] == ref.answer
        assert row["answer_tokens"] == ref.answer_tokens and row["trial_tokens"] == ref.trial_tokens
        assert ref.chain_tokens <= row["generated"] <= ref.chain_tokens + 1
        assert [{k: v for k, v in e.items() if not isinstance(v, float)} for e in row["events"]] == \
            [{k: v for k, v in e.items() if not isinstance(v, float)} for e in ref.events]
        for e, r in zip(row["events"], ref.events):
            for k, v in e.items():
                if isinstance(v, float):
                    assert v == pytest.approx(r[k], abs=1e-5)
    if isinstance(policy, dict) and policy["type"] == "deer":  # trials forked from generate's live cache
        assert any(r["trial_tokens"] > 0 for r in rows)  # (this random model's trial answers never close)
    elif not isinstance(policy, str):
        assert any(r["stop"] == "cue" for r in rows)


def test_the_criterion_refuses_what_it_cannot_follow(lm):
    model, tok = lm
    ids, mask = left_pad([prompt_ids(tok, q) for q in QUESTIONS[:2]])
    with pytest.raises(ValueError, match="left-padded"):
        CueStoppingCriteria(model, tok, "never", attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="outside hidden_states"):
        CueStoppingCriteria(model, tok, "never", attention_mask=mask, config=ReasonConfig(feature_layers=(9,)))
    with pytest.raises(ValueError, match="needs logits"):
        CueStoppingCriteria(model, tok, {"type": "max_prob"}, attention_mask=mask)
    stop = CueStoppingCriteria(model, tok, "never", attention_mask=mask)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, stopping_criteria=[stop],
                         eos_token_id=1, pad_token_id=0)
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        stop.results(out)
    stop.close()
    assert not model._forward_pre_hooks and not model.model.norm._forward_hooks
