"""Continuous batching: prompts that join a running batch at different steps, and leave it when
they end, get exactly the tokens and exit layers of ``generate`` on each prompt alone."""

from __future__ import annotations

import pytest
import torch
from decoder_models import tiny_decoder

from offramp.engines.generate import generate
from offramp.engines.generate.continuous import ContinuousBatch
from offramp.engines.generate.sampling import SamplingOptions
from offramp.modeling import DecoderExitModel

NO_EOS = SamplingOptions(eos_token_id=None, pad_token_id=0)
PROMPTS = [[5, 6, 7], [9], [12, 13, 14, 15, 16, 17, 18], [40, 41], [3, 3, 3, 3], [60, 2, 8, 90, 11]]
ARRIVALS = [0, 0, 2, 3, 3, 7]  # the step at which each prompt is added
LENGTHS = [6, 3, 9, 5, 12, 4]  # each prompt's max_new_tokens


def _exit_model(family: str) -> DecoderExitModel:
    model = DecoderExitModel.from_backbone(tiny_decoder(family), exit_layers=[1, 2])
    torch.manual_seed(5)
    for p in model.heads.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    for p in model.confidence.parameters():
        torch.nn.init.normal_(p, 0.0, 1.0)  # confidences far apart: no decision sits on a rounding edge
    return model.eval()


def _split_policy(model) -> dict:
    """token_confidence at the midpoint of the widest gap between the confidences the prompts see
    alone (among the middle ones): rows exit at different layers, and every decision is far from the
    threshold, so it cannot depend on float rounding in a padded batch."""
    seen: list[float] = []
    real = model.confidence_logit

    def spy(e, feats):
        out = real(e, feats)
        seen.extend(torch.sigmoid(out).flatten().tolist())
        return out

    model.confidence_logit = spy
    for prompt, n in zip(PROMPTS, LENGTHS):
        _alone(model, prompt, n, {"type": "token_confidence", "threshold": 0.5}, "catch_up")
    del model.confidence_logit
    values = sorted(seen)[len(seen) // 10: -(len(seen) // 10)]
    gap, i = max((b - a, i) for i, (a, b) in enumerate(zip(values, values[1:])))
    assert gap > 1e-4  # float differences in a padded batch are ~1e-6
    return {"type": "token_confidence", "threshold": (values[i] + values[i + 1]) / 2}


def _alone(model, prompt, n, policy, strategy, sampling=NO_EOS):
    ids = torch.tensor([prompt])
    out = generate(model, ids, torch.ones_like(ids), policy=policy, cache_strategy=strategy, max_new_tokens=n,
                   sampling=sampling)
    keep = out.exit_layers[0] > 0
    return out.new_tokens[0][keep].tolist(), out.exit_layers[0][keep].tolist()


def _continuous(model, policy, strategy, sampling=NO_EOS, max_rows=32, per_row=None, static=False):
    batch = ContinuousBatch(model, policy=policy, cache_strategy=strategy, sampling=sampling, max_rows=max_rows,
                            static=static)
    got: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in range(len(PROMPTS))}
    step, finished, most = 0, set(), 0
    while len(finished) < len(PROMPTS):
        for i, at in enumerate(ARRIVALS):
            if at == step:
                batch.add(i, PROMPTS[i], LENGTHS[i], sampling=(per_row or {}).get(i))
        for t in batch.step():
            assert t.index == len(got[t.key][0])
            got[t.key][0].append(t.token)
            got[t.key][1].append(t.exit_layer)
            if t.finished:
                finished.add(t.key)
        most = max(most, batch.report()["running"])
        step += 1
    assert len(batch) == 0 and batch.run is None
    return got, most


@pytest.mark.parametrize("family, strategy", [("llama", "catch_up"), ("llama", "copy_kv"), ("llama", "propagate"),
                                              ("qwen3", "catch_up"), ("gemma3", "catch_up"), ("gpt2", "catch_up"),
                                              ("mamba", "catch_up"), ("mamba", "freeze"), ("mamba", "update")])
def test_rows_joining_and_leaving_get_the_tokens_they_get_alone(family, strategy):
    model = _exit_model(family)
    policy = _split_policy(model)
    got, most = _continuous(model, policy, strategy)
    assert most >= 3  # rows really shared steps
    layers_seen = set()
    for i, prompt in enumerate(PROMPTS):
        tokens, layers = _alone(model, prompt, LENGTHS[i], policy, strategy)
        assert got[i] == (tokens, layers), (i, got[i], (tokens, layers))
        layers_seen |= set(layers[1:])
    assert len(layers_seen) > 1  # rows exited at different layers


def test_plain_model_and_never_policy_equal_greedy_decoding():
    model = tiny_decoder("llama")
    got, _ = _continuous(model, None, None)
    for i, prompt in enumerate(PROMPTS):
        assert got[i][0] == _alone(model, prompt, LENGTHS[i], None, None)[0]


