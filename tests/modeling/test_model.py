"""EarlyExitModel: save/load, bad input, regression, training loop with atomic checkpoints and resume."""

from __future__ import annotations

import json

import pytest
import torch
from encoders import make_batch
from transformers import GPT2Config, GPT2Model

from offramp import EarlyExitModel, OfframpConfig
from offramp.config import CONFIG_NAME
from offramp.training import TrainingArgs, evaluate_exits, train


def _batches(n_batches=6, b=8, seed=0, num_labels=3):
    out = []
    for i in range(n_batches):
        ids, mask = make_batch(b, 10, seed=seed + i)
        labels = (ids[:, 0] % num_labels) if num_labels > 1 else (ids[:, 0] % 7).float() / 7  # learnable
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_save_load_round_trip(tiny_bert, tmp_path):
    torch.manual_seed(0)
    cfg = OfframpConfig(num_labels=3, exit_layers=[2, 3, 4], halting={"type": "palbert", "variant": "rnn"},
                        objective={"type": "ponder", "kl_direction": "model_to_prior"},
                        policy={"type": "q_exit", "q": 0.4}, label_names=["a", "b", "c"])
    model = EarlyExitModel.from_backbone(tiny_bert, cfg).eval()
    model.save_pretrained(tmp_path / "m")
    again = EarlyExitModel.from_pretrained(tmp_path / "m")
    assert again.config.to_dict() == model.config.to_dict()
    ids, mask = make_batch(8, 9)
    a, b = model.predict(ids, mask), again.predict(ids, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_layer, b.exit_layer)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).halting_probs, again(ids, mask).halting_probs)


def test_bad_checkpoints(tmp_path, tiny_bert):
    with pytest.raises(ValueError, match="not an offramp checkpoint"):
        EarlyExitModel.from_pretrained(tmp_path)
    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=2))
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    data["format_version"] = 99
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format 99"):
        EarlyExitModel.from_pretrained(tmp_path / "m")


def test_bad_input(tiny_bert):
    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=3)).eval()
    with pytest.raises(ValueError, match="empty batch"):
        model.predict(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="empty input"):
        model.predict(torch.zeros(2, 0, dtype=torch.long))
    ids, mask = make_batch(2, 5)
    mask[1] = 0
    with pytest.raises(ValueError, match="all zeros"):
        model.predict(ids, mask)
    with pytest.raises(ValueError, match="labels out of range"):
        model(ids, torch.ones_like(ids), labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="no tokenizer"):
        model.encode(["hello"])
    with pytest.raises(ValueError, match="exit_layers"):
        EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=2, exit_layers=[2, 9]))
    with pytest.raises(ValueError, match="unsupported encoder model_type 'gpt2'.*bert"):
        EarlyExitModel.from_backbone(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)), OfframpConfig())
    with pytest.raises(ValueError, match="head: unknown keys"):
        OfframpConfig(head={"poolng": "cls"})
    with pytest.raises(ValueError, match="needs a halting layer"):
        OfframpConfig(objective={"type": "ponder"})


def test_empty_text_is_refused(tiny_bert):
    import os
    import tempfile

    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory() as d:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]
        with open(os.path.join(d, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab))
        tok = BertTokenizerFast(os.path.join(d, "vocab.txt"))
    model = EarlyExitModel(tiny_bert, OfframpConfig(num_labels=2), tokenizer=tok).eval()
    with pytest.raises(ValueError, match="empty text at position"):
        model.encode(["good", "  "])
    with pytest.raises(ValueError, match="empty batch"):
        model.encode([])
    assert model.predict(**model.encode(["good", "bad bad"])).logits.shape == (2, 2)


@pytest.mark.parametrize("objective,halting", [({"type": "joint", "weights": "pabee", "distill": 0.5}, None),
                                               ({"type": "ponder"}, {"type": "pondernet"})])
