"""Sweeps over a stored trace: equal to online predict, oracles, Pareto frontier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from offramp import EarlyExitModel, OfframpConfig
from offramp.evaluation.collect import collect, replay
from offramp.evaluation.sweep import SweepPoint, available_rules, exit_space, oracle_exits, pareto, sweep, sweep_rule
from offramp.flops import model_exit_flops
from offramp.policies import make_policy


def _batches(n: int = 48, t: int = 10, seed: int = 0, classes: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 16):
        ids = torch.randint(3, 60, (16, t), generator=g)
        lengths = torch.randint(3, t + 1, (16,), generator=g)
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "labels": torch.randint(0, classes, (16,), generator=g)})
    return out


@pytest.fixture(scope="module")
def model() -> EarlyExitModel:
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64))
    cfg = OfframpConfig(num_labels=3, halting={"type": "palbert"}, objective={"type": "ponder"})
    m = EarlyExitModel.from_backbone(bert, cfg).eval()
    with torch.no_grad():  # spread the exits' confidence so rules exit at different layers
        for i, lin in enumerate(m.classifiers.linears):
            lin.weight.mul_(3.0 * (i + 1))
    return m


@pytest.fixture(scope="module")
def trace(model):
    return collect(model, _batches())


def _online(model, policy) -> tuple[np.ndarray, np.ndarray]:
    idx, logits = [], []
    for b in _batches():
        p = model.predict(b["input_ids"], b["attention_mask"], policy)
        idx.append(p.exit_index)
        logits.append(p.logits)
    return torch.cat(idx).numpy(), torch.cat(logits).numpy()


def test_sweep_points_equal_online_predict(model, trace):
    res = sweep(trace, ["entropy", "max_prob", "patience", "q_exit"], flops=model_exit_flops(model, 8))
    labels = trace.labels.numpy()
    for rule in res.rules:
        pts = res.of(rule)
        assert len(pts) >= 3
        for p in pts[:: max(1, len(pts) // 4)]:
            idx, logits = _online(model, p.policy)
            assert p.metric == pytest.approx(float((logits.argmax(-1) == labels).mean()))
            assert p.mean_exit_layer == pytest.approx(float(np.array(model.exit_layers)[idx].mean()))
            assert p.exit_counts == np.bincount(idx, minlength=4).tolist()
    layers = {p.mean_exit_layer for p in res.of("entropy")}
    assert len(layers) > 2  # the grid spans different depths


def test_full_and_oracles(trace):
    res = sweep(trace, ["entropy"])
    full = res.full["entropy"]
    assert full.mean_exit_layer == 4 and full.speedup_layers == 1
    oracle, consistent = res.oracles
    assert oracle.metric >= full.metric
    assert oracle.mean_exit_layer <= full.mean_exit_layer
    assert consistent.metric == pytest.approx(full.metric)
    for mode in ("correct", "consistent"):
        idx, _ = replay({"type": "oracle", "mode": mode}, trace)
        assert np.array_equal(oracle_exits(trace, mode), idx.numpy())


def test_flops_costs(model, trace):
    flops = model_exit_flops(model, 8)
    res = sweep(trace, ["static"], flops=flops)
    by_layer = {p.value: p for p in res.of("static")}
    assert set(by_layer) == {1, 2, 3, 4}
    assert by_layer[1].mean_flops == pytest.approx(flops.per_exit[0])
    assert by_layer[1].speedup_flops > by_layer[2].speedup_flops > 1.0
    assert res.full_flops == flops.full


def test_pareto_frontier_is_monotone(trace):
    res = sweep(trace, ["entropy", "max_prob", "margin"])
    front = res.frontier()
    costs = [p.mean_exit_layer for p in front]
    metrics = [p.metric for p in front]
    assert costs == sorted(costs) and all(b > a for a, b in zip(metrics, metrics[1:]))
    for p in res.points:  # nothing on the frontier is dominated
        for f in front:
            assert not (p.mean_exit_layer < f.mean_exit_layer and p.metric >= f.metric)


def test_pareto_on_synthetic_points():
    def pt(cost, m):
        return SweepPoint("r", {}, None, None, m, cost, None, 1.0, None, [])
    front = pareto([pt(3, 0.5), pt(1, 0.4), pt(2, 0.4), pt(2, 0.6), pt(4, 0.55)])
    assert [(p.mean_exit_layer, p.metric) for p in front] == [(1, 0.4), (2, 0.6)]


def test_best_within_tolerance(trace):
    res = sweep(trace, ["entropy"])
    best = res.best_within("entropy", tolerance=0.01)
    assert best is not None and best.metric >= res.full["entropy"].metric - 0.01
    assert all(p.mean_exit_layer >= best.mean_exit_layer for p in res.of("entropy")
               if p.metric >= res.full["entropy"].metric - 0.01)


def test_named_rules_merge_and_rules_available(trace):
    res = sweep(trace, {"PALBERT": {"type": "q_exit"}, "PABEE": "patience"}, grids={"PABEE": [1, 2]})
    assert res.rules == ["PALBERT", "PABEE"] and [p.value for p in res.of("PABEE")] == [1, 2]
    other = sweep(trace, ["entropy"], oracle_label="b")
    merged = res.merge(other)
    assert merged.rules == ["PALBERT", "PABEE", "entropy"] and len(merged.oracles) == 4
    assert "q_exit" in available_rules(trace) and "oracle" not in available_rules(trace)
    assert "saturation" not in available_rules(trace)  # no pooled states in this trace
    assert make_policy("patience").sweep_grid(exit_space(trace)) == [1, 2, 3]


def test_every_registered_policy_with_a_threshold_has_a_grid_and_candidates(trace):
    """Adding a policy is one file and one registry line: its grid and calibration candidates come
    with it, so no sweep or calibrator silently leaves it out."""
    from offramp.policies import POLICIES

    space = exit_space(trace)
    for name, cls in POLICIES.items():
        if cls.threshold_field is None:
            continue
        policy = cls() if name != "static" else cls(layer=1)
        grid = policy.sweep_grid(space)
        assert len(grid) >= 2, name
        kept = [v for v in grid if _accepts(policy, v)]
        assert len(kept) >= 2, f"{name}: its own grid is mostly outside its range"
        cands = policy.candidates(space) if name != "static" else None
        if cands is not None:
            assert len(cands) >= 2 and all(_accepts(policy, v if name != "patience" else int(v)) for v in cands), name
    assert set(available_rules(trace)) >= {"static", "max_prob", "entropy", "margin", "patience", "q_exit"}


def _accepts(policy, value) -> bool:
    try:
        policy.with_threshold(value)
        return True
    except ValueError:
        return False


def test_bad_sweep_input(trace, model):
    no_halt = collect(EarlyExitModel.from_backbone(model.backbone, OfframpConfig(num_labels=3)), _batches(16))
    with pytest.raises(ValueError, match="halting"):
        sweep_rule(no_halt, "q", "q_exit")
    with pytest.raises(ValueError, match="unknown metric"):
        sweep(trace, ["entropy"], metric="bleu")
    with pytest.raises(ValueError, match="unknown policy"):
        sweep(trace, ["nonsense"])


def test_timing_alternates_whole_passes_of_full_and_early(model):
    from offramp.evaluation.timing import time_model, time_pair

    t = time_model(model, {"type": "static", "layer": 1}, _batches(32), repeats=2)
    assert t.rows == 32 and t.repeats == 2 and t.full_s > 0 and t.early_s > 0
    assert t.speedup == pytest.approx(t.full_s / t.early_s)
    calls = []
    time_pair(lambda x: calls.append("full"), lambda x: calls.append("early"), _batches(32), warmup=0, repeats=2)
    n = len(_batches(32))
    # a pass runs one callable over every batch (a model's weights stay warm, as in use); the next
    # repeat starts with the other one, so drift of the machine hits both alike
    assert n > 1 and calls == ["full"] * n + ["early"] * n + ["early"] * n + ["full"] * n
    with pytest.raises(ValueError, match="empty"):
        time_pair(lambda x: x, lambda x: x, [])
