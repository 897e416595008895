"""``offramp reason`` end to end on a tiny saved model: build, fit, run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from offramp.cli.reason import add_reason_parser
from reasoning import tiny_lm, tiny_tokenizer


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="offramp")
    add_reason_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    tiny_lm(len(tok), seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_run_full_and_budget_print_results(model_dir, capsys):
    common = ["--model", model_dir, "--max-new-tokens", "20", "--max-answer-tokens", "3"]
    assert _run(["reason", "run", *common, "--question", "add two and three"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "full" and row["chain_tokens"] == 20 and row["stop"] == "budget"
    assert _run(["reason", "run", *common, "--question", "add two", "--method", "budget", "--budget", "4"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["chain_tokens"] == 4


def test_build_fit_then_lynx(model_dir, tmp_path, capsys, monkeypatch):
    from offramp.data import tasks
    from offramp.data.tasks import Problem

    probs = [Problem(f"t{i}", q, "5", "test") for i, q in enumerate(
        ["add two and three", "add three and two", "Solve it", "so add two"])]
    monkeypatch.setattr(tasks, "load_problems", lambda spec, n, seed=0: probs[:n])
    common = ["--model", model_dir, "--max-new-tokens", "20", "--max-answer-tokens", "2", "--layers", "1,-1"]
    assert _run(["reason", "build", *common, "--task", "toy", "--n", "4", "--out", str(tmp_path / "ev")]) == 0
    from offramp.evaluation.events import load_dataset

    data = load_dataset(tmp_path / "ev")
    # the tiny model is never right: make some labels 1 so the probe sees both classes
    for i, uid in enumerate(data.uids):
        z = dict(np.load(tmp_path / "ev" / f"{uid}.npz"))
        z["labels"] = (np.arange(z["labels"].size) % 2).astype(np.int64)
        np.savez(tmp_path / "ev" / f"{uid}.npz", **z)
    capsys.readouterr()
    assert _run(["reason", "fit", str(tmp_path / "ev"), "--delta", "0.3", "--epochs", "20",
                 "--out", str(tmp_path / "probe")]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["delta"] == 0.3 and sum(fit["cal_counts"]) == fit["events_cal"] > 0 and fit["per"] == "event"
    assert _run(["reason", "fit", str(tmp_path / "ev"), "--delta", "0.3", "--epochs", "20", "--per", "chain",
                 "--out", str(tmp_path / "probe-chain")]) == 0
    fit_chain = json.loads(capsys.readouterr().out)
    from offramp.calibration.lynx import LynxProbe

    chain_probe = LynxProbe.load(tmp_path / "probe-chain")
    assert fit_chain["per"] == "chain" and fit_chain["chains_cal"] == 2 == chain_probe.chain_count_
    assert chain_probe.chain_threshold_ == float("inf")  # 2 calibration chains cannot certify delta 0.3
    assert _run(["reason", "fit", str(tmp_path / "ev"), "--delta", "0.3", "--epochs", "20", "--per", "chain",
                 "--risk", "lost", "--out", str(tmp_path / "probe-lost")]) == 0
    assert json.loads(capsys.readouterr().out)["risk"] == "lost"
    assert LynxProbe.load(tmp_path / "probe-lost").risk_ == "lost"
    fit_again = ["reason", "fit", str(tmp_path / "ev"), "--delta", "0.3", "--epochs", "20", "--out"]
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        _run([*fit_again, str(tmp_path / "probe")])  # the probe folder is kept
    for out, how in ((tmp_path / "ev", "is DATA"), (tmp_path, "holds DATA"), (tmp_path / "ev" / "p", "is inside DATA")):
        with pytest.raises(ValueError, match=f"{how} .*would replace what it reads"):
            _run([*fit_again, str(out), "--overwrite"])
    assert len(load_dataset(tmp_path / "ev").uids) == 4 and LynxProbe.load(tmp_path / "probe").delta_ == 0.3
    with pytest.raises(ValueError, match="add --per chain"):
        _run(["reason", "fit", str(tmp_path / "ev"), "--delta", "0.3", "--risk", "lost",
              "--out", str(tmp_path / "probe-x")])
    out = tmp_path / "runs.jsonl"
    assert _run(["reason", "run", "--model", model_dir, "--max-new-tokens", "20", "--max-answer-tokens", "2",
                 "--probe", str(tmp_path / "probe"), "--task", "toy", "--n", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["uid"] for r in rows] == ["t0", "t1"] and all(r["method"] == "lynx" for r in rows)
    assert all("p1" in e for r in rows for e in r["events"])  # the probe ran at every cue


def test_bad_input(model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs --probe"):
        _run(["reason", "run", "--model", model_dir, "--question", "x", "--method", "lynx"])
    with pytest.raises(ValueError, match="no labelled problems"):
        (tmp_path / "empty").mkdir()
        _run(["reason", "fit", str(tmp_path / "empty"), "--delta", "0.1", "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="cannot load the model"):
        _run(["reason", "run", "--model", str(tmp_path / "missing"), "--question", "x"])
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        _run(["reason", "run", "--model", model_dir, "--question", "x", "--batch-size", "0"])
    with pytest.raises(ValueError, match="add --sample"):
        _run(["reason", "run", "--model", model_dir, "--question", "x", "--temperature", "0.7"])
    with pytest.raises(ValueError, match="prompt instruction is empty"):
        _run(["reason", "run", "--model", model_dir, "--question", "x", "--prompt", " "])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _run(["reason", "run", "--model", model_dir, "--question", "x", "--sample", "--temperature", "0"])


def test_dtype_auto_follows_the_hardware_and_a_bad_name_fails_before_loading(model_dir, monkeypatch):
    import warnings

    import torch

    from offramp import devices
    from offramp.modeling import resolve_dtype
    from offramp.modeling.causal_lm import load_causal_lm

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(devices, "native_bf16", lambda device="cpu", n=native: n)
        assert resolve_dtype("auto") == want
        model, _ = load_causal_lm(model_dir, "auto")
        assert next(model.parameters()).dtype == want
    with warnings.catch_warnings(record=True) as caught:  # asked for where it is emulated: works, and says so
        warnings.simplefilter("always")
        assert resolve_dtype("bfloat16") == torch.bfloat16
    assert any("float32" in str(w.message) and "emulated" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*auto"):
        load_causal_lm("/nonexistent/folder", "fp8")  # the dtype is checked before the folder
    with pytest.raises(SystemExit):
        _run(["reason", "run", "--model", model_dir, "--dtype", "fp8", "--question", "x"])
