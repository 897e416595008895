"""Every failure is a message before the work, no setting is silently ignored, long work shows
progress on stderr: `offramp <command>: error: ...`, exit status 2, no traceback."""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import types
from pathlib import Path

import pytest
from tiny_assets import write_csv, write_model

from offramp import OfframpConfig
from offramp.cli import main

COMMON = ["--threads", "1"]


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([*COMMON, *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys, *argv, match: str) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hard")
    model, csv = write_model(root / "tiny"), write_csv(root / "d.csv", n=60)
    assert main([*COMMON, "--quiet", "train", "--model", str(model), "--data", str(csv), "--out",
                 str(root / "run"), "--epochs", "1", "--batch-size", "16"]) == 0
    assert main([*COMMON, "--quiet", "collect", "--model", str(root / "run"), "--out", str(root / "trace")]) == 0
    return {"root": root, "model": model, "csv": csv, "run": root / "run", "ckpt": root / "run" / "checkpoint",
            "trace": root / "trace"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------- damaged and foreign files
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_heads_backbone_and_trace(ws, tmp_path, capsys, damage):
    def spoil(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 10)

    ckpt = _copy(ws["ckpt"], tmp_path / "heads")
    spoil(ckpt / "offramp_heads.safetensors")
    fails(capsys, "predict", "--model", ckpt, "good day", match="offramp_heads.safetensors is not a readable")
    ckpt = _copy(ws["ckpt"], tmp_path / "backbone")
    spoil(ckpt / "backbone" / "model.safetensors")
    fails(capsys, "predict", "--model", ckpt, "good day", match="cannot load the backbone")
    trace = _copy(ws["trace"], tmp_path / "trace")
    spoil(trace / "trace.safetensors")
    fails(capsys, "sweep", "--trace", trace, "--out", tmp_path / "rep", match="trace.safetensors is not a readable")


def test_trace_without_logits(ws, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    trace = _copy(ws["trace"], tmp_path / "trace")
    tensors = load_file(str(trace / "trace.safetensors"))
    del tensors["logits"]
    save_file(tensors, str(trace / "trace.safetensors"))
    fails(capsys, "sweep", "--trace", trace, "--out", tmp_path / "rep", match="has no (exits, n, classes) 'logits'")


@pytest.mark.parametrize("edit, match", [
    (lambda cfg: [cfg], "holds a JSON list, not an object"),
    (lambda cfg: {**cfg, "extra": "x"}, "extra must be a dict"),
    (lambda cfg: {**cfg, "head": ["linear"]}, "head must be a dict"),
    (lambda cfg: {**cfg, "label_names": [1, 2, 3]}, "label_names must be a list of strings"),
    (lambda cfg: {**cfg, "num_labels": 5, "label_names": None}, "head shapes do not match offramp_config.json"),
])
def test_bad_configs(ws, tmp_path, capsys, edit, match):
    ckpt = _copy(ws["ckpt"], tmp_path / "c")
    path = ckpt / "offramp_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    fails(capsys, "predict", "--model", ckpt, "good day", match=match)


def test_extra_null_is_an_empty_dict(ws, tmp_path, capsys):
    ckpt = _copy(ws["ckpt"], tmp_path / "c")
    path = ckpt / "offramp_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "extra": None}))
    rc, out, err = run(capsys, "predict", "--model", ckpt, "good day")
    assert rc == 0 and json.loads(out)["exit_layer"] == 4


def test_config_takes_a_path_and_refuses_what_json_cannot_hold(tmp_path):
    cfg = OfframpConfig(base_model_name_or_path=tmp_path / "model", num_labels=2)
    assert cfg.base_model_name_or_path == str(tmp_path / "model")
    cfg.save(tmp_path)  # before: "Object of type PosixPath is not JSON serializable" after an epoch
    assert OfframpConfig.load(tmp_path).base_model_name_or_path == str(tmp_path / "model")
    with pytest.raises(ValueError, match="extra must hold only JSON values"):
        OfframpConfig(extra={"data": {"path": tmp_path}})


# ------------------------------------------------------------------------------------ output paths
def test_output_paths_are_checked_before_the_work(ws, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    train = ["train", "--model", ws["model"], "--data", ws["csv"], "--epochs", "1"]
    fails(capsys, *train, "--out", blocker / "run", match=f"{blocker} is a file, not a folder")
    fails(capsys, *train, "--out", "/sys/offramp-out", match="/sys is not writable")  # refused even to root
    fails(capsys, "collect", "--model", ws["run"], "--out", blocker / "t", match="is a file, not a folder")
    fails(capsys, "evaluate", "--model", ws["run"], "--json", blocker / "e.json", match="is a file, not a folder")
    fails(capsys, "sweep", "--trace", ws["trace"], "--out", "/sys/offramp-rep", match="not writable")


# ----------------------------------------------------------------------------------- bad settings
def test_nan_and_out_of_range_settings(ws, capsys):
    fails(capsys, "predict", "--model", ws["run"], "--policy", "entropy", "--value", "nan", "x good",
          match="entropy threshold must be a number")
    fails(capsys, "predict", "--model", ws["run"], "--policy", '{"type": "max_prob", "threshold": NaN}', "x good",
          match="max_prob threshold must be a number")
    fails(capsys, "predict", "--model", ws["run"], "--policy", "static", "--value", "9", "x good",
          match="layer 9 is past the last exit (layer 4")
    fails(capsys, "predict", "--model", ws["run"], "--batch-size", "0", "x good", match="--batch-size must be >= 1")
    fails(capsys, "predict", "--model", ws["run"], "--max-length", "100", "x good",
          match="--max-length 100 is beyond this model's 64 positions")
    fails(capsys, "sweep", "--trace", ws["trace"], "--out", ws["root"] / "r1", "--grid", "max_prob=nan,0.9",
          match="nan is not a finite number")
    fails(capsys, "sweep", "--trace", ws["trace"], "--out", ws["root"] / "r2", "--rules", "max_prob",
          "--grid", "max_prob=0.9,2", match="grid value 2.0 for rule 'max_prob'")
    fails(capsys, "evaluate", "--model", ws["run"], "--max-eval", "-3", match="--max-eval must be >= 1")
    fails(capsys, "train", "--model", ws["model"], "--data", ws["csv"], "--out", ws["root"] / "neg",
          "--max-train", "-1", match="--max-train must be >= 1")
    assert not (ws["root"] / "neg").exists()
    fails(capsys, "calibrate", "--model", ws["run"], "--trace", ws["trace"], "--delta", "nan",
          match="--delta must be in (0, 1), got nan")
    fails(capsys, "reason", "fit", ws["root"], "--delta", "1.5", "--out", ws["root"] / "p", match="--delta must be in (0, 1)")
    fails(capsys, "reason", "run", "--model", "no-such-model", "--question", "x", "--n", "0", match="--n must be >= 1")
    fails(capsys, "evaluate", "--model", ws["run"], "--repeats", "0", match="--repeats must be >= 1")


def test_generate_settings_refused_before_the_model_loads(capsys):
    base = ["generate", "--model", "no-such-model-folder", "--prompt", "hi"]
    fails(capsys, *base, "--threshold", "nan", match="--threshold must be a number in [0, 1]")
    fails(capsys, *base, "--batch-size", "0", match="--batch-size must be >= 1")
    fails(capsys, *base, "--top-p", "0", match="--top-p must be a number > 0")


def test_the_policy_layer_check_also_guards_replay(ws):
    from offramp.evaluation.collect import ExitTrace, replay

    with pytest.raises(ValueError, match="past the last exit"):
        replay({"type": "static", "layer": 5}, ExitTrace.load(ws["trace"]))
    with pytest.raises(ValueError, match="regression_tol must be > 0"):
        from offramp.policies import make_policy
        make_policy({"type": "patience", "regression_tol": math.nan})


# --------------------------------------------------------------------------------------- text input
def test_non_utf8_input_is_one_behaviour_everywhere(ws, tmp_path, capsys, monkeypatch):
    bad = b"good day\nbad \xff\xfe night\n"
    txt = tmp_path / "t.txt"
    txt.write_bytes(bad)
    csv = tmp_path / "t.csv"
    csv.write_bytes(b"text,label\ngood day,positive\nbad \xff day,negative\n")
    fails(capsys, "predict", "--model", ws["run"], "--file", txt, match=f"{txt}: line 2, column 5: byte 0xff")
    fails(capsys, "predict", "--model", ws["run"], "--file", csv, match=f"{csv}: line 3, column 5")
    fails(capsys, "train", "--model", ws["model"], "--data", csv, "--out", tmp_path / "r", match=f"{csv}: line 3")
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(bad), isatty=lambda: False))
    fails(capsys, "predict", "--model", ws["run"], match="standard input: line 2")
    rc, out, _ = run(capsys, "predict", "--model", ws["run"], "--file", txt, "--encoding-errors", "replace")
    assert rc == 0 and [json.loads(x)["text"] for x in out.splitlines()] == ["good day", "bad \ufffd\ufffd night"]
    rc, out, _ = run(capsys, "--encoding-errors", "replace", "predict", "--model", ws["run"], "--file", csv)
    assert rc == 0 and len(out.splitlines()) == 2


def test_cut_texts_get_one_warning_with_the_count(ws, capsys):
    long = " ".join(["good"] * 80)
    rc, out, err = run(capsys, "predict", "--model", ws["run"], "--batch-size", "1", "--max-length", "16",
                       long, "bad day", long)
    assert rc == 0 and len(out.splitlines()) == 3
    assert err.count("warning:") == 1 and "2 of 3 texts are longer than max_length=16 tokens" in err


# ----------------------------------------------------------------------------------------- progress
def test_long_work_shows_progress_on_stderr_and_quiet_silences_it(ws, capsys):
    texts = [f"good day {i}" for i in range(40)]
    rc, out, err = run(capsys, "predict", "--model", ws["run"], "--batch-size", "4", *texts)
    assert rc == 0 and len(out.splitlines()) == 40
    assert "predict" in err and "10/10" in err  # a bar over the 10 batches, on stderr
    assert all(line.startswith("{") for line in out.splitlines())  # stdout: results only
    rc, out, err = run(capsys, "predict", "--quiet", "--model", ws["run"], "--batch-size", "4", *texts)
    assert rc == 0 and err == ""
    rc, out, err = run(capsys, "evaluate", "--model", ws["run"], "--repeats", "2")
    assert rc == 0 and "early exit" in err and "timing full model vs early exit" in err
    assert json.loads(out)["timing"]["repeats"] == 2


def test_debug_shows_the_traceback(ws, capsys):
    with pytest.raises(ValueError, match="batch-size"):
        main([*COMMON, "predict", "--debug", "--model", str(ws["run"]), "--batch-size", "0", "x"])


def test_library_error_types_are_value_errors(ws, tmp_path):
    """The Python API raises ValueError (what the CLI maps) for the same damaged files."""
    from offramp import EarlyExitModel

    ckpt = _copy(ws["ckpt"], tmp_path / "c")
    (ckpt / "offramp_heads.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        EarlyExitModel.from_pretrained(ckpt)


def test_the_cut_texts_warning_comes_once_per_command_over_every_split(ws):
    """train reads three splits (and the sweep of --select-policy one again): one warning."""
    import subprocess

    argv = [sys.executable, "-m", "offramp.cli", "--threads", "1", "train", "--model", str(ws["model"]), "--data",
            str(ws["csv"]), "--out", str(ws["root"] / "trunc"), "--epochs", "1", "--max-length", "4",
            "--select-policy", "entropy", "--state-cache", "off"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("are longer than max_length=4 tokens") == 1


def test_a_once_per_command_warning_is_shown_once_and_others_every_time(capsys):
    from offramp.cli import _show_warning
    from offramp.data.batching import TruncationWarning

    show = _show_warning("train")
    for n in (3, 5):
        show(f"{n} texts cut", TruncationWarning, "f.py", 1)
        show(f"other {n}", UserWarning, "f.py", 2)
    err = capsys.readouterr().err
    assert err.count("texts cut") == 1 and "3 texts cut" in err and err.count("other") == 2
    show = _show_warning("predict")  # the next command says it again
    show("7 texts cut", TruncationWarning, "f.py", 1)
    assert "offramp predict: warning: 7 texts cut" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["predict", "--model", "/nonexistent/run", "hi"],
                                  ["evaluate", "--model", "/nonexistent/run"],
                                  ["collect", "--model", "/nonexistent/run", "--out", "/nonexistent/trace"]])
def test_a_missing_checkpoint_folder_is_reported_before_torch_loads(argv):
    import subprocess

    code = ("import sys\nfrom offramp.cli import main\nrc = main(sys.argv[1:])\n"
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stderr[-1000:]
    assert "is not an offramp checkpoint folder" in proc.stderr
