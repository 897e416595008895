"""Self-speculative decoding from a token exit is greedy decoding, token for token: every attention
adapter and Mamba, ragged batches, every draft length, drafts mostly accepted or mostly rejected;
with sampling, its tokens follow the full model's distribution."""

from __future__ import annotations

import pytest
import torch
from decoder_models import ragged_prompts, tiny_decoder

from offramp.engines.generate import generate, plan_speculation
from offramp.engines.generate.sampling import SamplingOptions
from offramp.engines.generate.speculative import frequent_tokens, speculative_generate
from offramp.modeling.decoder import DecoderExitModel

ATTENTION = ["llama", "qwen3", "mistral", "gemma3", "gpt2"]
UPPER = ("o_proj", "down_proj", "c_proj", "out_proj")


def _drafting(family: str, scale: float, head: str = "tied") -> tuple[torch.nn.Module, DecoderExitModel]:
    """A 4-layer model whose layers 3-4 write ``scale`` times their usual output, with an exit at layer
    2: scale 0 makes the exit the full model (every draft accepted), 1 leaves the model as it is."""
    lm = tiny_decoder(family, layers=4)
    with torch.no_grad():
        if family.startswith("mamba"):  # at HF's init a tiny Mamba repeats its last token; noise makes it vary
            g = torch.Generator().manual_seed(3)
            for name, p in lm.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for name, p in lm.named_parameters():
            if any(f".{i}." in name for i in (2, 3)) and any(k in name for k in UPPER) and p.dim() == 2:
                p.mul_(scale)
    return lm, DecoderExitModel.from_backbone(lm, exit_layers=[2], head=head)


@pytest.mark.parametrize("family", ATTENTION + ["mamba", "mamba2"])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_speculation_equals_greedy_ragged_batch(family: str, scale: float) -> None:
    lm, exits = _drafting(family, scale)
    ids, mask = ragged_prompts(3)
    ref = generate(lm, ids, mask, max_new_tokens=12)
    if family.startswith("mamba"):  # the noise did its job: the model does not repeat one token
        assert len(set(ref.new_tokens.flatten().tolist())) > 6
    for d in (1, 3, 5):
        out = speculative_generate(exits, ids, mask, exit_layer=2, draft_tokens=d, max_new_tokens=12)
        assert torch.equal(out.sequences, ref.sequences), (family, scale, d)
        spec = out.extra["speculation"]
        assert 1.0 <= spec["tokens_per_round"] <= d + 1
    if scale == 0.0:  # the exit is the full model: every draft is accepted
        assert spec["acceptance"] == 1.0
    if family.startswith("mamba") and scale == 1.0:  # most drafts rejected: their states were taken back
        assert spec["acceptance"] < 0.5


def test_untrained_exit_is_rejected_and_output_still_greedy() -> None:
    lm, exits = _drafting("llama", 1.0, head="ffn")
    ids, mask = ragged_prompts(3)
    out = speculative_generate(exits, ids, mask, exit_layer=2, draft_tokens=4, max_new_tokens=10)
    assert torch.equal(out.sequences, generate(lm, ids, mask, max_new_tokens=10).sequences)
    assert out.extra["speculation"]["acceptance"] < 0.5


@pytest.mark.parametrize("family", ["llama", "mamba", "mamba2"])
def test_a_row_does_not_depend_on_its_batch_and_eos_stops_it(family: str) -> None:
    lm, exits = _drafting(family, 0.5)
    ids, mask = ragged_prompts(3)
    eos = 49 if family == "llama" else int(generate(lm, ids, mask, max_new_tokens=14).new_tokens[1, 6])
    opts = SamplingOptions(eos_token_id=eos, pad_token_id=0)  # a token this model emits mid-sequence
    ref = generate(lm, ids, mask, max_new_tokens=14, sampling=opts)
    out = speculative_generate(exits, ids, mask, draft_tokens=3, max_new_tokens=14, sampling=opts)
    assert torch.equal(out.sequences, ref.sequences)
    stopped = (out.new_tokens == eos).nonzero()
    assert len(stopped) and bool((out.new_tokens[stopped[0, 0], stopped[0, 1] + 1:] == 0).all())
    for r in range(3):
        keep = mask[r].bool()
        alone = speculative_generate(exits, ids[r:r + 1, keep], None, draft_tokens=3, max_new_tokens=14,
                                     sampling=opts)
        n = alone.new_tokens.shape[1]
        assert torch.equal(alone.new_tokens[0], out.new_tokens[r, :n])


