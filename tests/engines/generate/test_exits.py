"""Token exits in the engine: cache strategies, skipped layers never run, catch_up exactness."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from decoder_models import ragged_prompts, tiny_decoder

from offramp.engines.generate import generate
from offramp.engines.generate.sampling import SamplingOptions
from offramp.modeling import DecoderExitModel
from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState

NO_EOS = SamplingOptions(eos_token_id=None, pad_token_id=0)


@dataclass(frozen=True)
class AlwaysAt(ExitPolicy):
    """Every row exits at exit ``index``."""

    index: int = 0

    def decide(self, index: int, signals: ExitSignals, state: PolicyState):
        return torch.full((signals.batch_size,), index == self.index, dtype=torch.bool), state


@dataclass(frozen=True)
class SignOfHidden(ExitPolicy):
    """Data-dependent per-row exits: a row-deterministic, pseudo-random function of its features."""

    def decide(self, index: int, signals: ExitSignals, state: PolicyState):
        return (signals.hidden[:, 0] * 1000).long() % 3 == 0, state


@dataclass
class EveryOtherStep(ExitPolicy):
    """All rows exit at the first exit on even decoding steps, none on odd ones."""

    calls: list = field(default_factory=list)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState):
        if index == 0:
            self.calls.append(1)
        early = len(self.calls) % 2 == 1
        return torch.full((signals.batch_size,), early and index == 0, dtype=torch.bool), state


def _exit_model(family: str, head: str = "ffn", layers: int = 4) -> DecoderExitModel:
    backbone = tiny_decoder(family, layers=layers)
    model = DecoderExitModel.from_backbone(backbone, exit_layers=[1, 2], head=head)
    torch.manual_seed(5)
    for p in list(model.heads.parameters()) + list(model.confidence.parameters()):
        torch.nn.init.normal_(p, 0.0, 0.2)
    return model


def _count_rows(layers: torch.nn.ModuleList) -> tuple[list[int], list]:
    counts = [0] * len(layers)

    def hook(i):
        def fn(module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            counts[i] += h.shape[0] * h.shape[1]
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    return counts, handles


@pytest.mark.parametrize("family,strategy", [("llama", "copy_kv"), ("llama", "propagate"), ("gpt2", "copy_kv"),
                                             ("mamba", "freeze"), ("gemma3", "propagate")])
def test_skipped_layers_never_run(family: str, strategy: str) -> None:
    model = _exit_model(family)
    ids, mask = ragged_prompts(3)
    b, p = ids.shape
    counts, handles = _count_rows(model.adapter.layers())
    out = generate(model, ids, mask, policy=AlwaysAt(0), cache_strategy=strategy, max_new_tokens=5,
                   sampling=NO_EOS)
    for h in handles:
        h.remove()
    n = out.new_tokens.shape[1]
    assert out.exit_layers[:, 1:].eq(1).all() and out.exit_layers[:, 0].eq(4).all()
    assert counts[0] == b * p + b * (n - 1)  # prefill + one row-token per decoding step
    assert counts[1:] == [b * p] * 3  # layers past the exit ran in the prefill only
    assert out.report.layer_rows == int(out.exit_layers.sum()) == b * 4 + b * (n - 1)


def test_mamba_update_runs_skipped_layers_as_counted_cache_work_and_freeze_keeps_states() -> None:
    model = _exit_model("mamba")
    ids, mask = ragged_prompts(2)
    counts, handles = _count_rows(model.adapter.layers())
    out = generate(model, ids, mask, policy=AlwaysAt(1), cache_strategy="update", max_new_tokens=4,
                   sampling=NO_EOS, return_cache=True)
    for h in handles:
        h.remove()
    b, p = ids.shape
    assert counts[2:] == [b * p + b * 3] * 2 and out.report.fill_layer_rows == b * 3 * 2
    frozen = generate(model, ids, mask, policy=AlwaysAt(1), cache_strategy="freeze", max_new_tokens=4,
                      sampling=NO_EOS, return_cache=True)
    prefill_only = generate(model, ids, mask, policy=AlwaysAt(1), cache_strategy="freeze", max_new_tokens=1,
                            sampling=NO_EOS, return_cache=True)
    for layer in (2, 3):
        assert torch.equal(frozen.extra["cache"].ssm[layer], prefill_only.extra["cache"].ssm[layer])
        assert not torch.equal(out.extra["cache"].ssm[layer], prefill_only.extra["cache"].ssm[layer])
    assert not torch.equal(frozen.extra["cache"].ssm[0], prefill_only.extra["cache"].ssm[0])


def test_copy_kv_fills_skipped_layers_with_the_last_computed_layer() -> None:
    model = _exit_model("llama")
    ids, mask = ragged_prompts(3)
    out = generate(model, ids, mask, policy=SignOfHidden(), cache_strategy="copy_kv", max_new_tokens=6,
                   sampling=NO_EOS, return_cache=True)
    kv, p = out.extra["cache"], ids.shape[1]
    assert kv.keys[0].shape == (3, 2, p + 6, 8) and all(k.shape == kv.keys[0].shape for k in kv.keys)
    depth = out.exit_layers
    assert len(set(depth[:, 1:].flatten().tolist())) > 1  # rows really exit at different layers
    for r in range(3):
        for i in range(1, 5):  # the token at column p+i was run at step i; its exit is depth[r, i+1]
            k = int(depth[r, i + 1])
            for layer in range(k, 4):
                assert torch.equal(kv.keys[layer][r, :, p + i], kv.keys[k - 1][r, :, p + i])
                assert torch.equal(kv.values[layer][r, :, p + i], kv.values[k - 1][r, :, p + i])
    assert kv.keys[3][:, :, p + 5].abs().sum() == 0  # the last token was never run


@pytest.mark.parametrize(("family", "strategy"), [("llama", "copy_kv"), ("llama", "propagate"),
                                                  ("llama", "catch_up"), ("mamba", "catch_up"),
                                                  ("mamba2", "catch_up")])
def test_rows_exit_independently_of_their_batch(family: str, strategy: str) -> None:
    model = _exit_model(family)
    ids, mask = ragged_prompts(3)
    batched = generate(model, ids, mask, policy=SignOfHidden(), cache_strategy=strategy, max_new_tokens=6,
                       sampling=NO_EOS)
    for r in range(3):
        row = ids[r:r + 1, int(mask[r].argmax()):]
        alone = generate(model, row, policy=SignOfHidden(), cache_strategy=strategy, max_new_tokens=6,
                         sampling=NO_EOS)
        assert torch.equal(alone.new_tokens, batched.new_tokens[r:r + 1])
        assert torch.equal(alone.exit_layers, batched.exit_layers[r:r + 1])


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "mamba", "mamba2"])
def test_catch_up_reproduces_full_model_logits_for_deep_tokens(family: str) -> None:
    """The layers a token skipped run for it before the next deep token (on Mamba: one pass that
    continues their states over the pending tokens), so deep tokens get the full model's logits."""
    ssm = family.startswith("mamba")
    model = _exit_model(family)
    ids, mask = ragged_prompts(3)
    out = generate(model, ids, mask, policy=EveryOtherStep(), cache_strategy="catch_up", max_new_tokens=8,
                   sampling=NO_EOS, output_logits=True)
    deep = out.exit_layers == 4
    assert deep[:, 2:].any() and (~deep).any()
    seq, p = out.sequences, ids.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(out.new_tokens)], 1)
    pos = {} if ssm else {"position_ids": (full_mask.cumsum(-1) - 1).clamp(min=0)}
    ref = model.backbone(input_ids=seq, attention_mask=full_mask, **pos).logits[:, p - 1:-1]  # (b, n, V)
    torch.testing.assert_close(out.step_logits[deep], ref[deep], atol=1e-4, rtol=1e-4)
    copy = generate(model, ids, mask, policy=EveryOtherStep(), cache_strategy="freeze" if ssm else "copy_kv",
                    max_new_tokens=8, sampling=NO_EOS, output_logits=True)
    assert not torch.allclose(copy.step_logits[deep], ref[deep], atol=1e-4)  # the approximation is not exact


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_ragged_chunk_gives_each_row_what_its_own_chunk_gives(family: str) -> None:
    """One catch_up pass serves rows with different numbers of pending tokens: a row padded on the
    left gets the outputs and last states of a chunk over its own tokens alone."""
    from offramp.engines.generate.mamba import mamba_chunk

    block = tiny_decoder(family).backbone.layers[0]
    m = block.mixer
    torch.manual_seed(1)
    h = torch.randn(3, 6, 32)
    conv = torch.randn(3, m.conv1d.weight.shape[0], m.conv_kernel_size)
    ssm = torch.randn(3, m.num_heads, m.head_dim, m.ssm_state_size) if family == "mamba2" else \
        torch.randn(3, m.intermediate_size, m.ssm_state_size)
    lead = torch.tensor([0, 2, 5])
    with torch.no_grad():
        y, convs, ssms = mamba_chunk(block, h, conv, ssm, lead=lead)
        for i, o in enumerate(lead.tolist()):
            yi, convi, ssmi = mamba_chunk(block, h[i:i + 1, o:], conv[i:i + 1], ssm[i:i + 1])
            torch.testing.assert_close(y[i:i + 1, o:], yi, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(convs[-1][i:i + 1], convi[-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ssms[-1][i:i + 1], ssmi[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_catch_up_is_exact_when_rows_have_different_pending_tokens(family: str) -> None:
    model = _exit_model(family)
    ids, mask = ragged_prompts(3)
    out = generate(model, ids, mask, policy=SignOfHidden(), cache_strategy="catch_up", max_new_tokens=10,
                   sampling=NO_EOS, output_logits=True)
    deep = out.exit_layers == 4
    shallow_before = (~deep).long().cumsum(1)  # rows have skipped different numbers of tokens
    assert len({tuple(r) for r in shallow_before[:, 1:].tolist()}) > 1 and deep[:, 2:].any()
    seq, p = out.sequences, ids.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(out.new_tokens)], 1)
    ref = model.backbone(input_ids=seq, attention_mask=full_mask).logits[:, p - 1:-1]
    torch.testing.assert_close(out.step_logits[deep], ref[deep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head", ["tied", "ffn", "block", "mamba"])
def test_never_exit_threshold_one_and_save_load(head: str, tmp_path) -> None:
    model = _exit_model("llama", head=head)
    ids, mask = ragged_prompts(2)
    ref = model.backbone.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0,
                                  eos_token_id=3)
    assert torch.equal(generate(model, ids, mask, threshold=None, max_new_tokens=6).sequences, ref)
    a = generate(model, ids, mask, threshold=0.5, max_new_tokens=6, output_logits=True)
    model.save_pretrained(tmp_path / "exits")
    again = DecoderExitModel.from_pretrained(tmp_path / "exits", backbone=model.backbone)
    assert again.config.to_dict() == model.config.to_dict()
    b = generate(again, ids, mask, threshold=0.5, max_new_tokens=6, output_logits=True)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.step_logits, b.step_logits)


def test_bad_exit_configs_raise() -> None:
    backbone = tiny_decoder("llama")
    with pytest.raises(ValueError, match="out of range"):
        DecoderExitModel.from_backbone(backbone, exit_layers=[2, 4])
    with pytest.raises(ValueError, match="increasing"):
        DecoderExitModel.from_backbone(backbone, exit_layers=[3, 2])
    with pytest.raises(ValueError, match="unknown exit head"):
        DecoderExitModel.from_backbone(backbone, exit_layers=[2], head="lstm")
    with pytest.raises(ValueError, match="DecoderExitModel"):
        generate(backbone, torch.ones(1, 2, dtype=torch.long), threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        generate(DecoderExitModel.from_backbone(backbone, exit_layers=[2]), torch.ones(1, 2, dtype=torch.long),
                 threshold=1.5)


def test_deeper_mamba_heads_follow_the_cache_strategy() -> None:
    model = _exit_model("llama", head="mamba")
    ids, mask = ragged_prompts(2)

    def head_states(strategy: str, n: int):
        return generate(model, ids, mask, policy=AlwaysAt(0), cache_strategy=strategy, max_new_tokens=n,
                        sampling=NO_EOS, return_cache=True).extra["head_states"]

    prefill, copy, propagate = head_states("copy_kv", 1), head_states("copy_kv", 4), head_states("propagate", 4)
    assert torch.equal(copy.ssm[1], prefill.ssm[1])  # the deeper head kept its state
    assert not torch.equal(propagate.ssm[1], prefill.ssm[1])  # ... or ran on the exit hidden state
    assert not torch.equal(copy.ssm[0], prefill.ssm[0])  # the exit taken always updates its head


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_stream_generate_yields_the_tokens_of_generate(family):
    from offramp.engines.generate import stream_generate

    model = _exit_model(family)
    ids, attn = ragged_prompts(3)
    eos = SamplingOptions(eos_token_id=7, pad_token_id=0)  # some rows may stop early
    whole = generate(model, ids, attn, policy=SignOfHidden(), max_new_tokens=8, sampling=eos)
    steps = list(stream_generate(model, ids, attn, policy=SignOfHidden(), max_new_tokens=8, sampling=eos))
    assert [s.index for s in steps] == list(range(whole.new_tokens.shape[1]))
    tokens = torch.full_like(whole.new_tokens, 0)
    layers = torch.zeros_like(whole.exit_layers)
    ended = torch.zeros(3, dtype=torch.bool)
    for s in steps:
        assert not ended[s.rows].any()  # a finished row gets no more tokens
        tokens[s.rows, s.index], layers[s.rows, s.index] = s.tokens, s.exit_layers
        ended[s.rows[s.finished]] = True
    assert ended.all()
    assert torch.equal(tokens, whole.new_tokens) and torch.equal(layers, whole.exit_layers)
    assert (layers[:, 1:][layers[:, 1:] > 0] < model.adapter.num_layers).any()  # exits were taken


def test_stream_generate_checks_its_arguments_before_the_first_token():
    from offramp.engines.generate import stream_generate

    ids, attn = ragged_prompts(2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        stream_generate(_exit_model("llama"), ids, attn, max_new_tokens=0)
