"""Never-exit decoding reproduces HF ``generate(do_sample=False)`` token for token, every adapter."""

from __future__ import annotations

import pytest
import torch
from decoder_models import ragged_prompts, tiny_decoder

from offramp.backbones import ADAPTERS, adapter_for
from offramp.engines.generate import generate
from offramp.engines.generate.sampling import SamplingOptions

FAMILIES = ["llama", "qwen3", "mistral", "gemma3", "gpt2", "mamba", "mamba2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_never_exit_equals_hf_greedy_ragged_batch(family: str) -> None:
    model = tiny_decoder(family)
    ids, mask = ragged_prompts(3)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0,
                         eos_token_id=3)
    out = generate(model, ids, mask, max_new_tokens=10)
    assert torch.equal(out.sequences, ref)
    assert out.report.mean_exit_layer == adapter_for(model).num_layers


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_never_exit_equals_hf_greedy_single_row(family: str) -> None:
    model = tiny_decoder(family)
    ids = torch.tensor([[5, 17, 23, 42, 8]])
    ref = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=3)
    assert torch.equal(generate(model, ids, max_new_tokens=8).sequences, ref)


def test_eager_attention_and_repetition_penalty_match_hf() -> None:
    model = tiny_decoder("llama", attn="eager")
    ids, mask = ragged_prompts(2)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0,
                         eos_token_id=3, repetition_penalty=1.3)
    opts = SamplingOptions(repetition_penalty=1.3, eos_token_id=3, pad_token_id=0)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=8, sampling=opts).sequences, ref)


def test_row_result_does_not_depend_on_batch() -> None:
    model = tiny_decoder("llama")
    ids, mask = ragged_prompts(3)
    no_eos = SamplingOptions(eos_token_id=None)
    batched = generate(model, ids, mask, max_new_tokens=6, sampling=no_eos).new_tokens
    for r in range(3):
        row = ids[r:r + 1, int(mask[r].argmax()):]
        alone = generate(model, row, max_new_tokens=6, sampling=no_eos).new_tokens
        assert torch.equal(batched[r:r + 1], alone)


def test_sampling_is_seeded_and_stops_at_eos() -> None:
    model = tiny_decoder("gpt2")
    ids, mask = ragged_prompts(2)
    opts = SamplingOptions(do_sample=True, temperature=0.7, top_p=0.9, seed=3, eos_token_id=None)
    a = generate(model, ids, mask, max_new_tokens=6, sampling=opts).new_tokens
    b = generate(model, ids, mask, max_new_tokens=6, sampling=opts).new_tokens
    assert torch.equal(a, b) and a.shape == (2, 6)
    first = int(generate(model, ids, mask, max_new_tokens=1).new_tokens[0, 0])
    stop = SamplingOptions(eos_token_id=first, pad_token_id=0)
    out = generate(model, ids[:1], mask[:1], max_new_tokens=5, sampling=stop)
    assert out.new_tokens.shape == (1, 1) and out.exit_layers.shape == (1, 1)


def test_registry_keys() -> None:
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "mamba", "mamba2"):
        assert ADAPTERS[name].role == "decoder"
    for name in ("bert", "roberta", "mpnet", "distilbert", "albert", "vit"):
        assert ADAPTERS[name].role == "encoder"


def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny_decoder("gpt2")
    with pytest.raises(ValueError, match="context"):
        generate(model, torch.ones(1, 120, dtype=torch.long), max_new_tokens=20)
    with pytest.raises(ValueError, match="LEFT"):
        generate(model, torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cache_strategy"):
        generate(model, torch.ones(1, 3, dtype=torch.long), cache_strategy="freeze")
    bert_like = torch.nn.Linear(2, 2)
    bert_like.config = type("C", (), {"model_type": "bert"})()
    with pytest.raises(ValueError, match="unsupported decoder model_type 'bert'.*is a encoder"):
        adapter_for(bert_like, role="decoder")


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_bfloat16_decoding_equals_hf_greedy(family: str) -> None:
    # a Mamba model in bfloat16 keeps its residual stream in float32: the LM head gets its own dtype
    model = tiny_decoder(family).to(torch.bfloat16)
    ids, mask = ragged_prompts(2)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0,
                         eos_token_id=3)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=8).sequences, ref)
