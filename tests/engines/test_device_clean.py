"""The engines keep their work on the model's device and reach the host only where a decision must.

Two checks that run on the CPU:

* a tensor an engine creates without naming the model's device would land on torch's default
  device; with the default set to ``meta`` such a tensor has no data, so the first op that mixes
  it with the model's tensors (or reads it) fails. Every engine runs clean under it, and gives
  the same output as without it;
* ``HostSyncs`` counts the synchronisations (values reaching Python, data-dependent shapes) and
  each engine is held to the number docs/devices.md documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from decoder_models import ragged_prompts, tiny_decoder
from encoders import build_encoder, make_batch
from host_syncs import HostSyncs
from reasoning import QUESTIONS, always_accepting_probe, tiny_lm, tiny_tokenizer

from offramp import EarlyExitModel, OfframpConfig
from offramp.data.tasks import Problem
from offramp.engines import rows as rows_module
from offramp.engines.generate import generate
from offramp.engines.generate.continuous import ContinuousBatch, ContinuousSpeculation
from offramp.engines.generate.sampling import SamplingOptions
from offramp.engines.generate.speculative import speculative_generate
from offramp.engines.reason import ReasonConfig, reason_batch
from offramp.modeling import DecoderExitModel
from offramp.policies import ProbeExitPolicy
from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState

NO_EOS = SamplingOptions(eos_token_id=None, pad_token_id=0)


def _exits(family: str, layers: tuple[int, ...] = (1, 2), head: str = "ffn") -> DecoderExitModel:
    model = DecoderExitModel.from_backbone(tiny_decoder(family), exit_layers=list(layers), head=head)
    torch.manual_seed(5)
    for p in list(model.heads.parameters()) + list(model.confidence.parameters()):
        torch.nn.init.normal_(p, 0.0, 0.2)
    return model.eval()


def _on_meta_default(fn):
    """``fn()`` with torch's default device set to ``meta`` (anything created without a device has no data)."""
    torch.set_default_device("meta")
    try:
        return fn()
    finally:
        torch.set_default_device(None)


def _continuous(batch_cls, model, **kwargs) -> list:
    batch = batch_cls(model, sampling=NO_EOS, **kwargs)
    batch.add("a", [5, 6, 7], 5)
    got = batch.step()
    batch.add("b", [9, 10], 4)
    while True:
        step = batch.step()
        if not step:
            return [(t.key, t.token) for t in got]
        got += step


def _reason(lm, tok, policy) -> list:
    cfg = ReasonConfig(max_new_tokens=30, feature_layers=(1, -1), max_answer_tokens=5)
    problems = [Problem(f"q{i}", q, "5", "test") for i, q in enumerate(QUESTIONS)]
    return [(r.chain_ids, r.answer) for r in reason_batch(lm, tok, problems, policy=policy, config=cfg,
                                                          batch_size=3)]


def _cases() -> dict:
    encoder = EarlyExitModel.from_backbone(build_encoder("bert"), OfframpConfig(num_labels=3)).eval()
    ids, mask = make_batch(6, 10)
    prompts, pmask = ragged_prompts(3)
    llama, mamba = _exits("llama"), _exits("mamba")
    drafting = DecoderExitModel.from_backbone(tiny_decoder("llama"), exit_layers=[3], head="tied").eval()
    tok = tiny_tokenizer()
    lm = tiny_lm(len(tok), seed=5)
    probe = ProbeExitPolicy(probe=always_accepting_probe(2 * lm.config.hidden_size))
    mixed = {"type": "max_prob", "threshold": 0.02}
    cases = {"classify": lambda: encoder.predict(ids, mask, {"type": "max_prob", "threshold": 0.34}).logits}
    for family, model, strategies in (("llama", llama, ("copy_kv", "propagate", "catch_up")),
                                      ("mamba", mamba, ("freeze", "update", "catch_up"))):
        for strategy in strategies:
            cases[f"generate {family} {strategy}"] = (
                lambda m=model, s=strategy: generate(m, prompts, pmask, max_new_tokens=5, policy=mixed,
                                                     cache_strategy=s, sampling=NO_EOS).sequences)
        cases[f"speculative {family}"] = (
            lambda m=model: speculative_generate(m, prompts, pmask, exit_layer=2, draft_tokens=3, max_new_tokens=6,
                                                 sampling=NO_EOS).sequences)
    cases["continuous"] = lambda: _continuous(ContinuousBatch, llama, policy=mixed)
    cases["continuous speculation"] = lambda: _continuous(ContinuousSpeculation, drafting, exit_layer=3,
                                                          draft_tokens=3)
    cases["reason deer"] = lambda: _reason(lm, tok, {"type": "deer", "threshold": 0.2})
    cases["reason probe"] = lambda: _reason(lm, tok, probe)
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_an_engine_makes_is_on_the_models_device(case):
    run = CASES[case]
    expected = run()
    got = _on_meta_default(run)  # a tensor made without the model's device would be a meta tensor here
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    else:
        assert got == expected