def test_training_lowers_loss_and_resumes(tiny_bert, tmp_path, objective, halting):
    import copy

    backbone = copy.deepcopy(tiny_bert)
    model = EarlyExitModel.from_backbone(backbone, OfframpConfig(num_labels=3, objective=objective, halting=halting))
    data = _batches()
    before = evaluate_exits(model, data)
    args = TrainingArgs(output_dir=str(tmp_path / "run"), epochs=2, lr=3e-3, frozen_backbone=False,
                        progress=False)
    result = train(model, data, data[:2], args)
    hist = result["history"]
    assert len(hist) == 2 and hist[1]["train_loss"] < hist[0]["train_loss"]
    assert evaluate_exits(model, data)["accuracy_last"] >= before["accuracy_last"]
    ckpt = tmp_path / "run" / "checkpoint"
    assert (ckpt / CONFIG_NAME).is_file() and (ckpt / "training_state.pt").is_file()
    # resume: one more epoch continues from epoch 2, history kept
    args3 = TrainingArgs(output_dir=str(tmp_path / "run"), epochs=3, lr=3e-3, frozen_backbone=False,
                         progress=False, resume=True)
    model2 = EarlyExitModel.from_backbone(copy.deepcopy(tiny_bert), OfframpConfig(
        num_labels=3, objective=objective, halting=halting))
    hist3 = train(model2, data, data[:2], args3)["history"]
    assert [h["epoch"] for h in hist3] == [1, 2, 3] and hist3[:2] == hist


def test_frozen_backbone_trains_exits_only(tiny_bert, tmp_path):
    import copy

    backbone = copy.deepcopy(tiny_bert)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = EarlyExitModel.from_backbone(backbone, OfframpConfig(num_labels=3))
    head_before = model.classifiers.linears[0].weight.clone()
    train(model, _batches(2), None, TrainingArgs(output_dir=str(tmp_path / "r"), epochs=1, progress=False,
                                                 save_backbone=False))
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not torch.equal(head_before, model.classifiers.linears[0].weight)
    assert not (tmp_path / "r" / "checkpoint" / "backbone").exists()


def test_interrupted_save_keeps_previous_checkpoint(tiny_bert, tmp_path, monkeypatch):
    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=3)).eval()
    model.save_pretrained(tmp_path / "m", save_backbone=False)
    good = (tmp_path / "m" / CONFIG_NAME).read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("offramp.modeling.base.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "m", save_backbone=False)
    assert (tmp_path / "m" / CONFIG_NAME).read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_regression_exits(tiny_bert, tmp_path):
    import copy

    model = EarlyExitModel.from_backbone(copy.deepcopy(tiny_bert), OfframpConfig(num_labels=1))
    data = _batches(num_labels=1)
    hist = train(model, data, data[:2], TrainingArgs(output_dir=str(tmp_path / "r"), epochs=2, lr=3e-3,
                                                     progress=False, save_backbone=False))["history"]
    assert "mse_last" in hist[-1] and hist[-1]["train_loss"] < hist[0]["train_loss"]
    pred = model.predict(data[0]["input_ids"], data[0]["attention_mask"],
                         {"type": "patience", "patience": 1, "regression_tol": 0.05})
    assert pred.logits.shape == (8, 1)


def test_cached_backbone_training_equals_plain_frozen_training(tiny_bert, tmp_path):
    import copy

    results = []
    for cache in (False, True):
        torch.manual_seed(0)
        model = EarlyExitModel.from_backbone(copy.deepcopy(tiny_bert), OfframpConfig(
            num_labels=3, head={"dropout": 0.0}, halting={"type": "palbert", "dropout": 0.0},
            objective={"type": "ponder"}))
        train(model, _batches(3), None, TrainingArgs(output_dir=str(tmp_path / f"c{cache}"), epochs=2, lr=1e-2,
                                                     progress=False, save_backbone=False, cache_backbone=cache))
        results.append(model.head_state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)


def test_atomic_writes_use_usual_permissions(tmp_path):
    import os
    import stat

    from offramp.utils import atomic_dir, atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
