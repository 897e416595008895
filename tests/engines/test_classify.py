"""The classify engine: never-exit equals the plain model, per-row exits, hooks prove skipped compute."""

from __future__ import annotations

import pytest
import torch
from encoders import make_batch

from offramp import EarlyExitModel, OfframpConfig
from offramp.backbones import adapter_for


def _model(backbone, **cfg) -> EarlyExitModel:
    torch.manual_seed(1)
    return EarlyExitModel.from_backbone(backbone, OfframpConfig(num_labels=3, **cfg)).eval()


def _ordinary(model: EarlyExitModel, backbone, ids, mask) -> torch.Tensor:
    """Plain HF forward + the last exit's classifier, the ordinary way."""
    out = backbone(input_ids=ids, attention_mask=mask)
    pooler = model.adapter.pooler()
    if model.config.head["pooling"] == "mean":
        m = mask.unsqueeze(-1).float()
        pooled = (out.last_hidden_state * m).sum(1) / m.sum(1)
    elif pooler is not None and model.config.head["use_pooler"]:
        pooled = out.pooler_output
    else:
        pooled = out.last_hidden_state[:, 0]
    return model.classifiers(model.num_exits - 1, pooled)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_never_exit_equals_plain_backbone(encoder, pooling):
    name, backbone = encoder
    model = _model(backbone, head={"pooling": pooling})
    ids, mask = make_batch(6, 10)
    pred = model.predict(ids, mask, "never")
    with torch.no_grad():
        ref = _ordinary(model, backbone, ids, mask)
    torch.testing.assert_close(pred.logits, ref, atol=1e-5, rtol=0)
    assert pred.exit_layer.tolist() == [model.num_layers] * 6


def _mixed_threshold(model, ids, mask) -> float:
    """A max-prob threshold that makes rows exit at different exits."""
    with torch.no_grad():
        conf = model(ids, mask).exit_logits.softmax(-1).amax(-1)  # (E, b)
    best = conf[:-1].max(0).values.sort().values
    mid = best.numel() // 2
    return float((best[mid - 1] + best[mid]) / 2)  # between two rows' values: no row sits on the boundary


def test_row_result_is_independent_of_its_batch(encoder):
    name, backbone = encoder
    model = _model(backbone)
    ids, mask = make_batch(16, 12, seed=3)
    policy = {"type": "max_prob", "threshold": _mixed_threshold(model, ids, mask)}
    batch = model.predict(ids, mask, policy)
    assert len(set(batch.exit_layer.tolist())) >= 2, "the test needs rows exiting at different layers"
    for r in range(16):
        n = int(mask[r].sum())
        alone = model.predict(ids[r:r + 1, :n], mask[r:r + 1, :n], policy)
        assert alone.exit_layer.item() == batch.exit_layer[r].item()
        torch.testing.assert_close(alone.logits[0], batch.logits[r], atol=1e-5, rtol=0)


def test_hooks_prove_rows_never_run_past_their_exit(encoder):
    name, backbone = encoder
    model = _model(backbone)
    ids, mask = make_batch(16, 12, seed=4)
    policy = {"type": "max_prob", "threshold": _mixed_threshold(model, ids, mask)}
    calls: list[int] = []  # rows in each layer call, in call order
    handles = [m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
               for m in adapter_for(backbone).layer_modules()]
    try:
        pred = model.predict(ids, mask, policy)
    finally:
        for h in handles:
            h.remove()
    if name == "albert":  # one shared module: one call per application
        assert len(calls) == int(pred.exit_layer.max())
    expected = [int((pred.exit_layer > i).sum()) for i in range(int(pred.exit_layer.max()))]
    assert calls == expected, f"rows per layer {calls} != rows still running {expected}"
    assert sum(calls) < 16 * model.num_layers


def test_exit_subset_stops_at_last_exit(tiny_bert):
    model = _model(tiny_bert, exit_layers=[1, 3])
    calls = []
    handles = [m.register_forward_hook(lambda mod, inp, out: calls.append(1)) for m in tiny_bert.encoder.layer]
    ids, mask = make_batch(4, 8)
    try:
        pred = model.predict(ids, mask, "never")
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 3 and pred.exit_layer.tolist() == [3] * 4


def test_shared_head_and_batch_size_one(tiny_bert):
    model = _model(tiny_bert, head={"shared": True})
    assert len(model.classifiers.linears) == 1
    ids, mask = make_batch(1, 8)
    pred = model.predict(ids, mask, {"type": "static", "layer": 2})
    assert pred.exit_layer.tolist() == [2]
    with torch.no_grad():
        out = model(ids, mask)
    torch.testing.assert_close(pred.logits, out.exit_logits[1], atol=1e-5, rtol=0)
