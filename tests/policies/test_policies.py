"""Policies: trace replay equals online predict; PonderNet math; patience; thresholds checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from encoders import make_batch

from offramp import POLICIES, EarlyExitModel, OfframpConfig, make_policy
from offramp.engines.classify import SIGNALS
from offramp.evaluation.collect import ExitTrace, collect, replay
from offramp.heads.halting import exit_log_distribution, geometric_prior, ponder_kl
from offramp.policies import ExitSignals


@pytest.fixture(scope="module")
def ponder_model(tiny_bert):
    torch.manual_seed(2)
    cfg = OfframpConfig(num_labels=3, halting={"type": "palbert"}, objective={"type": "ponder"},
                        gate={"type": "uncertainty"})
    model = EarlyExitModel.from_backbone(tiny_bert, cfg).eval()
    with torch.no_grad():  # spread the gates so that rows exit at different exits
        model.gates.weight.normal_(0, 3, generator=torch.Generator().manual_seed(0))
    return model


def _policies(trace: ExitTrace) -> list[dict]:
    conf = trace.logits.softmax(-1)
    mp = float(conf[:-1].amax(-1).flatten().sort().values[conf[:-1, :, 0].numel() // 2] + 1e-4)
    logp = trace.logits.log_softmax(-1)
    ent = float((-(logp.exp() * logp).sum(-1))[:-1].flatten().median() + 1e-4)
    def mid(values: torch.Tensor) -> float:  # a threshold between two rows' values
        v = values.flatten().sort().values
        return float((v[v.numel() // 2 - 1] + v[v.numel() // 2]) / 2)

    gate = mid(trace.gate[:, 0])
    sat = mid(torch.nn.functional.cosine_similarity(trace.hidden[1], trace.hidden[0], dim=-1))
    return [{"type": "never"}, {"type": "static", "layer": 2}, {"type": "max_prob", "threshold": mp},
            {"type": "entropy", "threshold": ent}, {"type": "margin", "threshold": 0.05},
            {"type": "patience", "patience": 1}, {"type": "q_exit", "q": 0.5}, {"type": "q_exit", "q": 0.9},
            {"type": "ponder_sample", "seed": 3}, {"type": "gate", "threshold": gate}, {"type": "oracle"}, {"type": "saturation", "threshold": sat}]


def test_trace_replay_equals_online_predict(ponder_model, tmp_path):
    ids, mask = make_batch(24, 10, seed=7)
    labels = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(0))
    trace = collect(ponder_model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], keep_hidden=True)
    trace.save(tmp_path / "trace")
    trace = ExitTrace.load(tmp_path / "trace")
    covered = set()
    for spec in _policies(trace):
        online = ponder_model.predict(ids, mask, spec, labels=labels)
        index, logits = replay(spec, trace)
        assert index.tolist() == online.exit_index.tolist(), spec
        torch.testing.assert_close(logits, online.logits, atol=1e-5, rtol=0)
        covered.add(spec["type"])
        if spec["type"] not in ("never", "static") and spec != {"type": "q_exit", "q": 0.9}:
            assert len(set(index.tolist())) >= 2, f"{spec}: rows should exit at different exits"
    supported = {name for name, cls in POLICIES.items() if set(cls.needs) <= set(SIGNALS)}
    assert {"never", "q_exit", "gate", "saturation", "oracle"} <= supported
    assert covered == supported, f"policies not covered: {supported - covered}"


def test_consistency_oracle_is_first_exit_agreeing_with_last():
    logits = torch.tensor([[[2.0, 0], [0, 2.0]], [[0, 2.0], [0, 2.0]], [[2.0, 0], [0, 2.0]]])  # (E=3, n=2, c=2)
    trace = ExitTrace(logits=logits, labels=torch.tensor([0, 0]), exit_layers=[1, 2, 3], num_layers=3)
    assert replay({"type": "oracle", "mode": "consistent"}, trace)[0].tolist() == [0, 0]
    assert replay({"type": "oracle"}, trace)[0].tolist() == [0, 2]


def test_exit_distribution_sums_to_one_under_force_last():
    z = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3
    p = exit_log_distribution(z, "force_last").exp()
    torch.testing.assert_close(p.sum(1), torch.ones(50), atol=1e-5, rtol=0)
    lam = torch.sigmoid(z).numpy().astype(np.float64)
    brute = np.zeros_like(lam)
    for i in range(7):
        brute[:, i] = (lam[:, i] if i < 6 else 1.0) * np.prod(1 - lam[:, :i], axis=1)
    np.testing.assert_allclose(p.numpy(), brute, atol=1e-6)


def test_epsilon_truncation_replaces_tail():
    z = torch.tensor([[3.0, 3.0, 3.0, 3.0, 3.0]])
    p = exit_log_distribution(z, "epsilon", epsilon=0.05).exp()[0]
    lam = 1 / (1 + np.exp(-3.0))
    cdf = np.cumsum([lam * (1 - lam) ** i for i in range(5)])
    first = int(np.argmax(cdf > 0.95))
    np.testing.assert_allclose(p[first + 1:].numpy(), 0.05 / 5, rtol=1e-5)
    np.testing.assert_allclose(p[: first + 1].numpy(), [lam * (1 - lam) ** i for i in range(first + 1)], rtol=1e-5)


@pytest.mark.parametrize("direction", ["prior_to_model", "model_to_prior"])
def test_kl_matches_numpy(direction):
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    logp = exit_log_distribution(z, "force_last")
    prior = geometric_prior(5, 0.2)
    kl = ponder_kl(logp, prior, direction).numpy()
    p, q = logp.exp().double().numpy(), prior.double().numpy()
    assert abs(q.sum() - 1) < 1e-6 and np.isclose(q[0], 0.2) and np.isclose(q[1], 0.2 * 0.8)
    brute = [(q * np.log(q / pr)).sum() if direction == "prior_to_model" else (pr * np.log(pr / q)).sum() for pr in p]
    np.testing.assert_allclose(kl, brute, rtol=1e-4, atol=1e-6)


def test_q_exit_picks_first_layer_with_cdf_above_q():
    g = torch.Generator().manual_seed(5)
    lam = torch.rand(200, 6, generator=g) * 0.6
    for q in (0.2, 0.5, 0.8):
        trace = ExitTrace(logits=torch.zeros(6, 200, 2), labels=None, exit_layers=list(range(1, 7)), num_layers=6,
                          halting=lam)
        index, _ = replay({"type": "q_exit", "q": q}, trace)
        ln = lam.double().numpy()
        pdist = np.array([[ln[r, i] * np.prod(1 - ln[r, :i]) for i in range(6)] for r in range(200)])
        cdf = np.cumsum(pdist, axis=1)
        expected = [int(np.argmax(c > q)) if (c[:5] > q).any() else 5 for c in cdf]
        assert index.tolist() == expected


def test_patience_counts_per_row_and_regression_rule():
    pol = make_policy("patience", patience=2)
    preds = torch.tensor([[0, 1], [0, 1], [0, 0], [1, 0], [1, 0]])  # (exits, rows) argmax per exit
    state = pol.start(2, 5)
    exited = []
    for k in range(5):
        logits = torch.nn.functional.one_hot(preds[k], 2).float()
        ex, state = pol.decide(k, ExitSignals(logits=logits), state)
        exited.append(ex.tolist())
    assert [e[0] for e in exited][:3] == [False, False, True]  # row 0: same at exits 1, 2 -> cnt 2 at exit 3
    assert [e[1] for e in exited] == [False, False, False, False, True]  # row 1 resets at exit 3
    reg = make_policy("patience", patience=1, regression_tol=0.1)
    state = reg.start(1, 3)
    out = []
    for v in (0.5, 0.55, 0.9):
        ex, state = reg.decide(len(out), ExitSignals(logits=torch.tensor([[v]])), state)
        out.append(bool(ex))
    assert out == [False, True, False]


@pytest.mark.parametrize("spec", [("max_prob", {"threshold": 1.5}), ("margin", {"threshold": -0.1}),
                                  ("entropy", {"threshold": -1.0}), ("q_exit", {"q": 1.0}),
                                  ("patience", {"patience": -1}), ("static", {"layer": 0})])
def test_threshold_out_of_range(spec):
    with pytest.raises(ValueError, match=spec[0].split("_")[0]):
        make_policy(spec[0], **spec[1])


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="unknown policy 'bogus'.*entropy"):
        make_policy("bogus")


def test_an_unknown_policy_name_suggests_the_closest_one():
    from offramp.policies import make_policy

    with pytest.raises(ValueError, match=r"unknown policy 'entropi'; did you mean 'entropy'\?"):
        make_policy("entropi")
    with pytest.raises(ValueError, match=r"unknown policy 'zzz'; known policies") as e:
        make_policy("zzz")
    assert "did you mean" not in str(e.value)


def test_a_rule_named_without_its_setting_is_the_stored_one_or_an_error():
    """A bare rule name never silently takes the rule's default setting: it is the checkpoint's
    stored (calibrated) policy when that is the rule, and an error naming the fix otherwise."""
    from offramp.policies import named_or_stored

    stored = {"type": "entropy", "threshold": 0.123}
    assert named_or_stored("entropy", stored).threshold == 0.123
    assert named_or_stored(None, stored).threshold == 0.123
    assert named_or_stored({"type": "entropy", "threshold": 0.5}, stored).threshold == 0.5
    assert named_or_stored("never", stored).type == "never"  # a rule without a setting
    with pytest.raises(ValueError, match=r"policy 'max_prob' needs its threshold.*offramp calibrate --policy max_prob"):
        named_or_stored("max_prob", stored)


def test_predict_and_the_cli_refuse_a_bare_rule_the_checkpoint_does_not_store(tiny_bert, tmp_path, capsys):
    from offramp import EarlyExitModel, OfframpConfig

    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=3, policy={"type": "entropy",
                                                                                        "threshold": 0.2}))
    ids, mask = make_batch(4, 6)
    stored = model.predict(ids, mask, policy={"type": "entropy", "threshold": 0.2})
    assert torch.equal(model.predict(ids, mask, policy="entropy").exit_index, stored.exit_index)
    with pytest.raises(ValueError, match="policy 'patience' needs its patience"):
        model.predict(ids, mask, policy="patience")