def test_confidence_stops_the_draft_early_and_keeps_the_output() -> None:
    lm, exits = _drafting("qwen3", 0.5)
    ids, mask = ragged_prompts(2)
    ref = generate(lm, ids, mask, max_new_tokens=12)
    always = speculative_generate(exits, ids, mask, draft_tokens=4, max_new_tokens=12)
    never = speculative_generate(exits, ids, mask, draft_tokens=4, draft_confidence=1.0, max_new_tokens=12)
    assert torch.equal(never.sequences, ref.sequences) and torch.equal(always.sequences, ref.sequences)
    # at confidence 1 no draft is ever sure: one draft per round, against four
    assert never.extra["speculation"]["drafted"] < always.extra["speculation"]["drafted"]
    assert never.extra["speculation"]["drafted"] == never.extra["speculation"]["row_rounds"]


def test_bad_settings_are_refused_before_any_work() -> None:
    lm, exits = _drafting("llama", 1.0)
    ids, mask = ragged_prompts(2)
    with pytest.raises(ValueError, match="not one of the model's exits"):
        speculative_generate(exits, ids, mask, exit_layer=3)
    with pytest.raises(ValueError, match="repetition_penalty"):
        speculative_generate(exits, ids, mask, sampling=SamplingOptions(do_sample=True, repetition_penalty=1.2))
    with pytest.raises(ValueError, match="DecoderExitModel"):
        speculative_generate(lm, ids, mask)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_generate(exits, ids, mask, draft_tokens=0)
    stateful = DecoderExitModel.from_backbone(tiny_decoder("mamba"), exit_layers=[2], head="mamba")
    with pytest.raises(ValueError, match="stateful"):
        speculative_generate(stateful, ids, mask)


