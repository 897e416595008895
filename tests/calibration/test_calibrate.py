"""Learn-then-Test over real policies replayed on traces, and the `offramp calibrate` command."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from encoders import make_batch

from offramp import EarlyExitModel, OfframpConfig
from offramp.calibration import LearnThenTest, default_candidates
from offramp.cli.calibrate import add_calibrate_parser
from offramp.evaluation.collect import ExitTrace, collect, replay
from offramp.policies import make_policy


def _trace(rng, n, num_exits=4, c=3):
    """Synthetic exchangeable trace: exits drift towards the final prediction as depth grows."""
    final = rng.normal(size=(n, c)) * 2.5
    logits = np.stack([final * (e + 1) / num_exits + rng.normal(size=(n, c)) * 1.5 * (num_exits - e) / num_exits
                       for e in range(num_exits)])
    labels = np.where(rng.random(n) < 0.8, final.argmax(-1), rng.integers(0, c, n))
    return ExitTrace(logits=torch.tensor(logits, dtype=torch.float32), labels=torch.tensor(labels),
                     exit_layers=list(range(1, num_exits + 1)), num_layers=num_exits)


@pytest.mark.parametrize("rule,risk", [("entropy", "disagree"), ("max_prob", "wrong_when_full_right"),
                                       ("patience", "disagree")])
def test_ltt_on_policies_controls_the_true_risk(rule, risk):
    rng = np.random.default_rng(0)
    delta, epsilon, n, reps = 0.1, 0.1, 300, 60
    policy = make_policy(rule)
    grid = default_candidates(policy, 4, 3, num=21)
    big = _trace(rng, 20000)  # the "population": true risk of every candidate
    ref = LearnThenTest(delta, epsilon, risk=risk).fit(policy, big, grid)
    true_risk = ref.risks_
    assert true_risk[0] <= true_risk[-1]  # the grid runs from conservative to aggressive
    violations, picked = 0, 0
    for _ in range(reps):
        ltt = LearnThenTest(delta, epsilon, risk=risk, pvalue="binomial").fit(policy, _trace(rng, n), grid)
        if ltt.index_ >= 0:
            picked += ltt.index_ > 0
            violations += true_risk[ltt.index_] > delta
    assert violations / reps <= epsilon + 3 * math.sqrt(epsilon * (1 - epsilon) / reps)
    assert picked > reps // 2  # not vacuous: it does move the threshold
    # the chosen policy replays to the exits whose losses were counted
    index, _ = replay(ltt.policy_, big)
    assert getattr(ltt.policy_, policy.threshold_field) == pytest.approx(ltt.threshold_)
    assert index.float().mean() < 3  # it exits early on average


def _checkpoint(tiny_bert, tmp_path):
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=3, policy={"type": "entropy"}))
    model.save_pretrained(tmp_path / "ckpt")
    batches = []
    for k in range(25):
        ids, mask = make_batch(16, 10, seed=k)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids[:, 1] % 3})
    collect(model, batches).save(tmp_path / "trace")
    return tmp_path / "ckpt", tmp_path / "trace"


def _run(argv):
    parser = argparse.ArgumentParser(prog="offramp")
    add_calibrate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", *argv])
    return args.func(args)


def test_calibrate_command_writes_the_threshold(tiny_bert, tmp_path, capsys):
    ckpt, trace = _checkpoint(tiny_bert, tmp_path)
    rc = _run(["--model", str(ckpt), "--trace", str(trace), "--policy", "max_prob", "--delta", "0.2", "--epsilon", "0.1",
               "--pvalue", "binomial", "--alpha", "0.1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "P(disagree risk <= 0.2) >= 0.9" in out
    cfg = json.loads((ckpt / "offramp_config.json").read_text())
    assert cfg["policy"]["type"] == "max_prob"
    cal = cfg["extra"]["calibration"]
    assert cal["empirical_risk"] <= 0.2 and cal["n"] == 400
    assert len(cal["conformal"]["quantiles"]) == 4
    again = EarlyExitModel.from_pretrained(ckpt)  # the checkpoint still loads, with the new policy
    assert again.config.policy["threshold"] == pytest.approx(cal["threshold"])


def test_uncertifiable_request_writes_nothing(tiny_bert, tmp_path, capsys):
    ckpt, trace = _checkpoint(tiny_bert, tmp_path)
    before = (ckpt / "offramp_config.json").read_bytes()
    rc = _run(["--model", str(ckpt), "--trace", str(trace), "--policy", "entropy", "--delta", "0.01"])
    assert rc == 1
    assert "no threshold passes" in capsys.readouterr().err
    assert (ckpt / "offramp_config.json").read_bytes() == before


def test_cats_method_and_bad_policy(tiny_bert, tmp_path, capsys):
    ckpt, trace = _checkpoint(tiny_bert, tmp_path)
    assert _run(["--model", str(ckpt), "--trace", str(trace), "--method", "cats", "--epsilon", "0.2"]) == 0
    assert "CATs" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no threshold"):
        _run(["--model", str(ckpt), "--trace", str(trace), "--policy", "never"])
    with pytest.raises(ValueError, match="not an offramp checkpoint"):
        _run(["--model", str(tmp_path), "--trace", str(trace)])


def test_calibrate_warns_when_the_certified_rule_is_trivial_and_not_otherwise():
    import warnings

    from offramp.calibration.calibrate import calibrate
    from offramp.config import OfframpConfig

    rng = np.random.default_rng(3)
    config = OfframpConfig(policy={"type": "entropy", "threshold": 0.5})
    same = _trace(rng, 400)
    same.logits[:] = same.logits[-1]  # every exit predicts what the last does: exiting all at once is safe
    with pytest.warns(UserWarning, match="trivial one: every row exits at the first exit"):
        _, _, record = calibrate(config, same, delta=0.1, epsilon=0.1)
    assert record["mean_exit_layer"] == 1 and record["ideal_speedup"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal trace: no warning
        _, _, record = calibrate(config, _trace(rng, 400), delta=0.1, epsilon=0.1)
    assert 1 < record["mean_exit_layer"] < 4 and record["ideal_speedup"] == pytest.approx(4 / record["mean_exit_layer"])


def test_the_check_interval_holds_the_true_risk_of_a_synthetic_rule():
    from offramp.calibration.calibrate import check_risk

    rng = np.random.default_rng(11)
    policy = make_policy({"type": "entropy", "threshold": 0.8})
    population = _trace(rng, 100_000)  # the true risk of this rule, to a few 1e-3
    index, _ = replay(policy, population)
    truth = float((population.logits[index, torch.arange(100_000)].argmax(-1) != population.logits[-1].argmax(-1))
                  .float().mean())
    held = [check_risk(policy, _trace(rng, 1500), risk="disagree", delta=0.1, epsilon=0.05) for _ in range(20)]
    inside = sum(h["interval"][0] <= truth <= h["interval"][1] for h in held)
    assert inside >= 17  # a 95% interval: about 19 of 20 hold the truth
    assert all(h["consistent"] == (h["interval"][0] <= 0.1) for h in held)
    assert 0 < truth < 1 and all(h["n"] == 1500 for h in held)


def test_calibrate_check_reports_the_risk_on_another_split(tmp_path, capsys):
    from tiny_assets import write_csv, write_model

    from offramp.cli import main

    model, csv = write_model(tmp_path / "tiny"), write_csv(tmp_path / "d.csv", n=120)
    assert main(["--threads", "1", "--quiet", "train", "--model", str(model), "--data", str(csv), "--out",
                 str(tmp_path / "run"), "--epochs", "2", "--batch-size", "16"]) == 0
    capsys.readouterr()
    assert main(["--threads", "1", "--quiet", "calibrate", "--model", str(tmp_path / "run"), "--policy", "entropy",
                 "--delta", "0.5", "--epsilon", "0.5", "--check", "test"]) == 0
    out = capsys.readouterr().out
    assert "check on test: disagree risk" in out and "the bound 0.5" in out
    cal = json.loads((tmp_path / "run" / "checkpoint" / "offramp_config.json").read_text())["extra"]["calibration"]
    check = cal["check"]
    assert check["split"] == "test" and check["n"] == 12 and check["interval"][0] <= check["risk"] <= check["interval"][1]
    with pytest.raises(ValueError, match="the split calibrate certifies on"):
        main(["--debug", "calibrate", "--model", str(tmp_path / "run"), "--check", "validation"])
