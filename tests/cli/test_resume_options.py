"""`offramp train --resume` continues a run as it was trained: its stored options are the defaults,
and a flag that contradicts them is an error naming both values."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file
from tiny_assets import write_csv, write_model

from offramp.cli import main
from offramp.training import loop

COMMON = ["--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, write_model(root / "tiny"), write_csv(root / "d.csv", n=48)


def _train(out, model, csv, *extra):
    return main([*COMMON, "train", "--model", str(model), "--data", str(csv), "--out", str(out), "--full",
                 "--epochs", "2", "--lr", "5e-3", "--backbone-lr", "1e-3", "--batch-size", "16", *extra])


def test_resume_of_a_killed_full_run_equals_the_uninterrupted_run(assets, monkeypatch):
    root, model, csv = assets
    assert _train(root / "whole", model, csv) == 0
    real, calls = loop._checkpoint, []

    def killed_after_first_checkpoint(*a, **k):
        real(*a, **k)
        calls.append(1)
        raise KeyboardInterrupt  # the run dies right after epoch 1's checkpoint

    monkeypatch.setattr(loop, "_checkpoint", killed_after_first_checkpoint)
    assert _train(root / "killed", model, csv) == 130
    monkeypatch.setattr(loop, "_checkpoint", real)
    assert calls == [1]
    # no --full, no --lr: the run's own options are used (before: the backbone was re-cached as
    # if frozen and the optimizer state did not fit)
    assert main([*COMMON, "train", "--out", str(root / "killed"), "--resume"]) == 0
    a = load_file(str(root / "whole" / "checkpoint" / "offramp_heads.safetensors"))
    b = load_file(str(root / "killed" / "checkpoint" / "offramp_heads.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    bb_a = load_file(str(root / "whole" / "checkpoint" / "backbone" / "model.safetensors"))
    bb_b = load_file(str(root / "killed" / "checkpoint" / "backbone" / "model.safetensors"))
    moved = max(float((bb_a[k] - bb_b[k]).abs().max()) for k in bb_a)
    assert moved < 1e-5  # the fine-tuned backbone too


def test_a_contradicting_flag_names_both_values(assets, tmp_path, capsys):
    root, model, csv = assets
    assert _train(tmp_path / "run", model, csv, "--epochs", "1") == 0
    capsys.readouterr()
    for flag, stored, given in ((["--lr", "1e-2"], "0.005", "0.01"), (["--halting", "palbert"], "'none'", "'palbert'"),
                                (["--batch-size", "8"], "16", "8"), (["--weights", "pabee"], "'uniform'", "'pabee'")):
        assert main([*COMMON, "train", "--out", str(tmp_path / "run"), "--resume", *flag]) == 2
        err = capsys.readouterr().err
        assert f"this run was trained with {flag[0]} {stored}, not {given}" in err, err
        assert "Loading weights" not in err  # --quiet silences the libraries' bars too
    assert main([*COMMON, "train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "2", "--full"]) == 0


def test_frozen_resume_still_caches_and_extends(assets, tmp_path):
    root, model, csv = assets
    out = tmp_path / "frozen"
    assert main([*COMMON, "train", "--model", str(model), "--data", str(csv), "--out", str(out), "--epochs", "1",
                 "--batch-size", "16"]) == 0
    shutil.copytree(out, tmp_path / "copy")
    assert main([*COMMON, "train", "--out", str(out), "--resume", "--epochs", "2"]) == 0
    import json

    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    stored = json.loads((out / "checkpoint" / "offramp_config.json").read_text())["extra"]["train"]
    assert stored["full"] is False and stored["epochs"] == 2


def test_resume_chooses_the_selected_rule_again_and_retires_a_stale_bound(assets, tmp_path, capsys):
    """A resumed run that trains further changes the weights: the rule --select-policy chose is
    chosen again on them, and a bound offramp calibrate certified is no longer claimed."""
    import json

    _, model, csv = assets
    out = tmp_path / "run"
    assert _train(out, model, csv, "--select-policy", "entropy,max_prob", "--select-tolerance", "0.5") == 0
    config_path = out / "checkpoint" / "offramp_config.json"
    config = json.loads(config_path.read_text())
    assert config["extra"]["selected"]["epochs"] == 2
    assert main([*COMMON, "calibrate", "--model", str(out), "--split", "validation", "--policy", "entropy",
                 "--delta", "0.5", "--epsilon", "0.5"]) == 0
    assert "calibration" in json.loads(config_path.read_text())["extra"]
    capsys.readouterr()
    assert main(["--threads", "1", "train", "--out", str(out), "--resume", "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    extra = json.loads(config_path.read_text())["extra"]
    assert extra["selected"]["epochs"] == 3 and extra["selected"]["rules"] == ["entropy", "max_prob"]
    assert "calibration" not in extra and "stale_calibration" in extra
    assert "calibrated on the earlier weights" in err and "chosen again" in err
    capsys.readouterr()
    assert main(["--threads", "1", "train", "--out", str(out), "--resume", "--epochs", "3"]) == 0  # nothing to train
    assert "earlier weights" not in capsys.readouterr().err


def test_train_by_default_stops_on_validation_with_the_epochs_as_a_cap(assets, tmp_path):
    """Without --epochs, training runs until --patience (3) epochs bring no better validation score,
    at most 30 epochs (frozen backbone); both are stored with the run."""
    import json

    from offramp.training.loop import stalled

    _, model, csv = assets
    out = tmp_path / "default"
    assert main([*COMMON, "train", "--model", str(model), "--data", str(csv), "--out", str(out), "--lr", "5e-2",
                 "--batch-size", "16"]) == 0
    history = json.loads((out / "metrics.json").read_text())
    stored = json.loads((out / "checkpoint" / "offramp_config.json").read_text())["extra"]["train"]
    assert stored["epochs"] == 30 and stored["patience"] == 3
    assert len(history) < 30 and stalled(history, 3) and not stalled(history[:-1], 3)
