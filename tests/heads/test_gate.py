"""JEI-DNN gates: features, the gate exit rule (brute force), engine == trace replay, save/load."""

import math

import pytest
import torch
from encoders import make_batch

from offramp import EarlyExitModel, OfframpConfig
from offramp.evaluation.collect import collect, replay
from offramp.heads.gate import ExitGates, check_gate_config, uncertainty_features
from offramp.policies.base import ExitSignals
from offramp.policies.gate import GatePolicy


def test_features_equal_brute_force():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    u = uncertainty_features(logits)
    for row, feats in zip(logits.softmax(-1).tolist(), u.tolist()):
        s = sorted(row, reverse=True)
        h = -sum(p * math.log(p) for p in row)
        sq = [p * p / sum(q * q for q in row) for p in row]
        h2 = -sum(p * math.log(p) for p in sq)
        assert feats == pytest.approx([s[0], h, s[0] - s[1], h2], rel=1e-5)
    assert not u.requires_grad


def test_gate_loss_never_reaches_the_classifier():
    logits = torch.randn(3, 4, 5, requires_grad=True)  # (E, b, c)
    gates = ExitGates(3)
    with torch.no_grad():
        gates.weight.normal_()
    z = gates(logits)
    assert z.shape == (4, 3) and torch.isinf(z[:, -1]).all()
    z[:, :-1].sum().backward()
    assert logits.grad is None and gates.weight.grad is not None


def _brute_rule(g_rows, threshold=0.5):
    """First l with clip(P_l / prod_{k<l}(1 - a_k), 0, 1) >= threshold, else the last exit."""
    out = []
    for g in g_rows:
        acc, surv, chosen = 0.0, 1.0, len(g) - 1
        for l, gl in enumerate(g[:-1]):
            p = max(0.0, min(gl, 1.0 - acc))
            a = min(max(p / surv, 0.0), 1.0) if surv > 0 else 1.0
            if a >= threshold:
                chosen = l
                break
            acc, surv = acc + gl, surv * (1.0 - a)
        out.append(chosen)
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_gate_rule_equals_brute_force(threshold):
    g = torch.rand(200, 5, generator=torch.Generator().manual_seed(0)) * 0.8
    policy = GatePolicy(threshold)
    state = policy.start(200, 5)
    exit_at = torch.full((200,), 4)
    done = torch.zeros(200, dtype=torch.bool)
    for k in range(4):
        exits, state = policy.decide(k, ExitSignals(logits=torch.zeros(200, 2), layer=k + 1, gate=g[:, k]), state)
        exit_at[exits & ~done] = k
        done |= exits
    assert exit_at.tolist() == _brute_rule(g.tolist(), threshold)
    assert len(set(exit_at.tolist())) >= 3  # the check covers several exits


def test_rule_differs_from_plain_gate_threshold():
    # g = [0.4, 0.45]: P_2 = min(0.45, 0.6) = 0.45, a_2 = 0.45 / 0.6 = 0.75 >= 0.5 although g_2 < 0.5
    assert _brute_rule([[0.4, 0.45, 1.0]]) == [1]


def _gated_model(backbone):
    torch.manual_seed(2)
    cfg = OfframpConfig(num_labels=3, gate={"type": "uncertainty"}, policy={"type": "never"})
    model = EarlyExitModel.from_backbone(backbone, cfg).eval()
    with torch.no_grad():
        model.gates.weight.zero_()
        model.gates.weight[:, 0] = 40.0  # exit on max pi; spread the rows over the exits
        ids, mask = make_batch(16, 12, seed=5)
        conf = model(ids, mask).exit_logits.softmax(-1).amax(-1)  # (E, b)
        model.gates.bias.copy_(-40.0 * conf[:-1].median(1).values - 0.3)
    return model


def test_engine_equals_trace_replay(tiny_bert):
    model = _gated_model(tiny_bert)
    ids, mask = make_batch(16, 12, seed=5)
    policy = GatePolicy(0.5)
    pred = model.predict(ids, mask, policy)
    trace = collect(model, [{"input_ids": ids, "attention_mask": mask}])
    index, logits = replay(policy, trace)
    assert len(set(pred.exit_index.tolist())) >= 2, "rows should exit at different exits"
    assert pred.exit_index.tolist() == index.tolist()
    torch.testing.assert_close(pred.logits, logits, atol=1e-5, rtol=0)
    for r in (0, 7):  # a row alone gives the same exit as inside the batch
        alone = model.predict(ids[r:r + 1], mask[r:r + 1], policy)
        assert alone.exit_index.item() == pred.exit_index[r].item()


def test_save_load_keeps_gates(tiny_bert, tmp_path):
    model = _gated_model(tiny_bert)
    ids, mask = make_batch(8, 10, seed=1)
    model.save_pretrained(tmp_path / "m")
    again = EarlyExitModel.from_pretrained(tmp_path / "m")
    assert again.config.gate["type"] == "uncertainty"
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask).gate_logits, model(ids, mask).gate_logits)
    assert again.predict(ids, mask, GatePolicy()).exit_index.tolist() == \
        model.predict(ids, mask, GatePolicy()).exit_index.tolist()


def test_bad_gate_config_and_threshold():
    with pytest.raises(ValueError, match="unknown keys"):
        check_gate_config({"type": "uncertainty", "hidden": 3})
    with pytest.raises(ValueError, match="gate.type"):
        check_gate_config({"type": "code"})
    with pytest.raises(ValueError, match="gate threshold"):
        GatePolicy(1.5)
    with pytest.raises(ValueError, match="needs exit gates"):
        GatePolicy().decide(0, ExitSignals(logits=torch.zeros(2, 2), layer=1), GatePolicy().start(2, 3))
