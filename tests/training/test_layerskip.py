"""LayerSkip's recipe: schedules, per-row layer dropout, and training that makes the early exits good."""

from __future__ import annotations

import pytest
import torch
from decoder_models import chain_stream, ragged_prompts, tiny_decoder

from offramp.engines.generate import generate
from offramp.modeling import DecoderExitModel
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


def _noised_mamba(family: str, seed: int = 3) -> torch.nn.Module:
    """A tiny Mamba(-2) with noised weights: at HF's init it repeats its last token."""
    lm = tiny_decoder(family, layers=4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in lm.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return lm


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("ragged", [False, True])
def test_token_dropout_is_what_freeze_decoding_computes(family, ragged):
    """Replaying a decoding's exits as token dropout (a token runs the layers it ran, and is taken out
    of the deeper ones) gives, teacher-forced, the logits the ``freeze`` engine decoded with."""
    lm = _noised_mamba(family)
    exits = DecoderExitModel.from_backbone(lm, exit_layers=[1, 2, 3], head="tied")
    if ragged:
        ids, mask = ragged_prompts(3)
    else:
        ids = torch.randint(4, 97, (3, 6), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
    out = generate(exits, ids, mask, policy={"type": "max_prob", "threshold": 0.05}, cache_strategy="freeze",
                   max_new_tokens=16, output_logits=True)
    ran = out.exit_layers > 0  # 0: after EOS
    assert bool((out.exit_layers[ran] < 4).any()) and bool((out.exit_layers[ran] == 4).any())
    inputs = out.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones_like(out.new_tokens)], 1)[:, :-1]
    depths = torch.full(inputs.shape, 4)
    depths[:, ids.shape[1] - 1:] = out.exit_layers  # the token that produced new token j ran exit_layers[j]
    p = ids.shape[1] - 1
    with torch.no_grad(), LayerTaps(lm.backbone.layers, unit="token") as taps:
        taps.depths = depths
        replayed = lm(input_ids=inputs, attention_mask=full_mask).logits[:, p:]
        taps.depths = None
        full = lm(input_ids=inputs, attention_mask=full_mask).logits[:, p:]
    assert torch.allclose(replayed[ran], out.step_logits[ran], atol=1e-4)
    assert not torch.allclose(full[ran], out.step_logits[ran], atol=1e-2)  # the exits did change the decoding


def test_token_dropout_draws_nest_with_depth():
    """Random token dropout: a token dropped at one layer passes every deeper one unchanged, at the
    rates asked, and every forward pass draws again."""
    lm = _noised_mamba("mamba")
    ids = torch.randint(4, 97, (64, 64), generator=torch.Generator().manual_seed(0))
    rates = torch.tensor([0.0, 0.3, 0.6, 0.9])
    passed = []
    with torch.no_grad(), LayerTaps(lm.backbone.layers, unit="token") as taps:
        taps.rates, taps.generator = rates, torch.Generator().manual_seed(5)
        for _ in range(2):
            lm(input_ids=ids)
            same = torch.stack([(taps.outputs[i] == taps.outputs[i - 1]).all(-1) for i in (1, 2, 3)])
            passed.append(same)
    for same in passed:
        assert bool((same[1:].int() >= same[:-1].int()).all())  # nested: once out, out of every deeper layer
        assert (same.float().mean((1, 2)) - rates[1:]).abs().max() < 0.04  # 4096 tokens: sd <= 0.008
    assert not torch.equal(passed[0], passed[1])
    with pytest.raises(ValueError, match="unknown layer-dropout unit 'tokens'"):
        LayerTaps(lm.backbone.layers, unit="tokens")


@pytest.mark.recipe
@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_recipe_trains_the_early_exits(tmp_path, family):
    tokens = chain_stream()
    reports = {}
    for recipe in ("plain", "layerskip"):
        model = tiny_decoder(family, seed=1).train()
        args = LayerSkipArgs(str(tmp_path / recipe), recipe=recipe, max_steps=200, batch_size=8, seq_len=32,
                             lr=1e-2, warmup_steps=5, p_max=0.2, save_every=1000, progress=False)
        state = train_lm(model, tokens, args)
        assert state["step"] == 200 and (tmp_path / recipe / "model.safetensors").is_file()
        reports[recipe] = {e["layer"]: e for e in exit_report(model, chain_stream(seed=0)[:2000], seq_len=64)["exits"]}
    plain, skip = reports["plain"], reports["layerskip"]
    assert skip[4]["perplexity"] < 1.2 * plain[4]["perplexity"]  # the last layer is as good
    assert skip[4]["perplexity"] < 8  # and it learned the chain (97 tokens: 97 at chance)
    assert skip[2]["perplexity"] < 0.85 * plain[2]["perplexity"]  # the early exits are better
    assert skip[3]["agreement"] > plain[3]["agreement"] + 0.05


