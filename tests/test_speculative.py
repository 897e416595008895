"""Self-speculative decoding from a token exit is greedy decoding, token for token: every attention
adapter, ragged batches, every draft length, drafts mostly accepted or mostly rejected."""

from __future__ import annotations

import pytest
import torch
from decoder_models import ragged_prompts, tiny_decoder

from offramp.engines.generate import generate
from offramp.engines.generate.sampling import SamplingOptions
from offramp.engines.generate.speculative import speculative_generate
from offramp.modeling.decoder import DecoderExitModel

ATTENTION = ["llama", "qwen3", "mistral", "gemma3", "gpt2"]
UPPER = ("o_proj", "down_proj", "c_proj")


def _drafting(family: str, scale: float, head: str = "tied") -> tuple[torch.nn.Module, DecoderExitModel]:
    """A 4-layer model whose layers 3-4 write ``scale`` times their usual output, with an exit at layer
    2: scale 0 makes the exit the full model (every draft accepted), 1 leaves the model as it is."""
    lm = tiny_decoder(family, layers=4)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if any(f".{i}." in name for i in (2, 3)) and any(k in name for k in UPPER) and p.dim() == 2:
                p.mul_(scale)
    return lm, DecoderExitModel.from_backbone(lm, exit_layers=[2], head=head)


@pytest.mark.parametrize("family", ATTENTION)
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_speculation_equals_greedy_ragged_batch(family: str, scale: float) -> None:
    lm, exits = _drafting(family, scale)
    ids, mask = ragged_prompts(3)
    ref = generate(lm, ids, mask, max_new_tokens=12)
    for d in (1, 3, 5):
        out = speculative_generate(exits, ids, mask, exit_layer=2, draft_tokens=d, max_new_tokens=12)
        assert torch.equal(out.sequences, ref.sequences), (family, scale, d)
        spec = out.extra["speculation"]
        assert 1.0 <= spec["tokens_per_round"] <= d + 1
    if scale == 0.0:  # the exit is the full model: every draft is accepted
        assert spec["acceptance"] == 1.0


def test_untrained_exit_is_rejected_and_output_still_greedy() -> None:
    lm, exits = _drafting("llama", 1.0, head="ffn")
    ids, mask = ragged_prompts(3)
    out = speculative_generate(exits, ids, mask, exit_layer=2, draft_tokens=4, max_new_tokens=10)
    assert torch.equal(out.sequences, generate(lm, ids, mask, max_new_tokens=10).sequences)
    assert out.extra["speculation"]["acceptance"] < 0.5


def test_a_row_does_not_depend_on_its_batch_and_eos_stops_it() -> None:
    lm, exits = _drafting("llama", 0.5)
    ids, mask = ragged_prompts(3)
    opts = SamplingOptions(eos_token_id=49, pad_token_id=0)  # a token this model emits mid-sequence
    ref = generate(lm, ids, mask, max_new_tokens=14, sampling=opts)
    out = speculative_generate(exits, ids, mask, draft_tokens=3, max_new_tokens=14, sampling=opts)
    assert torch.equal(out.sequences, ref.sequences)
    stopped = (out.new_tokens == 49).nonzero()
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
    with pytest.raises(ValueError, match="greedy"):
        speculative_generate(exits, ids, mask, sampling=SamplingOptions(do_sample=True))
    with pytest.raises(ValueError, match="DecoderExitModel"):
        speculative_generate(lm, ids, mask)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_generate(exits, ids, mask, draft_tokens=0)
    mamba = DecoderExitModel.from_backbone(tiny_decoder("mamba"), exit_layers=[2], head="ffn")
    with pytest.raises(ValueError, match="attention backbone"):
        speculative_generate(mamba, ids, mask)
