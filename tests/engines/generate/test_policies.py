"""Every generation policy in the engine: mixed exits, the protocol honoured, replay equal to the engine."""

from __future__ import annotations

import pytest
import torch
from decoder_models import ragged_prompts, tiny_decoder

from offramp.engines.generate import SIGNALS, decoded_exit_layers, generate
from offramp.engines.generate.sampling import SamplingOptions
from offramp.evaluation.token_trace import TokenTrace, collect_tokens, engine_trace, replay_tokens, sweep_tokens
from offramp.modeling import DecoderExitModel
from offramp.policies import POLICIES

NO_EOS = SamplingOptions(eos_token_id=None, pad_token_id=0)
GENERATION_POLICIES = ("max_prob", "entropy", "margin", "patience", "static", "token_confidence")


def _model(family: str) -> DecoderExitModel:
    backbone = tiny_decoder(family, layers=4)
    model = DecoderExitModel.from_backbone(backbone, exit_layers=[1, 2, 3], head="ffn")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # heads near the tied LM head, so that successive exits agree on some tokens only
        for p in model.heads.parameters():
            p.normal_(0.0, 0.0 if family == "llama" else 0.2, generator=g)
        for p in model.confidence.parameters():
            p.normal_(0.0, 0.3, generator=g)
    return model.eval()


def _mid(values: torch.Tensor) -> float:
    """A threshold between two middle values: half of the rows on each side, none on it."""
    v = values[torch.isfinite(values)].flatten().sort().values
    return float((v[v.numel() // 2 - 1] + v[v.numel() // 2]) / 2)


def _specs(model: DecoderExitModel, ids: torch.Tensor, mask: torch.Tensor) -> list[dict]:
    probe = engine_trace(generate(model, ids, mask, policy={"type": "token_confidence", "threshold": 1.0},
                                  max_new_tokens=8, sampling=NO_EOS, record_signals=True))  # every exit, every token
    return [{"type": "max_prob", "threshold": _mid(probe.stats["max_prob"][0])},
            {"type": "entropy", "threshold": _mid(probe.stats["entropy"][0])},
            {"type": "margin", "threshold": _mid(probe.stats["margin"][0])},
            {"type": "patience", "patience": 1},
            {"type": "static", "layer": 2},
            {"type": "token_confidence", "threshold": _mid(probe.confidence[1])}]


def test_every_registered_policy_that_reads_token_signals_is_covered() -> None:
    supported = {name for name, cls in POLICIES.items() if set(cls.needs) <= set(SIGNALS)}
    assert supported - {"never", "saturation"} == set(GENERATION_POLICIES)


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_each_policy_exits_mixed_and_replay_of_the_engine_signals_equals_its_exits(family: str) -> None:
    model = _model(family)
    ids, mask = ragged_prompts(4)
    strategy = "copy_kv" if family == "llama" else "freeze"
    for spec in _specs(model, ids, mask):
        out = generate(model, ids, mask, policy=spec, cache_strategy=strategy, max_new_tokens=8, sampling=NO_EOS,
                       record_signals=True)
        layers = decoded_exit_layers(out)
        if spec["type"] != "static":
            assert len(set(layers.tolist())) >= 2, f"{family} {spec}: tokens should exit at different layers"
        else:
            assert set(layers.tolist()) == {2}
        trace: TokenTrace = engine_trace(out)
        replayed = torch.tensor(trace.exit_layers + [4])[replay_tokens(spec, trace)]
        assert torch.equal(replayed, layers), f"{family} {spec}"
        plain = generate(model, ids, mask, policy=spec, cache_strategy=strategy, max_new_tokens=8, sampling=NO_EOS)
        assert torch.equal(plain.exit_layers, out.exit_layers)  # recording changes no decision
        if spec["type"] in ("static", "token_confidence"):
            assert plain.report.extra_head_rows == 0  # no LM head at exits not taken
        else:  # the distribution at every exit a token passed without leaving
            passed = sum(sum(1 for k in trace.exit_layers if k < layer) for layer in layers.tolist())
            assert plain.report.extra_head_rows == passed


def _sequences(out, mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    p = mask.shape[1]
    seqs = []
    for r in range(mask.shape[0]):
        start = int(mask[r].argmax())
        seqs.append((out.sequences[r, start:], p - start))
    return seqs


def test_teacher_forced_trace_equals_the_engine_with_the_exact_cache() -> None:
    """catch_up keeps every cache exact, so the hidden states the engine sees equal a teacher-forced
    pass over the text it produced: replaying the collected trace gives the engine's exits."""
    model = _model("llama")
    ids, mask = ragged_prompts(4)
    for spec in _specs(model, ids, mask):
        out = generate(model, ids, mask, policy=spec, cache_strategy="catch_up", max_new_tokens=8, sampling=NO_EOS)
        trace = collect_tokens(model, _sequences(out, mask))
        replayed = torch.tensor(trace.exit_layers + [4])[replay_tokens(spec, trace)]
        assert torch.equal(replayed, decoded_exit_layers(out)), spec


def test_patience_keeps_its_count_across_a_tokens_exits() -> None:
    """patience=2 can only fire at the third exit; a state restarted at every exit never would."""
    model = _model("llama")
    ids, mask = ragged_prompts(4)
    out = generate(model, ids, mask, policy={"type": "patience", "patience": 2}, max_new_tokens=8, sampling=NO_EOS,
                   record_signals=True)
    layers = decoded_exit_layers(out)
    top1 = engine_trace(out).stats["top1"]
    steady = (top1[0] == top1[1]) & (top1[1] == top1[2])
    assert torch.equal(layers == 3, steady) and bool(steady.any())


def test_policies_the_engine_cannot_feed_are_refused_before_work() -> None:
    model = _model("llama")
    ids, mask = ragged_prompts(2)
    for spec, what in (({"type": "q_exit"}, "halting"), ({"type": "gate"}, "gate"), ({"type": "oracle"}, "labels")):
        with pytest.raises(ValueError, match=f"needs .*{what}.*token-exit generation"):
            generate(model, ids, mask, policy=spec, max_new_tokens=2)
    with pytest.raises(ValueError, match="past the last exit"):
        generate(model, ids, mask, policy={"type": "static", "layer": 4}, max_new_tokens=2)


def test_token_trace_round_trip_and_sweep(tmp_path) -> None:
    model = _model("llama")
    ids, mask = ragged_prompts(4)
    out = generate(model, ids, mask, max_new_tokens=8, sampling=NO_EOS)
    trace = collect_tokens(model, _sequences(out, mask))
    assert len(trace) == 4 * 7 and trace.num_sequences == 4
    trace.save(tmp_path / "t")
    back = TokenTrace.load(tmp_path / "t")
    for k, v in trace.stats.items():
        assert torch.equal(back.stats[k], v)
    assert torch.equal(back.confidence, trace.confidence) and back.step_flops == trace.step_flops
    result = sweep_tokens(back)
    assert set(result.rules) == set(GENERATION_POLICIES)  # saturation needs exit features, not collected
    oracle = result.oracles[0]
    assert oracle.metric == 1.0 and oracle.mean_exit_layer <= 4
    full = result.full["max_prob"]
    assert full.metric == 1.0 and full.mean_exit_layer == 4 and full.speedup_flops == pytest.approx(1.0)
    for p in result.points:  # no rule beats the oracle's cost at full agreement
        assert p.metric < 1.0 or p.mean_exit_layer >= oracle.mean_exit_layer - 1e-9
        assert sum(p.exit_counts) == len(trace)
