"""Every ``offramp`` subcommand end to end on a tiny random-init BERT and a small local CSV."""

from __future__ import annotations

import io
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from commands import cli
from tiny_assets import write_csv, write_model

from offramp.cli import build_parser, main

SUBCOMMANDS = ["train", "collect", "sweep", "evaluate", "predict", "demo", "bench"]


def run(capsys, *argv: object) -> tuple[int, str, str]:
    rc = cli(*argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, a CSV, a trained run (PALBERT halting: every rule applies) and its test trace."""
    root = tmp_path_factory.mktemp("cli")
    paths = {"root": root, "model": write_model(root / "tiny"), "csv": write_csv(root / "d.csv", n=120)}
    assert cli("train", "--model", paths["model"], "--data", paths["csv"], "--out", root / "run",
               "--halting", "palbert", "--head", "linear", "--epochs", "2", "--lr", "1e-2", "--batch-size", "16") == 0
    assert cli("collect", "--model", root / "run", "--out", root / "trace") == 0
    paths.update(run=root / "run", trace=root / "trace")
    return paths


def test_help_for_every_subcommand(capsys):
    for cmd in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_train_writes_a_checkpoint_and_resume_continues(ws, capsys):
    ckpt = ws["run"] / "checkpoint"
    assert (ckpt / "offramp_config.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
    cfg = json.loads((ckpt / "offramp_config.json").read_text())
    assert cfg["label_names"] == ["negative", "neutral", "positive"]
    assert cfg["extra"]["data"]["data"] == str(ws["csv"])  # later commands reuse the same data and splits
    rc, out, _ = run(capsys, "train", "--out", ws["run"], "--resume", "--epochs", "3", "--batch-size", "16")
    assert rc == 0 and len(json.loads(out)["accuracy_per_exit"]) == 4
    assert [h["epoch"] for h in json.loads((ws["run"] / "metrics.json").read_text())] == [1, 2, 3]


def test_collect_stores_a_complete_trace(ws):
    meta = json.loads((ws["trace"] / "trace.json").read_text())
    assert meta["complete"] and meta["exit_layers"] == [1, 2, 3, 4]
    assert meta["meta"]["split"] == "test" and meta["meta"]["n"] == 12
    assert len(meta["layer_flops"]) == 4 and meta["meta"]["flops"]["full"] > 0


@pytest.fixture(scope="module")
def swept(ws) -> tuple[Path, str]:
    """One sweep of every rule over the test trace: its report folder and what it printed."""
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli("sweep", "--trace", ws["trace"], "--out", ws["root"] / "rep") == 0
    return ws["root"] / "rep", buf.getvalue()


def test_sweep_report_files(ws, swept, capsys, tmp_path):
    rep, out = swept
    assert "| rule |" in out
    for png in ("pareto.png", "exit_histogram.png", "reliability.png"):
        assert (rep / png).stat().st_size > 1000
    data = json.loads((rep / "report.json").read_text())
    rules = {p["rule"] for p in data["sweep"]["points"]}
    assert {"entropy", "max_prob", "margin", "patience", "q_exit", "static", "ponder_sample"} <= rules
    md_rules = [line.split("|")[1].strip() for line in (rep / "report.md").read_text().splitlines()
                if line.startswith("| ")]
    assert {"full", "entropy", "q_exit", "oracle", "consistency oracle"} <= set(md_rules)
    assert f"offramp evaluate --model {ws['run']} --policy entropy --value" in out  # how to use a chosen setting
    rc, _, _ = run(capsys, "sweep", "--trace", ws["trace"], "--out", tmp_path / "r2", "--rules", "entropy",
                   "--grid", "entropy=0.5,1.0")
    pts = json.loads((tmp_path / "r2" / "report.json").read_text())["sweep"]["points"]
    assert rc == 0 and [p["value"] for p in pts] == [0.5, 1.0]


@pytest.mark.parametrize("rule", ["entropy", "max_prob", "patience", "q_exit", "static"])
def test_sweep_numbers_equal_evaluate(ws, swept, capsys, rule):
    points = [p for p in json.loads((swept[0] / "report.json").read_text())["sweep"]["points"] if p["rule"] == rule]
    mixed = [p for p in points if sum(c > 0 for c in p["exit_counts"]) > 1] or points
    for p in (mixed[0], mixed[-1]):
        rc, out, _ = run(capsys, "evaluate", "--model", ws["run"], "--policy", rule, "--value", p["value"],
                         "--no-timing")
        res = json.loads(out)
        assert rc == 0 and res["accuracy"] == pytest.approx(p["metric"])
        assert res["mean_exit_layer"] == pytest.approx(p["mean_exit_layer"])
        assert list(res["exit_histogram"].values()) == p["exit_counts"]


def test_evaluate_measures_time_and_writes_json(ws, capsys, tmp_path):
    rc, out, _ = run(capsys, "evaluate", "--model", ws["run"], "--policy", "static", "--value", "1",
                     "--json", tmp_path / "e.json")
    res = json.loads((tmp_path / "e.json").read_text())
    assert rc == 0 and res == json.loads(out)
    assert res["mean_exit_layer"] == 1 and res["exit_histogram"]["1"] == res["n"]
    t = res["timing"]
    assert t["full_s"] > 0 and t["early_s"] > 0 and t["speedup"] == pytest.approx(t["full_s"] / t["early_s"])
    assert res["flops"]["speedup"] > 2
    # beside the rule: the full model on the same rows, and how often the rule disagrees with it
    rc, out, _ = run(capsys, "evaluate", "--model", ws["run"], "--policy", "never", "--no-timing")
    never = json.loads(out)
    assert never["disagreement"] == 0 and never["accuracy"] == never["full_model"]["accuracy"]
    assert res["full_model"]["accuracy"] == never["accuracy"]
    assert 0 < res["disagreement"] <= 1  # layer 1 against 4 layers of a tiny random model
    assert abs(res["accuracy"] - res["full_model"]["accuracy"]) <= res["disagreement"] + 1e-9


def test_predict_from_args_file_and_stdin(ws, capsys, tmp_path, monkeypatch):
    rc, out, _ = run(capsys, "predict", "--model", ws["run"], "good day", "the awful road", "--policy", "static",
                     "--value", "2")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [r["text"] for r in rows] == ["good day", "the awful road"]
    for r in rows:
        assert r["label"] in ("negative", "neutral", "positive") and 0 < r["confidence"] <= 1
        assert r["exit_layer"] == 2
    (tmp_path / "t.txt").write_text("good\n\nbad day\n")
    rc, out, _ = run(capsys, "predict", "--model", ws["run"], "--file", tmp_path / "t.txt")
    assert [json.loads(x)["text"] for x in out.splitlines()] == ["good", "bad day"]
    rc, out, _ = run(capsys, "predict", "--model", ws["run"], "--file", ws["csv"])
    assert len(out.splitlines()) == 120
    monkeypatch.setattr(sys, "stdin", io.StringIO("nice car\n"))
    rc, out, _ = run(capsys, "predict", "--model", ws["run"])
    assert rc == 0 and json.loads(out)["text"] == "nice car"


def test_demo_writes_summary_with_the_exact_schema(ws, capsys, tmp_path):
    rc, out, _ = run(capsys, "demo", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "demo",
                     "--epochs", "1", "--time-examples", "8", "--batch-size", "8", "--tolerance", "0.99")
    assert rc == 0 and "| PALBERT |" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary) == {"full", "rules", "full_mlp_exits"} and set(summary["full"]) == {"accuracy", "wall_s"}
    assert set(summary["rules"]) == {"PABEE", "PonderNet", "PALBERT", "entropy", "max_prob"}
    for rule in summary["rules"].values():
        assert set(rule) == {"accuracy", "mean_exit_layer", "num_layers", "speedup_measured", "setting"}
        assert rule["num_layers"] == 4 and 1 <= rule["mean_exit_layer"] <= 4 and rule["speedup_measured"] > 0
    assert summary["rules"]["PALBERT"]["setting"]["type"] == "q_exit"
    for name in ("report.md", "pareto.png", "exit_histogram.png", "reliability.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    # each exit set's checkpoint stores its cheapest rule within the tolerance on validation
    for name, rules in (("pabee", {"patience"}), ("exits", {"entropy", "max_prob"}), ("palbert", {"q_exit"})):
        cfg = json.loads((tmp_path / "demo" / "models" / name / "checkpoint" / "offramp_config.json").read_text())
        assert cfg["policy"]["type"] in rules and cfg["policy"] == cfg["extra"]["selected"]["policy"]
    rc, _, err = run(capsys, "demo", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "demo")
    assert rc == 2 and "--overwrite" in err


def test_bench_runs_the_speed_benchmark(ws, capsys):
    rc, out, _ = run(capsys, "bench", "--model", ws["model"], "--batch-sizes", "2", "--rows", "4",
                     "--repeats", "1", "--seq-len", "8")
    res = json.loads(out)
    assert rc == 0 and res["num_layers"] == 4 and "overhead_bs2" in res


def test_registered_subcommand_hooks(monkeypatch):
    called = []
    fake = types.ModuleType("offramp.cli.calibrate")
    fake.add_calibrate_parser = lambda sub: called.append(sub.add_parser("calibrate"))
    monkeypatch.setitem(sys.modules, "offramp.cli.calibrate", fake)
    build_parser()
    assert len(called) == 1


# ------------------------------------------------------------------------------------- bad input
def test_data_file_without_the_named_column(ws, capsys, tmp_path):
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--text-column", "body",
                     "--out", tmp_path / "o")
    assert rc == 2 and "no column 'body'" in err and "--text-column" in err
    assert not (tmp_path / "o").exists()


def test_empty_data_file(ws, capsys, tmp_path):
    (tmp_path / "e.csv").write_text("")
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", tmp_path / "e.csv", "--out", tmp_path / "o")
    assert rc == 2 and "empty" in err


def test_label_not_seen_in_training(ws, capsys, tmp_path):
    path = write_csv(tmp_path / "x.csv", n=30)
    path.write_text(path.read_text() + "good good,surprised\n")
    rc, _, err = run(capsys, "evaluate", "--model", ws["run"], "--data", path, "--test-fraction", "0.9",
                     "--validation-fraction", "0.05", "--no-timing")
    assert rc == 2 and "'surprised'" in err and "not seen in training" in err


def test_checkpoint_folder_that_is_not_one(capsys, tmp_path):
    (tmp_path / "junk").mkdir()
    for cmd in (["collect", "--out", tmp_path / "t"], ["evaluate"], ["predict", "hi"]):
        rc, _, err = run(capsys, cmd[0], "--model", tmp_path / "junk", *cmd[1:])
        assert rc == 2 and "not an offramp checkpoint" in err


def test_existing_output_folder_is_refused_unless_overwrite(ws, capsys, tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, "collect", "--model", ws["run"], "--out", out)
    assert rc == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    rc, _, _ = run(capsys, "collect", "--model", ws["run"], "--out", out, "--overwrite")
    assert rc == 0 and (out / "trace.json").is_file()
    rc, _, err = run(capsys, "sweep", "--trace", ws["trace"], "--out", out)  # out holds a trace now
    assert rc == 2 and "--overwrite" in err
    rc, _, err = run(capsys, "sweep", "--trace", ws["trace"], "--out", ws["trace"], "--overwrite")
    assert rc == 2 and "would replace what it reads" in err


def test_interrupted_collect_leaves_no_half_written_trace(ws, capsys, tmp_path, monkeypatch):
    import offramp.evaluation.collect as collect_mod

    def interrupted(*a, **k):
        Path(a[1]).write_bytes(b"partial")  # part of the tensors, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(collect_mod, "save_file", interrupted)
    rc, _, err = run(capsys, "collect", "--model", ws["run"], "--out", tmp_path / "t")
    assert rc == 130 and not (tmp_path / "t").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".t")]
    old = (ws["trace"] / "trace.json").read_text()
    rc, _, _ = run(capsys, "collect", "--model", ws["run"], "--out", ws["trace"], "--overwrite")
    assert rc == 130 and (ws["trace"] / "trace.json").read_text() == old  # the old trace is intact
    monkeypatch.undo()
    half = tmp_path / "half"
    half.mkdir()
    (half / "trace.safetensors").write_bytes(b"partial")
    rc, _, err = run(capsys, "sweep", "--trace", half, "--out", tmp_path / "rep")
    assert rc == 2 and "not a complete exit trace" in err


def test_bad_policy_and_value(ws, capsys):
    rc, _, err = run(capsys, "evaluate", "--model", ws["run"], "--policy", "nope", "--no-timing")
    assert rc == 2 and "unknown policy" in err
    rc, _, err = run(capsys, "evaluate", "--model", ws["run"], "--policy", "max_prob", "--value", "1.5",
                     "--no-timing")
    assert rc == 2 and "threshold" in err
    rc, _, err = run(capsys, "evaluate", "--model", ws["run"], "--policy", "patience", "--value", "1.5",
                     "--no-timing")
    assert rc == 2 and "integer" in err
    rc, _, err = run(capsys, "predict", "--model", ws["run"], "  ")
    assert rc == 2 and "empty" in err


def test_train_full_finetuning_with_options(ws, capsys, tmp_path):
    rc, out, _ = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "full",
                     "--full", "--epochs", "1", "--exit-layers", "2,4", "--pooling", "mean", "--weights", "pabee",
                     "--shared-head", "--policy", "entropy", "--value", "0.5")
    assert rc == 0 and len(json.loads(out)["accuracy_per_exit"]) == 2
    cfg = json.loads((tmp_path / "full" / "checkpoint" / "offramp_config.json").read_text())
    assert cfg["exit_layers"] == [2, 4] and cfg["head"]["pooling"] == "mean" and cfg["head"]["shared"]
    assert cfg["objective"]["weights"] == "pabee" and cfg["policy"] == {"type": "entropy", "threshold": 0.5}
    assert (tmp_path / "full" / "checkpoint" / "backbone").is_dir()  # fine-tuned weights are stored


def test_pooling_follows_a_sentence_transformers_folder(tmp_path):
    from offramp.cli.common import default_pooling

    assert default_pooling(str(tmp_path)) == "cls"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert default_pooling(str(tmp_path)) == "mean"


def test_train_jei_objective_then_predict_with_gates(ws, capsys, tmp_path):
    rc, out, err = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "jei",
                       "--objective", "jei", "--cost-weight", "0.3", "--epochs", "1")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "jei" / "checkpoint" / "offramp_config.json").read_text())
    assert cfg["gate"]["type"] == "uncertainty" and cfg["objective"]["type"] == "jei"
    assert cfg["objective"]["cost_weight"] == 0.3 and cfg["policy"]["type"] == "gate"
    rc, out, err = run(capsys, "train", "--out", tmp_path / "jei", "--resume", "--epochs", "2")
    assert rc == 0, err
    assert [h["epoch"] for h in json.loads((tmp_path / "jei" / "metrics.json").read_text())
            if h.get("stage") == "alternate"] == [1, 2]
    rc, out, _ = run(capsys, "predict", "--model", tmp_path / "jei", "good day", "bad day")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert rc == 0 and len(rows) == 2 and all(1 <= r["exit_layer"] <= 4 for r in rows)
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "j2",
                     "--objective", "jei", "--halting", "palbert")
    assert rc == 2 and "halting" in err


def test_frozen_commands_share_the_backbone_states(ws, capsys, tmp_path):
    """train stored the validation split's states; collect on that split reuses them, and a second
    train on the same model and data runs no backbone pass."""
    rc, _, err = run(capsys, "collect", "--model", ws["run"], "--split", "validation", "--out", tmp_path / "t")
    assert rc == 0 and "reusing the cached backbone states" in err
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "r2",
                     "--epochs", "1", "--batch-size", "16", "--halting", "palbert")
    assert rc == 0 and err.count("reusing the cached backbone states") == 2  # train and validation splits
    rc, _, err = run(capsys, "collect", "--model", ws["run"], "--split", "validation", "--out", tmp_path / "t2",
                     "--state-cache", "off")
    assert rc == 0 and "reusing" not in err


def test_train_select_policy_stores_the_chosen_rule(ws, capsys, tmp_path):
    run_dir = tmp_path / "sel"
    rc, out, _ = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", run_dir, "--epochs", "2",
                     "--lr", "1e-2", "--batch-size", "16", "--select-policy", "entropy,max_prob,static",
                     "--select-tolerance", "0.5")
    assert rc == 0
    chosen = json.loads(out)["selected"]
    cfg = json.loads((run_dir / "checkpoint" / "offramp_config.json").read_text())
    assert cfg["policy"] == chosen["policy"] and chosen["rule"] in ("entropy", "max_prob", "static")
    assert chosen["value"] >= chosen["full_model"] - 0.5 and cfg["extra"]["selected"]["split"] == "validation"
    # what was stored is what predict uses, and it is exactly the sweep's point on the validation split
    rc, out, _ = run(capsys, "evaluate", "--model", run_dir, "--split", "validation", "--no-timing")
    res = json.loads(out)
    assert rc == 0 and res["policy"] == chosen["policy"]
    assert res["mean_exit_layer"] == pytest.approx(chosen["mean_exit_layer"])


@pytest.mark.parametrize("rules, message", [("nope", "unknown rule 'nope'"), ("gate", "needs \\['gate'\\]"),
                                            (",", "is empty")])
def test_train_select_policy_is_checked_before_training(ws, capsys, tmp_path, rules, message):
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "x",
                     "--select-policy", rules)
    assert rc == 2 and re.search(message, err) and not (tmp_path / "x" / "checkpoint").exists()


def test_jei_warmup_epochs_option_and_a_first_exit_warning(ws, capsys, tmp_path):
    data = write_csv(tmp_path / "d.csv", n=250)  # 25 validation rows: enough to judge the exits
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", data, "--out", tmp_path / "j",
                     "--objective", "jei", "--warmup-epochs", "1", "--epochs", "1", "--cost-weight", "50")
    assert rc == 0, err
    history = json.loads((tmp_path / "j" / "metrics.json").read_text())
    assert [h["epoch"] for h in history if h.get("stage") == "warmup"] == [1]
    cfg = json.loads((tmp_path / "j" / "checkpoint" / "offramp_config.json").read_text())
    assert cfg["objective"]["warmup_epochs"] == 1
    # at this cost weight the gates send everything out at once, and training says so
    assert "leave at the first exit (layer 1)" in err and "--cost-weight" in err
    rc, _, err = run(capsys, "evaluate", "--model", tmp_path / "j", "--no-timing")
    assert rc == 0 and "leave at the first exit" in err
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "k",
                     "--warmup-epochs", "2")
    assert rc == 2 and "--warmup-epochs is an option of the JEI-DNN schedule" in err
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "k",
                     "--gate-pos-weight", "balanced")
    assert rc == 2 and "--gate-pos-weight is an option of the JEI-DNN schedule" in err


@pytest.mark.parametrize("flag, value", [("--beta", "0.1"), ("--lambda-p", "0.2"), ("--kl-target", "row")])
def test_ponder_options_without_a_halting_layer_are_refused(ws, capsys, tmp_path, flag, value):
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "p",
                     flag, value)
    assert rc == 2 and f"{flag} is an option of the ponder objective" in err and "--halting palbert" in err
    assert not (tmp_path / "p").exists()
    rc, _, err = run(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", tmp_path / "p",
                     "--objective", "jei", flag, value)
    assert rc == 2 and "ponder objective" in err


def test_no_first_exit_warning_when_rows_go_deeper(ws, capsys):
    rc, _, err = run(capsys, "evaluate", "--model", ws["run"], "--policy", "never", "--no-timing")
    assert rc == 0 and "first exit" not in err


def test_deprecated_spellings_warn_and_mean_the_new_option():
    """One meaning per flag: the previous release's spellings still parse, into the new option, with
    a warning that names the new spelling and the release that removes them."""
    parser = build_parser()
    cases = [(["train", "--model", "m", "--data", "d", "--out", "o", "--exits", "2,4"], "exits", "2,4", "--exit-layers"),
             (["calibrate", "--model", "m", "--tolerance", "0.2"], "tolerance", 0.2, "--token-tolerance"),
             (["generate", "--model", "m", "--threshold", "0.5"], "threshold", 0.5, "--policy token_confidence"),
             (["reason", "run", "--model", "m", "--question", "q", "--prompt", "check"], "prompt", "check", "--prompt-style"),
             (["reason", "run", "--model", "m", "--question", "q", "--method", "deer", "--lambda", "0.9"], "lam", 0.9, "--value")]
    for argv, dest, value, new in cases:
        with pytest.warns(FutureWarning, match=rf"is spelled {re.escape(new)}.*removed in offramp 0\.2\.0"):
            args = parser.parse_args(argv)
        assert getattr(args, dest) == value, argv
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--exit-layers", "3"])
    assert args.exits == "3"


def test_a_rule_named_without_value_is_refused_unless_the_checkpoint_stores_it(ws, capsys):
    rc, _, err = run(capsys, "evaluate", "--model", ws["run"], "--policy", "entropy", "--no-timing")
    assert rc == 2 and "policy 'entropy' needs its threshold" in err and "--value" in err
    rc, out, _ = run(capsys, "evaluate", "--model", ws["run"], "--policy", "entropy", "--value", "0.5", "--no-timing")
    assert rc == 0 and json.loads(out)["policy"] == {"type": "entropy", "threshold": 0.5}


def test_train_with_an_mlp_head_and_self_distillation_then_predict(capsys, tmp_path):
    from offramp import EarlyExitModel

    model, csv = write_model(tmp_path / "tiny"), write_csv(tmp_path / "d.csv", n=60)
    code, _, err = run(capsys, "train", "--model", model, "--data", csv, "--out", tmp_path / "run", "--epochs", "1",
                       "--batch-size", "16", "--head", "mlp", "--head-hidden", "16", "--distill", "1")
    assert code == 0, err
    trained = EarlyExitModel.from_pretrained(tmp_path / "run" / "checkpoint")
    assert trained.config.head["type"] == "mlp" and trained.config.objective["distill"] == 1.0
    assert isinstance(trained.classifiers.linears[0], torch.nn.Sequential)
    code, out, err = run(capsys, "predict", "--model", tmp_path / "run", "good words")
    assert code == 0 and "exit_layer" in out, err
    code, _, err = run(capsys, "train", "--model", model, "--data", csv, "--out", tmp_path / "run2", "--converge", "1")
    assert code == 2 and "--converge" in err and "--full" in err
    assert not (tmp_path / "run2").exists()