def test_acceptance_rule_keeps_the_target_distribution() -> None:
    from offramp.engines.generate.sampling import speculative_accept

    g = torch.Generator().manual_seed(0)
    n, v, k = 200_000, 6, 2
    p = torch.softmax(torch.randn(k + 1, v, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(k, v, generator=g) * 2, -1)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(k)], 1)
    tokens, accepted = speculative_accept(drafts, q.expand(n, k, v), p.expand(n, k + 1, v), g)
    first = torch.bincount(tokens[:, 0], minlength=v) / n
    assert (first - p[0]).abs().max() < 0.005  # the first token follows p, not q
    assert (q[0] - p[0]).abs().max() > 0.05  # (which is far from q)
    kept = accepted >= 1
    second = torch.bincount(tokens[kept, 1], minlength=v) / int(kept.sum())
    assert (second - p[1]).abs().max() < 0.01
    expected = torch.minimum(p[0], q[0]).sum()  # P(first draft kept) = sum min(p, q)
    assert abs(float(kept.float().mean()) - float(expected)) < 0.005


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_a_draft_vocabulary_limits_the_drafts_and_keeps_the_output(family: str) -> None:
    lm, exits = _drafting(family, 0.0)  # the exit is the full model: every draft it can make is right
    ids, mask = ragged_prompts(3)
    ref = generate(lm, ids, mask, max_new_tokens=12)
    made = frequent_tokens(list(ref.new_tokens), 1000)  # every token the model emits
    assert set(made.tolist()) == set(ref.new_tokens.flatten().tolist())
    some = made[: len(made) // 2]  # half of them: a draft of the other half is impossible
    for vocab, full in ((made, True), (some, False), (None, True)):
        out = speculative_generate(exits, ids, mask, exit_layer=2, draft_tokens=3, max_new_tokens=12,
                                   draft_vocab=vocab)
        assert torch.equal(out.sequences, ref.sequences), (family, vocab)
        spec = out.extra["speculation"]
        assert (spec["acceptance"] == 1.0) == full, spec
        assert spec["draft_vocab"] == (None if vocab is None else len(vocab))
    plan = plan_speculation(exits, ids, mask, max_new_tokens=12, draft_tokens=(3,), repeats=2, draft_vocab=some)
    assert plan.acceptance[2] < 1.0 and plan.draft_head_s is not None
    rounds = speculative_generate(exits, ids, mask, exit_layer=2, draft_tokens=3, max_new_tokens=12,
                                  draft_vocab=some).extra["speculation"]["row_rounds"]
    assert round((int((ref.exit_layers > 0).sum()) - 3) / rounds, 3) == plan.settings[0]["tokens_per_round"]


def test_frequent_tokens_and_bad_draft_vocabularies() -> None:
    seqs = [torch.tensor([5, 5, 7, 9]), [7, 5, 11]]
    assert frequent_tokens(seqs, 2).tolist() == [5, 7]  # 5 three times, 7 twice
    assert frequent_tokens(seqs, 2, always=[3, 7]).tolist() == [5, 7, 3]
    assert frequent_tokens(seqs, 9).tolist() == [5, 7, 9, 11]  # most frequent first, ties by id
    with pytest.raises(ValueError, match="k must be"):
        frequent_tokens(seqs, 0)
    _, exits = _drafting("llama", 1.0)
    ids, mask = ragged_prompts(2)
    for bad, match in ((torch.tensor([1, 200]), "outside the model's vocabulary"), ([4, 4], "repeats"),
                       (torch.zeros(2, 2, dtype=torch.long), "1-D"), (torch.tensor([1.0, 2.0]), "1-D"), ([], "1-D")):
        with pytest.raises(ValueError, match=match):
            speculative_generate(exits, ids, mask, draft_vocab=bad)


@torch.no_grad()
@pytest.mark.parametrize("family,vocab", [("llama", None), ("llama", 48), ("mamba", None)])
def test_speculative_sampling_follows_the_full_models_distribution(family: str, vocab: int | None) -> None:
    lm, exits = _drafting(family, 1.0)
    lm.lm_head.weight.mul_(40 if family == "llama" else 10)  # peaked: the exit's differ from the full model's
    prompt = torch.tensor([[5, 17, 42, 9]])
    n = 3000 if family == "llama" else 6000  # flatter: more samples for the same noise
    opts = SamplingOptions(do_sample=True, temperature=1.5, seed=0)
    # with a draft vocabulary (its first ``vocab`` ids, q zero elsewhere) the tokens still follow p
    out = speculative_generate(exits, prompt.expand(n, 4), torch.ones(n, 4, dtype=torch.long), exit_layer=2,
                               draft_tokens=3, max_new_tokens=3, sampling=opts,
                               draft_vocab=None if vocab is None else torch.arange(vocab))
    assert out.extra["speculation"]["sampled"] and 0 < out.extra["speculation"]["acceptance"] < 1
    v = lm.config.vocab_size
    # exact marginal of the second token: sum over t1 of p(t1) p(t2 | t1), temperature 1.5
    p1 = torch.softmax(lm(input_ids=prompt).logits[0, -1] / 1.5, -1)
    cand = torch.cat([prompt.expand(v, 4), torch.arange(v)[:, None]], 1)
    p2 = (p1[:, None] * torch.softmax(lm(input_ids=cand).logits[:, -1] / 1.5, -1)).sum(0)
    emp = torch.bincount(out.new_tokens[:, 1], minlength=v).float() / n
    tv = 0.5 * float((emp - p2).abs().sum())
    # the exit's own drafts (what accepting every draft would give) are far from it
    at2 = exits.adapter.hidden_after(lm(input_ids=cand, output_hidden_states=True).hidden_states, 2)
    q2 = (p1[:, None] * torch.softmax(exits.exit_logits(exits.features(0, at2))[:, -1] / 1.5, -1)).sum(0)
    assert tv < 0.08 and 0.5 * float((q2 - p2).abs().sum()) > 0.3  # about 0.04 against 0.5


@pytest.mark.parametrize("family,scale", [("llama", 0.0), ("llama", 0.5), ("llama", 1.0), ("mamba", 0.5)])
def test_plan_replays_the_rounds_speculation_takes(family: str, scale: float) -> None:
    from offramp.engines.generate.plan import RoundCosts, exit_matches, replay_rounds

    lm, _ = _drafting(family, scale)
    exits = DecoderExitModel.from_backbone(lm, exit_layers=[1, 2, 3], head="tied")
    ids, mask = ragged_prompts(3)
    matches, lengths = exit_matches(exits, ids, mask, 12, SamplingOptions.from_model(lm))
    for k in (1, 2, 3):
        for d in (1, 2, 4):
            out = speculative_generate(exits, ids, mask, exit_layer=k, draft_tokens=d, max_new_tokens=12)
            predicted = sum(replay_rounds(m, n, d) for m, n in zip(matches[k], lengths))
            assert out.extra["speculation"]["row_rounds"] == predicted, (k, d)
    # a fixed cost table (a layer on w tokens costs 1 + 0.25 w, the head 2 + w): the prediction is then
    # a function of the exits' acceptance alone, whatever else the machine is doing
    costs = RoundCosts(layer_s={w: 1.0 + 0.25 * w for w in (1, 2, 3, 5)}, head_s={w: 2.0 + w for w in (1, 2, 3, 5)},
                       embed_s=0.1)
    plan = plan_speculation(exits, ids, mask, max_new_tokens=12, draft_tokens=(1, 2, 4), costs=costs)
    assert len(plan.settings) == 9 and set(plan.acceptance) == {1, 2, 3}
    if scale == 0.0:  # layers 3-4 write nothing: every exit from layer 2 on is the model itself
        assert plan.acceptance[2] == 1.0 and plan.acceptance[3] == 1.0
    for s in plan.settings:
        if s["tokens_per_round"] == 1.0:  # nothing accepted: a round is a plain step and more
            assert s["predicted_speedup"] < 1.0
        assert s["predicted_speedup"] <= s["all_accepted_speedup"] + 1e-3  # acceptance 1 is the ceiling
    assert plan.best is None or plan.best["predicted_speedup"] >= 1.05
    assert "speculation plan at batch 3" in plan.summary()
    # a quick plan reads the acceptance of the first row's first tokens only: the replay of that row
    quick = plan_speculation(exits, ids, mask, max_new_tokens=12, draft_tokens=(2,), costs=costs, probe_rows=1,
                             probe_tokens=6)
    first, n = exit_matches(exits, ids[:1], mask[:1], 6, SamplingOptions.from_model(lm))
    assert quick.batch_size == 3 and quick.settings[0]["tokens_per_round"] == round(
        (n[0] - 1) / replay_rounds(first[1][0], n[0], 2), 3)


def test_ngram_draft_finds_the_latest_longest_match() -> None:
    from offramp.engines.generate.speculative import ngram_draft

    assert ngram_draft([5, 6, 7, 8, 1, 5, 6, 7, 9, 2, 5, 6, 7], 3) == [9, 2, 5]  # the latest "5 6 7"
    assert ngram_draft([1, 2, 3, 4, 2], 2) == [3, 4]  # only a 1-gram occurs earlier
    assert ngram_draft([1, 2, 3], 4) == []
    assert ngram_draft([4, 4, 4], 5, max_n=1) == [4]  # what followed the latest earlier 4


@pytest.mark.parametrize("family", ["llama", "gemma3", "mamba"])
@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_ngram_drafts_keep_greedy_output_and_are_used(family: str, scale: float) -> None:
    lm, exits = _drafting(family, scale)
    ids, mask = ragged_prompts(3)
    for ngram in (1, 4, 8):  # a ragged batch: rounds draft from matches only where every row has one
        ref = generate(lm, ids, mask, max_new_tokens=14)
        out = speculative_generate(exits, ids, mask, exit_layer=2, draft_tokens=2, max_new_tokens=14,
                                   ngram_tokens=ngram)
        assert torch.equal(out.sequences, ref.sequences), (family, scale, ngram)
        assert out.extra["speculation"]["ngram_tokens"] == ngram
    used = 0
    for r in range(3):  # one row at a time, its prompt repeated: text that repeats itself
        row = ids[r:r + 1, mask[r].bool()]
        prompt = torch.cat([row, row, row], dim=1)
        ref = generate(lm, prompt, max_new_tokens=14)
        out = speculative_generate(exits, prompt, exit_layer=2, draft_tokens=2, max_new_tokens=14, ngram_tokens=6)
        assert torch.equal(out.sequences, ref.sequences), (family, scale, r)
        spec = out.extra["speculation"]
        assert spec["rounds"] >= spec["ngram_rounds"]
        used += spec["ngram_rounds"]
    assert used > 0
    # n-gram drafts only (prompt lookup): a round without a match is a plain decoding step
    row = ids[:1, mask[0].bool()]
    prompt = torch.cat([row, row], dim=1)
    only = speculative_generate(exits, prompt, exit_layer=2, draft_tokens=0, max_new_tokens=14, ngram_tokens=6)
    assert torch.equal(only.sequences, generate(lm, prompt, max_new_tokens=14).sequences)
    spec = only.extra["speculation"]
    assert (spec["drafted"] > 0) == (spec["ngram_rounds"] > 0)  # only matches draft


def test_ngram_drafting_refuses_sampling_and_bad_counts() -> None:
    _, exits = _drafting("llama", 1.0)
    ids, mask = ragged_prompts(2)
    with pytest.raises(ValueError, match="greedily"):
        speculative_generate(exits, ids, mask, ngram_tokens=3, sampling=SamplingOptions(do_sample=True))
    with pytest.raises(ValueError, match="ngram_tokens must be an integer >= 0"):
        speculative_generate(exits, ids, mask, ngram_tokens=-1)
    with pytest.raises(ValueError, match="n-gram matches only: give ngram_tokens"):
        speculative_generate(exits, ids, mask, draft_tokens=0)
