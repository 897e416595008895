"""The on-disk cache of frozen backbone states: reused exactly, keyed by weights and inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from encoders import build_encoder

from offramp import EarlyExitModel, OfframpConfig
from offramp.evaluation.collect import collect
from offramp.modeling import state_cache
from offramp.modeling.state_cache import pooled_batches, states_key


@pytest.fixture
def bert_backbone():
    return build_encoder("bert").eval()


def _model(bert_backbone):
    torch.manual_seed(0)
    return EarlyExitModel.from_backbone(bert_backbone, OfframpConfig(num_labels=3, head={"pooling": "mean"}))


def _batches(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 90, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


def test_states_are_stored_then_reused(bert_backbone, tmp_path, monkeypatch):
    model, batches = _model(bert_backbone), _batches()
    first = pooled_batches(model, batches, desc="t", show=False, cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    calls = []
    monkeypatch.setattr(model, "pooled_states", lambda **kw: calls.append(1))
    again = pooled_batches(model, batches, desc="t", show=False, cache=tmp_path)
    assert not calls  # read from disk: the backbone did not run
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_key_changes_with_weights_inputs_exits_and_pooling(bert_backbone):
    model, batches = _model(bert_backbone), _batches()
    key = states_key(model, batches)
    assert states_key(model, _batches(seed=1)) != key
    assert states_key(model, batches[:2]) != key
    with torch.no_grad():
        model.backbone.encoder.layer[0].output.dense.bias[0] += 1e-3
    assert states_key(model, batches) != key
    with torch.no_grad():
        model.backbone.encoder.layer[0].output.dense.bias[0] -= 1e-3
    assert states_key(model, batches) == key
    torch.manual_seed(0)
    cls = EarlyExitModel.from_backbone(model.backbone, OfframpConfig(num_labels=3, head={"pooling": "cls"}))
    assert states_key(cls, batches) != key
    sub = EarlyExitModel.from_backbone(model.backbone, OfframpConfig(num_labels=3, exit_layers=[2, 4]))
    assert states_key(sub, batches) != key


def test_a_damaged_cache_file_is_recomputed(bert_backbone, tmp_path):
    model, batches = _model(bert_backbone), _batches()
    first = pooled_batches(model, batches, desc="t", show=False, cache=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    again = pooled_batches(model, batches, desc="t", show=False, cache=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_collect_from_the_cache_equals_collect_from_the_backbone(bert_backbone, tmp_path):
    model, batches = _model(bert_backbone), _batches()
    plain = collect(model, batches, keep_hidden=True)
    pooled_batches(model, batches, desc="t", show=False, cache=tmp_path)  # e.g. what train stored
    cached = collect(model, batches, keep_hidden=True, state_cache=tmp_path)
    assert torch.allclose(plain.logits, cached.logits, atol=1e-6)
    assert torch.allclose(plain.hidden, cached.hidden, atol=1e-6)
    assert torch.equal(plain.labels, cached.labels)


def test_default_root_follows_offramp_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFRAMP_CACHE", str(tmp_path))
    assert state_cache.default_root.__wrapped__() == tmp_path / "states"  # conftest keeps tests private


def test_the_cache_follows_xdg_cache_home_when_offramp_cache_is_unset(monkeypatch, tmp_path):
    monkeypatch.delenv("OFFRAMP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert state_cache.default_root.__wrapped__() == tmp_path / "xdg" / "offramp" / "states"
    monkeypatch.setenv("OFFRAMP_CACHE", str(tmp_path / "mine"))  # offramp's own variable wins
    assert state_cache.default_root.__wrapped__() == tmp_path / "mine" / "states"
    monkeypatch.delenv("OFFRAMP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec: a relative path is ignored
    assert state_cache.default_root.__wrapped__() == Path.home() / ".cache" / "offramp" / "states"
