"""Training stops on validation: the epochs are a cap, ``patience`` epochs without a better
validation score end the run, and a resumed run stopped early stays stopped."""

from __future__ import annotations

import pytest
import torch
from encoders import labelled_batches

from offramp import EarlyExitModel, OfframpConfig
from offramp.training import TrainingArgs, train
from offramp.training.loop import best_epoch, stalled, validation_score


def _history(scores: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "accuracy_per_exit": [s, s]} for i, s in enumerate(scores)]


def test_stalled_counts_the_epochs_since_the_best_score():
    assert validation_score({"mse_per_exit": [0.5, 1.5]}) == -1.0 and validation_score({"epoch": 1}) is None
    history = _history([0.5, 0.7, 0.7, 0.6])
    assert best_epoch(history) == 2  # the first of equal scores
    assert stalled(history, 2) and not stalled(history, 3)
    assert not stalled(_history([0.5, 0.6, 0.7]), 1) and not stalled([], 1)


def test_training_stops_once_validation_stops_improving(tiny_bert, tmp_path):
    cfg = OfframpConfig(num_labels=3, exit_layers=[2, 4])
    runs = {}
    for patience in (2, 0):
        torch.manual_seed(0)  # the same heads: the runs differ only in when they stop
        model = EarlyExitModel.from_backbone(tiny_bert, cfg)
        args = TrainingArgs(output_dir=str(tmp_path / f"p{patience}"), epochs=40, lr=5e-2, patience=patience,
                            progress=False, seed=0)
        runs[patience] = train(model, labelled_batches(4, 0), labelled_batches(2, 50), args)["history"]
    stopped, full = runs[2], runs[0]
    assert len(full) == 40  # patience 0: every epoch
    assert len(stopped) < 40 and stalled(stopped, 2)  # it stopped, and only because the score stalled
    assert not stalled(stopped[:-1], 2)  # one epoch earlier it had not: it stopped at the first chance
    assert [m["train_loss"] for m in stopped] == pytest.approx([m["train_loss"] for m in full[:len(stopped)]])
    model = EarlyExitModel.from_backbone(tiny_bert, cfg)  # resumed after stopping: nothing more to train
    args = TrainingArgs(output_dir=str(tmp_path / "p2"), epochs=40, lr=5e-2, patience=2, progress=False, resume=True)
    assert train(model, labelled_batches(4, 0), labelled_batches(2, 50), args)["history"] == stopped


def test_patience_must_not_be_negative():
    with pytest.raises(ValueError, match="patience must be >= 0"):
        TrainingArgs(output_dir="x", patience=-1)
