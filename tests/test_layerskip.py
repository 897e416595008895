"""LayerSkip's recipe: schedules, per-row layer dropout, and training that makes the early exits good."""

from __future__ import annotations

import pytest
import torch
from decoder_models import tiny_decoder

from offramp.objectives.layerskip import curriculum_mask, early_exit_loss, exit_loss_scales, layer_dropout_rates
from offramp.training.layerskip import LayerSkipArgs, LayerTaps, exit_report, train_lm


def test_layer_dropout_rises_with_depth_and_time():
    rates = layer_dropout_rates(6, 0.2)
    assert float(rates[0]) == 0.0 and abs(float(rates[-1]) - 0.2) < 1e-6
    assert bool((rates[1:] > rates[:-1]).all())
    assert float(layer_dropout_rates(6, 0.2, 0, 100, "exp").max()) == 0.0
    half = layer_dropout_rates(6, 0.2, 50, 100, "exp")
    end = layer_dropout_rates(6, 0.2, 99, 100, "exp")
    assert 0 < float(half[-1]) < float(end[-1]) and torch.allclose(end, rates)
    with pytest.raises(ValueError, match="p_max"):
        layer_dropout_rates(6, 1.0)


def test_exit_scales_and_curricula():
    assert exit_loss_scales([1, 2, 3, 4], 4).tolist() == [0.0, 1.0, 3.0, 6.0]
    assert exit_loss_scales([2, 4], 4, e_scale=0.0).tolist() == [0.0, 3.0]
    assert exit_loss_scales([1, 3, 4], 4, e_scale=0.5, weighting="uniform").tolist() == [0.5, 0.5, 1.0]
    with pytest.raises(ValueError, match="weighting 'flat'; choose one of"):
        exit_loss_scales([4], 4, weighting="flat")
    with pytest.raises(ValueError, match="weighting"):
        LayerSkipArgs("out", weighting="flat").validate(4)
    exits = [1, 2, 3, 4, 5, 6]
    for step in range(3):  # rotational: every early exit is on exactly once per period, the last always
        on = torch.stack([curriculum_mask(exits, 6, s, 100, "rotational", 3) for s in range(step, step + 3)])
        assert on[:, :-1].sum(0).tolist() == [1] * 5 and bool(on[:, -1].all())
    grad = torch.stack([curriculum_mask(exits, 6, s, 100, "gradual") for s in range(100)])
    assert bool((grad[1:].int() >= grad[:-1].int()).all())  # exits only switch on
    assert grad[0].tolist() == [False] * 5 + [True] and bool(grad[50].all())
    loss = early_exit_loss(torch.tensor([5.0, 1.0, 2.0]), torch.tensor([1.0, 3.0, 6.0]),
                           torch.tensor([True, False, True]))
    assert abs(float(loss) - (5 + 12) / 7) < 1e-6


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_taps_record_and_drop_layers(family):
    model = tiny_decoder(family)
    ids = torch.randint(4, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    plain = model(input_ids=ids).logits
    with LayerTaps(model.model.layers if family == "llama" else model.backbone.layers) as taps:
        assert torch.allclose(model(input_ids=ids).logits, plain)
        assert sorted(taps.outputs) == [0, 1, 2, 3]
        taps.rates = torch.tensor([0.0, 1.0, 0.0, 0.0])  # layer 1 dropped for every row
        model(input_ids=ids)
        assert torch.equal(taps.outputs[1], taps.outputs[0])
        taps.rates = torch.tensor([0.0, 0.5, 0.0, 0.0])
        taps.generator = torch.Generator().manual_seed(3)
        model(input_ids=torch.cat([ids] * 8))
        same = (taps.outputs[1] == taps.outputs[0]).flatten(1).all(1)
        assert 0 < int(same.sum()) < 24  # per row: some rows dropped the layer, some ran it
    assert torch.allclose(model(input_ids=ids).logits, plain)  # hooks removed


def _stream(n: int = 6000, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    """A second-order chain: each token follows from the two before it (a fixed random table), with
    a random restart every 50 tokens; the last layer of a tiny model learns it in 200 steps."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(4, vocab, (vocab, vocab), generator=g)
    out = [4, 5]
    for i in range(n - 2):
        out.append(int(table[out[-2], out[-1]]) if i % 50 else int(torch.randint(4, vocab, (1,), generator=g)))
    return torch.tensor(out)


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_recipe_trains_the_early_exits(tmp_path, family):
    tokens = _stream()
    reports = {}
    for recipe in ("plain", "layerskip"):
        model = tiny_decoder(family, seed=1).train()
        args = LayerSkipArgs(str(tmp_path / recipe), recipe=recipe, max_steps=200, batch_size=8, seq_len=32,
                             lr=1e-2, warmup_steps=5, p_max=0.2, save_every=1000, progress=False)
        state = train_lm(model, tokens, args)
        assert state["step"] == 200 and (tmp_path / recipe / "model.safetensors").is_file()
        reports[recipe] = {e["layer"]: e for e in exit_report(model, _stream(seed=0)[:2000], seq_len=64)["exits"]}
    plain, skip = reports["plain"], reports["layerskip"]
    assert skip[4]["perplexity"] < 1.2 * plain[4]["perplexity"]  # the last layer is as good
    assert skip[4]["perplexity"] < 8  # and it learned the chain (97 tokens: 97 at chance)
    assert skip[2]["perplexity"] < 0.85 * plain[2]["perplexity"]  # the early exits are better
    assert skip[3]["agreement"] > plain[3]["agreement"] + 0.05


def test_uniform_weighting_trains_the_named_exit_harder(tmp_path):
    """"uniform" weighs exit 1 as much as the last layer; "depth" gives the first layer no weight."""
    tokens, ppl = _stream(), {}
    for weighting in ("depth", "uniform"):
        model = tiny_decoder("llama", seed=1).train()
        args = LayerSkipArgs(str(tmp_path / weighting), max_steps=120, batch_size=8, seq_len=32, lr=1e-2,
                             warmup_steps=5, p_max=0.0, exit_layers=[1], curriculum="none", weighting=weighting,
                             save_every=1000, progress=False)
        train_lm(model, tokens, args)
        ppl[weighting] = {e["layer"]: e["perplexity"] for e in exit_report(model, _stream()[:2000], seq_len=64)["exits"]}
    assert ppl["uniform"][1] < 0.8 * ppl["depth"][1]
    assert ppl["uniform"][4] < 1.2 * ppl["depth"][4]  # the last layer learns as well


def _one_run(tmp_path, save_every: int) -> tuple[torch.Tensor, dict, torch.nn.Module]:
    """The token stream, the options, and a model trained once for 12 steps without interruption."""
    tokens = _stream()
    common = dict(recipe="layerskip", max_steps=12, batch_size=4, seq_len=16, warmup_steps=2, p_max=0.3,
                  dropout_curriculum="constant", save_every=save_every, progress=False)
    once = tiny_decoder("llama", seed=2)
    train_lm(once, tokens, LayerSkipArgs(str(tmp_path / "once"), **common))
    return tokens, common, once


def test_a_spent_clock_saves_and_the_next_run_resumes(tmp_path):
    tokens, common, once = _one_run(tmp_path, save_every=100)
    out = str(tmp_path / "twice")
    assert train_lm(tiny_decoder("llama", seed=2), tokens, LayerSkipArgs(out, **common, max_minutes=0.0))["step"] == 0
    fresh = tiny_decoder("llama", seed=99)  # other weights: the resumed run must load the saved ones
    assert train_lm(fresh, tokens, LayerSkipArgs(out, **common))["step"] == 12
    for a, b in zip(once.state_dict().values(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_mid_run_matches_one_run(tmp_path, monkeypatch):
    import offramp.training.layerskip as ls

    tokens, common, once = _one_run(tmp_path, save_every=6)
    out = str(tmp_path / "part")
    calls, real = {"n": 0}, ls._windows

    def killed_at_step_seven(*a, **k):  # the run dies after step 6 was saved
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ls, "_windows", killed_at_step_seven)
    with pytest.raises(KeyboardInterrupt):
        train_lm(tiny_decoder("llama", seed=2), tokens, LayerSkipArgs(out, **common))
    monkeypatch.setattr(ls, "_windows", real)
    resumed = tiny_decoder("llama", seed=7)
    assert train_lm(resumed, tokens, LayerSkipArgs(out, **common))["step"] == 12
    for a, b in zip(once.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)


def test_bad_options_are_refused_before_work(tmp_path):
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match="unknown recipe"):
        train_lm(model, _stream(), LayerSkipArgs(str(tmp_path), recipe="fast"))
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        train_lm(model, _stream(), LayerSkipArgs(str(tmp_path), exit_layers=[2, 9]))
    with pytest.raises(ValueError, match="too few"):
        train_lm(model, torch.arange(10), LayerSkipArgs(str(tmp_path), seq_len=32))
    assert not (tmp_path / "model.safetensors").exists()


def test_checkpoint_is_a_hub_folder_with_tied_exits(tmp_path):
    from transformers import AutoModelForCausalLM

    from offramp.modeling import DecoderExitModel

    model = tiny_decoder("llama")
    train_lm(model, _stream(), LayerSkipArgs(str(tmp_path), max_steps=3, batch_size=2, seq_len=16, progress=False))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(4, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)
    exits = DecoderExitModel.from_backbone(loaded, exit_layers=[1, 2, 3], head="tied")
    with torch.no_grad():
        out = exits(ids)
        hidden = loaded(input_ids=ids, output_hidden_states=True).hidden_states[2]
        own_head = loaded.lm_head(loaded.model.norm(hidden))  # the trained model's head after 2 layers
    assert torch.allclose(exits.exit_logits(out.exit_features[1]), own_head, atol=1e-5)
    report = exit_report(loaded, torch.randint(4, 97, (200,)), exit_layers=[1, 2, 3], seq_len=20)
    assert [e["layer"] for e in report["exits"]] == [1, 2, 3, 4] and report["exits"][-1]["agreement"] == 1.0