def _freeze_agreement(model: torch.nn.Module, ids: torch.Tensor, rate: float = 0.5, depth: int = 2) -> float:
    """Teacher-forced: a ``rate`` of the tokens leave after ``depth`` layers (as with ``freeze``); how
    often the others still get the full model's top-1 token."""
    left = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < rate
    with torch.no_grad(), LayerTaps(model.backbone.layers, unit="token") as taps:
        full = model(input_ids=ids).logits.argmax(-1)
        taps.depths = torch.where(left, depth, 4)
        replayed = model(input_ids=ids).logits.argmax(-1)
    return float((replayed == full)[~left].float().mean())


@pytest.mark.recipe
def test_token_dropout_trains_deep_layers_to_do_without_exited_tokens(tmp_path):
    tokens, held = chain_stream(), chain_stream(seed=1)[:2048].view(32, 64)
    agreement = {}
    for unit in ("none", "token"):
        model = tiny_decoder("mamba", seed=1).train()
        args = LayerSkipArgs(str(tmp_path / unit), recipe="plain" if unit == "none" else "layerskip",
                             dropout_unit="row" if unit == "none" else unit, max_steps=150, batch_size=8,
                             seq_len=32, lr=1e-2, warmup_steps=5, p_max=0.5, dropout_curriculum="constant",
                             save_every=1000, progress=False)
        train_lm(model, tokens, args)
        agreement[unit] = _freeze_agreement(model.eval(), held)
    assert agreement["token"] > agreement["none"] + 0.2, agreement


@pytest.mark.recipe
def test_uniform_weighting_trains_the_named_exit_harder(tmp_path):
    """"uniform" weighs exit 1 as much as the last layer; "depth" gives the first layer no weight."""
    tokens, ppl = chain_stream(), {}
    for weighting in ("depth", "uniform"):
        model = tiny_decoder("llama", seed=1).train()
        args = LayerSkipArgs(str(tmp_path / weighting), max_steps=120, batch_size=8, seq_len=32, lr=1e-2,
                             warmup_steps=5, p_max=0.0, exit_layers=[1], curriculum="none", weighting=weighting,
                             save_every=1000, progress=False)
        train_lm(model, tokens, args)
        ppl[weighting] = {e["layer"]: e["perplexity"] for e in exit_report(model, chain_stream()[:2000], seq_len=64)["exits"]}
    assert ppl["uniform"][1] < 0.8 * ppl["depth"][1]
    assert ppl["uniform"][4] < 1.2 * ppl["depth"][4]  # the last layer learns as well


def _one_run(tmp_path, save_every: int) -> tuple[torch.Tensor, dict, torch.nn.Module]:
    """The token stream, the options, and a model trained once for 12 steps without interruption."""
    tokens = chain_stream()
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
        train_lm(model, chain_stream(), LayerSkipArgs(str(tmp_path), recipe="fast"))
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        train_lm(model, chain_stream(), LayerSkipArgs(str(tmp_path), exit_layers=[2, 9]))
    with pytest.raises(ValueError, match="too few"):
        train_lm(model, torch.arange(10), LayerSkipArgs(str(tmp_path), seq_len=32))
    with pytest.raises(ValueError, match="dropout_unit='token'.*use dropout_unit='row'"):
        train_lm(model, chain_stream(), LayerSkipArgs(str(tmp_path), dropout_unit="token"))
    with pytest.raises(ValueError, match="unknown layer-dropout unit"):
        train_lm(model, chain_stream(), LayerSkipArgs(str(tmp_path), dropout_unit="tokens"))
    assert not (tmp_path / "model.safetensors").exists()


def test_checkpoint_is_a_hub_folder_with_tied_exits(tmp_path):
    from transformers import AutoModelForCausalLM

    from offramp.modeling import DecoderExitModel

    model = tiny_decoder("llama")
    train_lm(model, chain_stream(), LayerSkipArgs(str(tmp_path), max_steps=3, batch_size=2, seq_len=16, progress=False))
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