def test_a_row_stops_at_its_own_eos_and_sampled_rows_follow_their_own_seed():
    model = _exit_model("llama")
    policy = _split_policy(model)
    eos = _alone(model, PROMPTS[2], LENGTHS[2], policy, "catch_up")[0][2]  # the third token of prompt 2 ends it
    greedy = SamplingOptions(eos_token_id=eos, pad_token_id=0)
    sampled = {i: SamplingOptions(do_sample=True, temperature=0.8, top_p=0.9, seed=100 + i, eos_token_id=eos,
                                  pad_token_id=0) for i in (1, 4)}
    got, _ = _continuous(model, policy, "catch_up", sampling=greedy, per_row=sampled)
    for i, prompt in enumerate(PROMPTS):
        alone = _alone(model, prompt, LENGTHS[i], policy, "catch_up", sampled.get(i, greedy))
        assert got[i] == alone, i
    assert got[2][0][-1] == eos and len(got[2][0]) == 3


def test_max_rows_queues_the_rest_and_cancel_drops_a_row():
    model = _exit_model("llama")
    got, most = _continuous(model, "never", "catch_up", max_rows=2)
    assert most == 2
    for i, prompt in enumerate(PROMPTS):
        assert got[i][0] == _alone(model, prompt, LENGTHS[i], "never", "catch_up")[0]
    static, _ = _continuous(model, "never", "catch_up", static=True)  # a batch runs until its last row ends
    assert static == got
    batch = ContinuousBatch(model, policy="never", sampling=NO_EOS)
    batch.add("a", PROMPTS[0], 5)
    batch.add("b", PROMPTS[2], 5)
    batch.step()
    assert batch.cancel("a") and not batch.cancel("zz")
    rest = [t.token for _ in range(4) for t in batch.step()]
    assert rest == _alone(model, PROMPTS[2], 5, "never", None)[0][1:]


def test_a_prompt_past_the_positions_is_refused_when_added():
    model = _exit_model("llama")  # 128 positions
    batch = ContinuousBatch(model, policy="never")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        batch.add(0, list(range(5, 100)), 40)
    assert len(batch) == 0


@pytest.mark.parametrize("family, draft_confidence", [("llama", None), ("llama", 0.3), ("gemma3", None),
                                                      ("mamba", None)])
def test_self_speculation_with_rows_joining_gives_greedy_decoding_alone(family, draft_confidence):
    from offramp.engines.generate.continuous import ContinuousSpeculation

    # drafts from the tied head after 3 of 4 layers: close enough to the full model to be accepted often
    model = DecoderExitModel.from_backbone(tiny_decoder(family), exit_layers=[3], head="tied").eval()
    batch = ContinuousSpeculation(model, exit_layer=3, draft_tokens=3, draft_confidence=draft_confidence,
                                  sampling=NO_EOS)
    got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    step, finished, most = 0, set(), 0
    while len(finished) < len(PROMPTS):
        for i, at in enumerate(ARRIVALS):
            if at == step:
                batch.add(i, PROMPTS[i], LENGTHS[i])
        tokens = batch.step()
        for t in tokens:
            assert t.index == len(got[t.key])
            got[t.key].append(t.token)
            if t.finished:
                finished.add(t.key)
        most = max(most, len({t.key for t in tokens}))
        step += 1
        assert step < 200
    assert most >= 3 and batch.spec is None  # rows shared rounds
    assert batch.report()["acceptance"] > 0  # drafts were accepted: rounds gave several tokens
    for i, prompt in enumerate(PROMPTS):
        assert got[i] == _alone(model, prompt, LENGTHS[i], "never", None)[0], i


@pytest.mark.parametrize("family, draft_tokens", [("llama", 0), ("llama", 2), ("gemma3", 0), ("mamba", 2)])
def test_served_speculation_with_ngram_drafts_gives_greedy_decoding_alone(family, draft_tokens):
    from offramp.engines.generate.continuous import ContinuousSpeculation

    model = DecoderExitModel.from_backbone(tiny_decoder(family), exit_layers=[2], head="tied").eval()
    batch = ContinuousSpeculation(model, exit_layer=2, draft_tokens=draft_tokens, ngram_tokens=3, sampling=NO_EOS)
    repeated = [p * 3 for p in PROMPTS]  # prompts that repeat themselves: their continuations have matches
    got: dict[int, list[int]] = {i: [] for i in range(len(repeated))}
    step, finished = 0, set()
    while len(finished) < len(repeated):
        for i, at in enumerate(ARRIVALS):
            if at == step:
                batch.add(i, repeated[i], LENGTHS[i])
        for t in batch.step():
            assert t.index == len(got[t.key])
            got[t.key].append(t.token)
            if t.finished:
                finished.add(t.key)
        step += 1
        assert step < 200
    assert batch.report()["ngram_rounds"] > 0  # some rounds drafted from n-gram matches
    for i, prompt in enumerate(repeated):
        assert got[i] == _alone(model, prompt, LENGTHS[i], "never", None)[0], i
    with pytest.raises(ValueError, match="n-gram matches only"):
        ContinuousSpeculation(model, draft_tokens=0, sampling=NO_EOS)