def _count_decisions(monkeypatch) -> list[int]:
    """Count the exit decisions that reach ``RunningRows.leave`` (one host synchronisation each)."""
    calls = [0]
    real = rows_module.RunningRows.leave

    def leave(self, exits, write, carried):
        calls[0] += 1
        return real(self, exits, write, carried)

    monkeypatch.setattr(rows_module.RunningRows, "leave", leave)
    return calls


# docs/devices.md: the synchronisations outside the decode loop (input checks, the report) are at most
SETUP = 5


@dataclass(frozen=True)
class SignOfHidden(ExitPolicy):
    """Data-dependent per-row exits: a row-deterministic, pseudo-random function of its features."""

    needs = ("hidden",)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState):
        return (signals.hidden[:, 0] * 1000).long() % 3 == 0, state


@pytest.mark.parametrize("family", ["llama", "mamba"])
@pytest.mark.parametrize("policy", ["never", SignOfHidden(), {"type": "token_confidence", "threshold": 0.5}])
def test_token_exit_decoding_synchronises_once_per_step_and_once_per_decision(family, policy, monkeypatch):
    model = _exits(family)
    prompts, mask = ragged_prompts(3)
    decisions = _count_decisions(monkeypatch)
    steps = 12
    with HostSyncs() as syncs:
        out = generate(model, prompts, mask, max_new_tokens=steps, policy=policy, sampling=NO_EOS)
    if policy != "never":
        assert len(set(out.exit_layers.flatten().tolist())) > 1, "the test needs rows leaving at different exits"
        assert decisions[0] >= steps - 1  # at least one at every step after the prefill
    loop = steps - 1 + decisions[0]  # which rows go on after each step but the last, and each exit decision
    assert loop <= syncs.total <= loop + SETUP, dict(syncs.where)


def test_self_speculation_synchronises_once_per_round():
    model = DecoderExitModel.from_backbone(tiny_decoder("llama"), exit_layers=[3], head="tied").eval()
    prompts, mask = ragged_prompts(3)
    with HostSyncs() as syncs:
        out = speculative_generate(model, prompts, mask, exit_layer=3, draft_tokens=3, max_new_tokens=16,
                                   sampling=NO_EOS)
    rounds = out.extra["speculation"]["rounds"]
    assert rounds >= 4 and out.extra["speculation"]["accepted"] > 0
    assert rounds <= syncs.total <= rounds + SETUP + 1, dict(syncs.where)  # + the first tokens' transfer


def test_classify_synchronises_once_per_exit_decision(monkeypatch):
    model = EarlyExitModel.from_backbone(build_encoder("bert"), OfframpConfig(num_labels=3)).eval()
    ids, mask = make_batch(8, 10)
    with torch.no_grad():  # a threshold between two rows' first-exit confidences: rows leave at several exits
        first = model(ids, mask).exit_logits[0].softmax(-1).amax(-1).sort().values
    threshold = float(first[3] + first[4]) / 2
    decisions = _count_decisions(monkeypatch)
    with HostSyncs() as syncs:
        pred = model.predict(ids, mask, {"type": "max_prob", "threshold": threshold})
    assert len(set(pred.exit_layer.tolist())) > 1, "the test needs rows leaving at different exits"
    # the attention mask's checks on the inputs and transformers' mask construction: 2 per batch
    assert decisions[0] <= syncs.total <= decisions[0] + 2, dict(syncs.where)
