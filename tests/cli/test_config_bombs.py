"""A crafted number in a config is an error before anything is allocated: each case runs
``offramp`` in a process whose address space is capped (``ulimit -v`` 2 GiB), where building what
the number asks for would fail or take the machine; the command must answer with a clear error."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from decoder_models import tiny_lm_folder
from tiny_assets import write_csv, write_model

from offramp.cli import main
from offramp.modeling import DecoderExitModel

CAP = 2 * 1024**3


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def offramp_capped(*argv: object) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "offramp.cli", "--threads", "1", *map(str, argv)],
                          capture_output=True, text=True, preexec_fn=_capped, timeout=120)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    model, csv = write_model(root / "tiny"), write_csv(root / "d.csv", n=60)
    assert main(["--threads", "1", "--quiet", "train", "--model", str(model), "--data", str(csv), "--out",
                 str(root / "run"), "--epochs", "1", "--batch-size", "16"]) == 0
    folder, lm = tiny_lm_folder(root)
    DecoderExitModel.from_backbone(lm, exit_layers=[1, 2], base_model_name_or_path=str(folder)).save_pretrained(
        root / "exits")
    return {"root": root, "model": model, "csv": csv, "run": root / "run", "lm": folder, "exits": root / "exits"}


def _edit(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    for key, value in fields.items():
        *outer, last = key.split(".")
        node = data
        for k in outer:
            node = node[k]
        node[last] = value
    path.write_text(json.dumps(data))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_classifier_config_with_ten_million_labels(ws, tmp_path):
    run = _copy(ws["run"], tmp_path / "run")
    _edit(run / "checkpoint" / "offramp_config.json", num_labels=10**7, label_names=None)
    rc, err = offramp_capped("predict", "--model", run, "good great")
    assert rc == 2 and "head shapes do not match" in err and "(the config asks for (10000000," in err, err[-2000:]


@pytest.mark.parametrize("width, match", [(2 * 10**7, "confidence_hidden must be an integer in [1, 65536]"),
                                          (60_000, "head shapes do not match")])
def test_token_exits_with_a_crafted_confidence_width(ws, tmp_path, width, match):
    exits = _copy(ws["exits"], tmp_path / "exits")
    _edit(exits / "offramp_config.json", confidence_hidden=width)
    rc, err = offramp_capped("generate", "--model", ws["lm"], "--exits", exits, "--prompt", "w5 w6",
                             "--max-new-tokens", "2")
    assert rc == 2 and match in err and str(width) in err, err[-2000:]


@pytest.mark.parametrize("field, value, match", [
    ("num_hidden_layers", 10**9, "says num_hidden_layers 1000000000, but the weights hold layers 0..3"),
    ("intermediate_size", 10**7, "describes a model of"),
    ("vocab_size", 10**8, "describes a model of"),
])
def test_a_backbone_config_that_asks_for_more_than_its_weights(ws, tmp_path, field, value, match):
    model = _copy(ws["model"], tmp_path / "tiny")
    _edit(model / "config.json", **{field: value})
    rc, err = offramp_capped("train", "--model", model, "--data", ws["csv"], "--out", tmp_path / "out", "--epochs", 1)
    assert rc == 2 and match in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_causal_lm_config_with_a_billion_layers(ws, tmp_path):
    lm = _copy(ws["lm"], tmp_path / "lm")
    _edit(lm / "config.json", num_hidden_layers=10**9)
    rc, err = offramp_capped("generate", "--model", lm, "--prompt", "w5 w6", "--max-new-tokens", "2")
    assert rc == 2 and "says num_hidden_layers 1000000000" in err, err[-2000:]
