"""Learn-then-Test on token traces: the sequence-level and token-level guarantees hold over fresh draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offramp.calibration import LearnThenTest
from offramp.evaluation.token_trace import TokenTrace
from offramp.policies import make_policy


def _trace(rng: np.random.Generator, sequences: int, tokens: int = 12, exits: int = 3) -> TokenTrace:
    """Synthetic exchangeable sequences: an exit agrees with the full model more often when its
    confidence is high; sequences differ in difficulty, so tokens of one sequence are correlated."""
    n = sequences * tokens
    hard = np.repeat(rng.uniform(0, 0.5, sequences), tokens)
    conf = rng.uniform(0, 1, (exits, n))
    p_agree = np.clip(conf * (1 - hard) + 0.15 * np.arange(exits)[:, None], 0, 1)
    agree = rng.uniform(0, 1, (exits, n)) < p_agree
    final = rng.integers(0, 50, n)
    top1 = np.where(agree, final[None], (final[None] + 1 + rng.integers(0, 48, (exits, n))) % 50)
    stats = {k: torch.zeros(exits, n) for k in ("max_prob", "entropy", "margin")}
    stats["top1"] = torch.as_tensor(top1)
    return TokenTrace(stats=stats, confidence=torch.as_tensor(conf, dtype=torch.float32),
                      final_top1=torch.as_tensor(final), sequence=torch.as_tensor(np.repeat(np.arange(sequences), tokens)),
                      exit_layers=[2, 4, 6], num_layers=8, vocab_size=50)


@pytest.mark.parametrize("risk,tolerance,pvalue", [("sequence", 0.1, "binomial"), ("sequence", 0.0, "hoeffding"),
                                                   ("token", 0.0, "hoeffding"), ("token", 0.0, "hoeffding_bentkus")])
def test_generation_threshold_violation_frequency_is_at_most_epsilon(risk, tolerance, pvalue):
    rng = np.random.default_rng(0)
    delta, epsilon, reps = 0.2, 0.1, 60
    policy = make_policy("token_confidence")
    grid = np.linspace(1.0, 0.0, 41)
    population = LearnThenTest(delta, epsilon, risk=risk, tolerance=tolerance).fit(policy, _trace(rng, 6000), grid)
    true_risk = population.risks_
    assert true_risk[0] == 0.0 and true_risk[-1] > delta  # from never exiting to always exiting
    violations = certified = 0
    for _ in range(reps):
        ltt = LearnThenTest(delta, epsilon, risk=risk, tolerance=tolerance, pvalue=pvalue).fit(
            policy, _trace(rng, 300), grid)
        if ltt.index_ >= 0:
            certified += ltt.index_ > 0
            violations += true_risk[ltt.index_] > delta
            assert ltt.policy_.threshold == pytest.approx(grid[ltt.index_])
    assert violations / reps <= epsilon
    assert certified >= reps // 2  # not vacuous: it certifies exits most of the time


def test_token_risks_are_checked_against_the_trace_kind():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="binomial"):
        LearnThenTest(0.1, 0.1, risk="token", pvalue="binomial")
    with pytest.raises(ValueError, match="token traces"):
        LearnThenTest(0.1, 0.1, risk="sequence").fit(make_policy("max_prob"), _classification(rng))
    with pytest.raises(ValueError, match="classification"):
        LearnThenTest(0.1, 0.1, risk="disagree").fit(make_policy("token_confidence"), _trace(rng, 10))


def _classification(rng):
    from offramp.evaluation.collect import ExitTrace

    return ExitTrace(logits=torch.randn(3, 20, 4), labels=torch.randint(0, 4, (20,)), exit_layers=[1, 2, 3],
                     num_layers=3)


def test_sequential_walk_equals_fitting_every_candidate():
    rng = np.random.default_rng(3)
    losses = (rng.uniform(size=(12, 80)) < np.linspace(0.0, 0.6, 12)[:, None]).astype(float)
    full = LearnThenTest(0.2, 0.1, risk="sequence", pvalue="binomial").fit_losses(losses)
    policy = make_policy("token_confidence")
    grid = np.linspace(1.0, 0.45, 12)
    walked = []

    def losses_of(p):
        j = int(np.argmin(np.abs(grid - p.threshold)))
        walked.append(j)
        return losses[j], 0.0

    seq = LearnThenTest(0.2, 0.1, risk="sequence", pvalue="binomial").fit_sequential(policy, losses_of, grid)
    assert seq.index_ == full.index_ >= 1
    assert walked == list(range(seq.index_ + 2))  # it stops right after the first failure
    assert seq.policy_.threshold == pytest.approx(grid[seq.index_])


def _tiny_exits():
    from decoder_models import tiny_decoder

    from offramp.modeling import DecoderExitModel

    lm = tiny_decoder("llama", layers=4)
    model = DecoderExitModel.from_backbone(lm, exit_layers=[1, 2, 3])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.confidence.parameters():
            p.normal_(0, 0.3, generator=g)
    return model.eval()


def _prompt_batches(n: int = 24, batch: int = 6):
    g = torch.Generator().manual_seed(4)
    out = []
    for i in range(0, n, batch):
        ids = torch.randint(4, 97, (batch, 5), generator=g)
        out.append((ids, torch.ones_like(ids)))
    return out


def test_trace_and_real_generation_give_the_same_sequence_risk_with_the_exact_cache():
    """The claim the token trace rests on: with catch_up and greedy decoding, "the text differs from the
    full model's" on real generation is exactly "some replayed exit disagrees" on the trace."""
    from offramp.calibration.generation import calibrate_generation, generate_rows
    from offramp.evaluation.token_trace import collect_tokens

    model = _tiny_exits()
    batches = _prompt_batches()
    full, _ = generate_rows(model, batches, None, cache_strategy="catch_up", max_new_tokens=6)
    seqs = []
    for (ids, _), start in zip(batches, range(0, 24, 6)):
        for r in range(ids.shape[0]):
            seqs.append((torch.cat([ids[r], torch.tensor(full[start + r])]), ids.shape[1]))
    trace = collect_tokens(model, seqs)
    grid = [1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]
    policy = make_policy("token_confidence")
    on_trace = LearnThenTest(0.9, 0.5, risk="sequence").fit(policy, trace, grid)
    on_text = calibrate_generation(model, batches, policy, delta=0.9, epsilon=0.5, risk="sequence",
                                   cache_strategy="catch_up", max_new_tokens=6, candidates=grid)
    walked = len(on_text.risks_)
    np.testing.assert_allclose(on_text.risks_, on_trace.risks_[:walked])
    assert len(set(np.round(on_trace.risks_, 6))) >= 3  # the candidates really differ
    assert on_text.source_["cache_strategy"] == "catch_up"
