"""The JEI-DNN schedule on a tiny model: warm-up freezing, phases, lambda moves the exits."""

import torch
from conftest import make_batch

from offramp import EarlyExitModel, OfframpConfig
from offramp.policies.gate import GatePolicy
from offramp.training.jei import JEIArgs, jei_config, train_jei


def _data(n_batches, seed):
    batches = []
    for k in range(n_batches):
        ids, mask = make_batch(16, 8, seed=seed + k)
        ids[:, 0] = 3 + torch.arange(16) % 6  # the first token (of 6) sets the label
        labels = (ids[:, 0] % 3).long()
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _train(backbone, lam, tmp_path, **options):
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(backbone, OfframpConfig(num_labels=3, **jei_config(lam, **options)))
    args = JEIArgs(output_dir=str(tmp_path / f"lam{lam}{len(options)}"), epochs=6, warmup_epochs=4, patience=1,
                   phase_batches=2, lr=1e-2, gate_lr=5e-2)
    return model, train_jei(model, _data(6, 0), _data(3, 100), args)


def test_schedule_and_lambda_trade_off(tiny_bert, tmp_path):
    cheap, hist_cheap = _train(tiny_bert, 5.0, tmp_path)
    # the same cost weight with costs made to fall with depth sends every row to the last exit
    late, hist_late = _train(tiny_bert, 5.0, tmp_path, costs=[4.0, 3.0, 2.0, 1.0])
    stages = [h["stage"] for h in hist_cheap["history"]]
    assert stages[0] == "warmup" and stages[-1] == "alternate"
    assert hist_cheap["costs"][-1] == 1.0 and hist_cheap["costs"][0] < hist_cheap["costs"][1]
    assert any(any(h.get("frozen", [])) for h in hist_cheap["history"])  # warm-up froze exits
    assert hist_cheap["history"][-1]["accuracy"] > 0.6  # the exits learned the task
    assert hist_cheap["history"][-1]["exit_counts"] == [48, 0, 0, 0]  # cheap first exit: all go there
    assert hist_late["history"][-1]["exit_counts"] == [0, 0, 0, 48]
    ids, mask = make_batch(16, 8, seed=7)
    loaded = EarlyExitModel.from_pretrained(hist_cheap["checkpoint"])
    assert loaded.config.objective["cost_weight"] == 5.0
    assert loaded.predict(ids, mask, GatePolicy()).exit_index.tolist() == \
        cheap.predict(ids, mask, GatePolicy()).exit_index.tolist()


def test_generic_loss_trains_heads_and_gates_separately(tiny_bert):
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=3, **jei_config(0.2)))
    model.freeze_backbone(True)
    batch = _data(1, 0)[0]
    out = model(**batch)  # objective "jei", phase "both": reweighted IM loss + gate BCE
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.gates.weight.grad is not None and model.gates.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.classifiers.parameters())
    warm = model.forward_pooled(model.pooled_states(batch["input_ids"], batch["attention_mask"]))
    from offramp.objectives.jei import jei_loss

    loss = jei_loss(model, warm, batch["labels"], phase="warmup")
    model.zero_grad()
    loss.backward()
    assert model.gates.weight.grad is None or model.gates.weight.grad.abs().sum() == 0


def test_interrupted_schedule_resumes_to_the_same_result(tiny_bert, tmp_path):
    import pytest

    def run(out, epochs, resume=False):
        torch.manual_seed(0)
        model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=3, **jei_config(0.5)))
        args = JEIArgs(output_dir=str(out), epochs=epochs, warmup_epochs=2, patience=1, phase_batches=2, lr=1e-2,
                       gate_lr=5e-2, save_backbone=False, resume=resume)
        return model, train_jei(model, _data(4, 0), _data(2, 100), args)

    whole, hist_whole = run(tmp_path / "whole", 3)
    run(tmp_path / "cut", 1)  # stopped after one epoch of the alternating stage
    again, hist_again = run(tmp_path / "cut", 3, resume=True)
    assert hist_again["history"] == hist_whole["history"]
    for k, v in whole.head_state_dict().items():
        torch.testing.assert_close(again.head_state_dict()[k], v, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no JEI checkpoint"):
        run(tmp_path / "none", 2, resume=True)
