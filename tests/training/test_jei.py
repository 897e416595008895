"""The JEI-DNN schedule on a tiny model: warm-up freezing, phases, lambda moves the exits."""

import warnings

import torch
from encoders import labelled_batches, make_batch
from transformers import BertConfig, BertModel

from offramp import EarlyExitModel, OfframpConfig
from offramp.policies.gate import GatePolicy
from offramp.training.jei import JEIArgs, jei_config, train_jei


def _train(backbone, lam, tmp_path, **options):
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(backbone, OfframpConfig(num_labels=3, **jei_config(lam, **options)))
    args = JEIArgs(output_dir=str(tmp_path / f"lam{lam}{len(options)}"), epochs=6, warmup_epochs=4, patience=1,
                   phase_batches=2, lr=1e-2, gate_lr=5e-2)
    return model, train_jei(model, labelled_batches(6, 0), labelled_batches(3, 100), args)


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
    batch = labelled_batches(1, 0)[0]
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
        return model, train_jei(model, labelled_batches(4, 0), labelled_batches(2, 100), args)

    whole, hist_whole = run(tmp_path / "whole", 3)
    run(tmp_path / "cut", 1)  # stopped after one epoch of the alternating stage
    again, hist_again = run(tmp_path / "cut", 3, resume=True)
    assert hist_again["history"] == hist_whole["history"]
    for k, v in whole.head_state_dict().items():
        torch.testing.assert_close(again.head_state_dict()[k], v, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no JEI checkpoint"):
        run(tmp_path / "none", 2, resume=True)


E, D = 4, 16


def _depth_task(n: int, seed: int) -> list[dict]:
    """Pooled states (E, b, D) in batches of 64: row r carries its class from exit k_r on (k_r uniform)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    first = torch.randint(0, E, (n,), generator=g)
    direction = torch.randn(D, generator=torch.Generator().manual_seed(123))
    direction /= direction.norm()
    x = torch.randn(E, n, D, generator=g) * 0.5
    for i in range(E):
        x[i] += ((i >= first).float() * 2.0 * (2 * y - 1).float())[:, None] * direction
    return [{"pooled": x[:, j:j + 64], "labels": y[j:j + 64]} for j in range(0, n, 64)]


def _mean_exit_layer(lam: float, tmp_path, pos_weight: str = "none") -> tuple[float, list[str]]:
    torch.manual_seed(0)
    backbone = BertModel(BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=E, num_attention_heads=4,
                                    intermediate_size=32))
    model = EarlyExitModel(backbone, OfframpConfig(num_labels=2, **jei_config(lam, costs=[1, 2, 3, 4],
                                                                                pos_weight=pos_weight)))
    args = JEIArgs(output_dir=str(tmp_path / f"{pos_weight}{lam}"), epochs=4, warmup_epochs=3, patience=1,
                   phase_batches=4,
                   lr=1e-2, gate_lr=5e-2, save_backbone=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train_jei(model, _depth_task(1024, 0), _depth_task(256, 1), args)["history"]
    return history[-1]["mean_exit_layer"], [str(w.message) for w in caught]


def test_cost_weight_moves_the_exits_from_deep_to_shallow(tmp_path):
    """On a task whose rows need 1 to 4 exits (a quarter each), the mean exit layer falls monotonically
    over lambda 0 -> 2, from (almost) always the last exit to always the first, which is warned."""
    grid = [0.0, 0.2, 0.5, 1.0, 2.0]
    runs = [_mean_exit_layer(lam, tmp_path) for lam in grid]
    layers = [layer for layer, _ in runs]
    assert all(a > b for a, b in zip(layers, layers[1:])), layers
    assert layers[0] >= 3.5 and layers[-1] <= 1.2, layers
    assert any("leave at the first exit" in m for m in runs[-1][1])
    assert not any("leave at the first exit" in m for m in runs[0][1])
    # the balanced positive weights put each gate at its own base rate: lambda moves the exits far less
    balanced = [_mean_exit_layer(lam, tmp_path, "balanced")[0] for lam in (0.0, 2.0)]
    assert balanced[0] - balanced[1] < 0.6 * (layers[0] - layers[-1]), (balanced, layers)
