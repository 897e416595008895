"""JEI-DNN: gate targets, positive weights, exit probabilities and the IM loss against brute force."""

import math

import pytest
import torch

from offramp.objectives.jei import (
    check_jei_options,
    exit_probabilities,
    gate_loss,
    gate_pos_weights,
    gate_targets,
    im_loss,
)

# a hand-made batch: 3 exits, 5 rows
CE = torch.tensor([[0.10, 2.00, 0.90, 0.70, 3.0],
                   [0.05, 0.30, 0.50, 0.69, 2.0],
                   [0.01, 0.20, 0.10, 0.20, 1.1]])  # (E, b)
COSTS = torch.tensor([1 / 3, 2 / 3, 1.0])
GATES = torch.tensor([[0.9, 0.5, 0.2],
                      [0.3, 0.6, 0.9],
                      [0.1, 0.1, 0.7],
                      [0.05, 0.02, 0.4],
                      [0.5, 0.5, 0.5]])  # (b, E); the last column is ignored (g_E = 1)


def _brute_targets(lam):
    targets, best = [], []
    for b in range(CE.shape[1]):
        losses = [float(CE[e, b]) + lam * float(COSTS[e]) for e in range(3)]
        star = min(range(3), key=lambda e: (losses[e], e))
        best.append(star)
        targets.append([1.0 if e >= star else 0.0 for e in range(2)])
    return targets, best


@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
def test_gate_targets_equal_brute_force(lam):
    targets, best = gate_targets(CE, COSTS, lam)
    want_t, want_b = _brute_targets(lam)
    assert best.tolist() == want_b
    assert targets.tolist() == want_t
    assert (best <= gate_targets(CE, COSTS, 0.0)[1]).all()  # a larger lambda never exits later


def test_targets_change_with_lambda():
    assert gate_targets(CE, COSTS, 0.0)[1].tolist() != gate_targets(CE, COSTS, 0.5)[1].tolist()


def test_pos_weights_and_weighted_bce_equal_brute_force():
    targets, _ = gate_targets(CE, COSTS, 0.5)
    w = gate_pos_weights(targets, clip=5.0, mode="balanced")
    for l in range(2):
        pos = sum(t[l] for t in targets.tolist())
        neg = len(targets) - pos
        want = 5.0 if pos == 0 else min(neg / pos, 5.0)
        assert w[l].item() == pytest.approx(want)
    assert gate_pos_weights(torch.tensor([[1.0, 1.0]] + [[0.0, 0.0]] * 9), mode="balanced").tolist() == [5.0, 5.0]
    assert gate_pos_weights(torch.zeros(4, 2), mode="balanced").tolist() == [5.0, 5.0]  # no positive: the clip
    assert gate_pos_weights(targets, mode="none").tolist() == [1.0, 1.0]
    _, best = gate_targets(CE, COSTS, 0.5)
    exact = gate_pos_weights(targets, clip=5.0, mode="exact")  # the paper's code: rows whose l* is this gate
    for l in range(2):
        count = max(sum(int(b == l) for b in best.tolist()), 0.1)
        assert exact[l].item() == pytest.approx(min((len(best) - count) / count, 5.0))
    z = torch.logit(GATES[:, :2])
    loss = gate_loss(z, targets, w)
    total = 0.0
    for b in range(5):
        for l in range(2):
            t, g = float(targets[b, l]), float(GATES[b, l])
            total += -(float(w[l]) * t * math.log(g) + (1 - t) * math.log(1 - g))
    assert loss.item() == pytest.approx(total / 10, rel=1e-5)


def _brute_p():
    out = []
    for row in GATES.tolist():
        g = row[:-1] + [1.0]
        ps, acc = [], 0.0
        for gl in g:
            ps.append(max(0.0, min(gl, 1.0 - acc)))
            acc += gl
        out.append(ps)
    return out


def test_exit_probabilities_equal_brute_force():
    p = exit_probabilities(GATES)
    assert p.flatten().tolist() == pytest.approx(sum(_brute_p(), []))
    assert p[0].tolist() == pytest.approx([0.9, 0.1, 0.0])  # min(0.5, 0.1); nothing left at the end
    assert (p.sum(1) <= 1 + 1e-6).all()


def test_im_loss_weights_equal_brute_force():
    p = torch.tensor(_brute_p())
    ce = CE.clone().requires_grad_(True)
    loss = im_loss(ce, p)
    total, grads = 0.0, []
    for b in range(5):
        col = [float(CE[e, b]) for e in range(3)]
        wsum = sum(p[b, e].item() * col[e] for e in range(3))
        ratio = sum(col) / wsum
        total += wsum * ratio
        grads.append([p[b, e].item() * ratio / 5 for e in range(3)])
    assert loss.item() == pytest.approx(total / 5, rel=1e-5)
    loss.backward()
    # the weights redistribute the gradient to the exits with P mass, magnitude kept per row
    assert ce.grad.transpose(0, 1).flatten().tolist() == pytest.approx(sum(grads, []), rel=1e-5)
    assert ce.grad[2, 0].item() == 0.0  # row 0 has no exit mass at the last exit


def test_undetached_ratio_collapses_to_plain_sum():
    ce = CE.clone().requires_grad_(True)
    loss = im_loss(ce, torch.tensor(_brute_p()), reweight_detach=False)
    loss.backward()
    assert torch.allclose(ce.grad, torch.full_like(ce, 1 / 5))  # d/dCE of mean_b sum_l CE_l


def test_options_are_validated():
    assert check_jei_options({"cost_weight": 0.3})["phase_batches"] == 200
    with pytest.raises(ValueError, match="unknown keys"):
        check_jei_options({"lambda": 0.3})
    with pytest.raises(ValueError, match="cost_weight"):
        check_jei_options({"cost_weight": -1})
    assert check_jei_options({})["pos_weight"] == "none"
    with pytest.raises(ValueError, match="pos_weight must be one of"):
        check_jei_options({"pos_weight": "auto"})
