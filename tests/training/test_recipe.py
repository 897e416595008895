"""The early-exit recipe through the Hugging Face Trainer: a saved folder that AutoModelForCausalLM
and offramp's exits both load, resumed runs, checks before training, exits that agree with the
last layer more than without the recipe, and the ``train-lm --model`` command."""

from __future__ import annotations

import json

import pytest
import torch
from commands import cli
from decoder_models import chain_stream, tiny_decoder, tiny_lm_folder
from transformers import AutoModelForCausalLM, TrainingArguments

from offramp.modeling import DecoderExitModel
from offramp.training.layerskip import exit_report
from offramp.training.recipe import EarlyExitObjective, EarlyExitRecipe, EarlyExitTrainer, continue_training


def _args(out, steps: int, **kw) -> TrainingArguments:
    return TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
                             warmup_steps=5, save_steps=kw.pop("save_steps", 1000), report_to=[], use_cpu=True,
                             logging_steps=1000, disable_tqdm=True, seed=0, **kw)


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_trainer_saves_a_folder_both_load_and_resumes(tmp_path, family) -> None:
    model = tiny_decoder(family, seed=1).train()
    recipe = EarlyExitRecipe(exit_layers=[2, 3], distill=0.5, positions=0.5,
                             dropout_unit="token" if family == "mamba" else "row")
    summary = continue_training(model, None, chain_stream(2000), recipe, _args(tmp_path, 6, save_steps=3), seq_len=32)
    assert summary["steps"] == 6 and summary["tokens_seen"] == 6 * 8 * 32 and (tmp_path / "checkpoint-6").is_dir()
    lm = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(lm.get_input_embeddings().weight, model.get_input_embeddings().weight)
    exits = DecoderExitModel.from_pretrained(tmp_path)  # the backbone is the folder itself
    assert exits.exit_layers == [2, 3] and exits.config.policy == {"type": "never"}
    assert exits.config.head == {"type": "tied"} and exits.config.extra["recipe"]["distill"] == 0.5
    assert torch.equal(exits.backbone.get_input_embeddings().weight, model.get_input_embeddings().weight)
    again = DecoderExitModel.from_pretrained(tmp_path / "checkpoint-3")  # every checkpoint holds its exits
    assert again.exit_layers == [2, 3]
    # a longer run resumes from the last checkpoint: 3 more steps, not 9
    resumed = continue_training(tiny_decoder(family, seed=5).train(), None, chain_stream(2000), recipe,
                                _args(tmp_path, 9, save_steps=3), seq_len=32)
    assert resumed["steps"] == 9 and len(resumed["losses"]) <= 1


def test_recipe_options_are_checked_before_training(tmp_path) -> None:
    llama = tiny_decoder("llama")
    for recipe, message in [(EarlyExitRecipe(exit_layers=[0, 2]), "outside 1..4"),
                            (EarlyExitRecipe(weighting="flat"), "weighting 'flat'"),
                            (EarlyExitRecipe(positions=0.0), "positions must be in \\(0, 1\\]"),
                            (EarlyExitRecipe(distill=-1.0), "distill must be a number >= 0"),
                            (EarlyExitRecipe(temperature=0.0), "temperature must be > 0"),
                            (EarlyExitRecipe(p_max=1.0), "p_max"),
                            (EarlyExitRecipe(dropout_unit="token"), "use dropout_unit='row'")]:
        with pytest.raises(ValueError, match=message):
            EarlyExitTrainer(model=llama, args=_args(tmp_path, 1), recipe=recipe)
    with pytest.raises(ValueError, match="fewer than one block of 64"):
        continue_training(llama, None, torch.arange(4, 50), EarlyExitRecipe(), _args(tmp_path, 1), seq_len=64)


def test_the_loss_reads_the_exits_that_are_on_and_drops_layers_only_in_training() -> None:
    model = tiny_decoder("llama", seed=1)
    ids = chain_stream(256).view(4, 64)
    objective = EarlyExitObjective(model, EarlyExitRecipe(exit_layers=[1, 2, 3], curriculum="none", p_max=0.5,
                                                          dropout_curriculum="constant", distill=1.0))
    objective.set_step(0, 10)
    model.eval()
    _, out, per_exit = objective(model, {"input_ids": ids})
    assert torch.allclose(out.logits, model(input_ids=ids).logits)  # no layer dropped in eval mode
    assert per_exit.shape == (4,) and bool((per_exit > 0).all())
    ce_last = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert torch.allclose(per_exit[-1], ce_last, atol=1e-5)
    model.train()
    _, dropped, _ = objective(model, {"input_ids": ids})
    assert not torch.allclose(dropped.logits, out.logits)  # layer dropout acts while training
    labels = ids.clone()
    labels[:, :32] = -100  # positions without a label are read by no exit
    _, _, masked = objective(model.eval(), {"input_ids": ids, "labels": labels})
    assert not torch.allclose(masked, per_exit)
    objective.close()


@pytest.mark.recipe
@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_exits_trained_with_the_recipe_agree_more_with_the_last_layer(tmp_path, family) -> None:
    agreement = {}
    for name, recipe in (("plain", EarlyExitRecipe(e_scale=0.0, p_max=0.0)),
                         ("recipe", EarlyExitRecipe(distill=1.0))):
        model = tiny_decoder(family, seed=1).train()
        continue_training(model, None, chain_stream(), recipe, _args(tmp_path / name, 150), seq_len=32)
        report = exit_report(model.eval(), chain_stream(seed=1)[:2048], seq_len=64)
        agreement[name] = {e["layer"]: e["agreement"] for e in report["exits"]}
    for layer in (2, 3):
        assert agreement["recipe"][layer] > agreement["plain"][layer], agreement


def test_train_lm_model_continues_training_through_the_trainer(tmp_path, capsys) -> None:
    folder, _ = tiny_lm_folder(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{4 + (i * 7 + j * 3) % 90}" for j in range(40)) for i in range(60)))
    out = tmp_path / "run"
    assert cli("train-lm", "--model", folder, "--data", text, "--out", out, "--max-steps", "4", "--seq-len", "16",
               "--exit-layers", "2,3", "--distill", "1", "--exit-positions", "0.5", "--save-every", "2") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 4 and [e["layer"] for e in report["exits"]] == [2, 3, 4]
    assert report["recipe"]["distill"] == 1.0 and report["recipe"]["positions"] == 0.5
    assert json.loads((out / "exit_report.json").read_text())["steps"] == 4
    AutoModelForCausalLM.from_pretrained(out)
    assert DecoderExitModel.from_pretrained(out).exit_layers == [2, 3]
    gen = tmp_path / "g.json"
    assert cli("generate", "--model", out, "--exits", out, "--prompt", "w5 w6 w7", "--max-new-tokens", "4",
               "--json", gen) == 0
    assert json.loads(gen.read_text())["rows"][0]["tokens"]
    for argv, message in [(["--model", folder], "--out DIR"),
                          (["--distill", "1"], "options of continued training"),
                          (["--model", folder, "--out", out, "--data", tmp_path / "none.txt"], "neither `bbc` nor")]:
        assert cli("train-lm", *argv) == 2
        assert message in capsys.readouterr().err
