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


DRIVER = """
import contextlib, io, json, sys
from offramp.cli import main
results = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["--threads", "1", *argv])
        except Exception as e:  # what an unchecked size does under the cap: its own case fails
            rc = type(e).__name__
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


def offramp_capped(*runs: list) -> list[tuple[int, str]]:
    """Each argv of ``runs`` through ``offramp``, in one process (torch loads once) capped at 2 GiB."""
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps([[str(a) for a in r] for r in runs]),
                          capture_output=True, text=True, preexec_fn=_capped, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(x) for x in json.loads(proc.stdout.splitlines()[-1])]


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


def _cases(ws: dict[str, Path], root: Path) -> dict[str, tuple[list, str]]:
    """{case: (argv, what the error must say)}, each on its own crafted copy."""
    cases: dict[str, tuple[list, str]] = {}
    run = _copy(ws["run"], root / "labels")
    _edit(run / "checkpoint" / "offramp_config.json", num_labels=10**7, label_names=None)
    cases["ten-million-labels"] = (["predict", "--model", run, "good great"],
                                   "classifiers.linears.0.3.bias (3,) (the config asks for (10000000,))")
    for width, match in ((2 * 10**7, "confidence_hidden must be an integer in [1, 65536]"),
                         (60_000, "head shapes do not match")):
        exits = _copy(ws["exits"], root / f"exits-{width}")
        _edit(exits / "offramp_config.json", confidence_hidden=width)
        cases[f"confidence-{width}"] = (["generate", "--model", ws["lm"], "--exits", exits, "--prompt", "w5 w6",
                                         "--max-new-tokens", "2"], match)
    for field, value, match in (("num_hidden_layers", 10**9, "says num_hidden_layers 1000000000, but the weights "
                                                             "hold layers 0..3"),
                                ("intermediate_size", 10**7, "describes a model of"),
                                ("vocab_size", 10**8, "describes a model of")):
        model = _copy(ws["model"], root / field)
        _edit(model / "config.json", **{field: value})
        cases[f"encoder-{field}"] = (["train", "--model", model, "--data", ws["csv"], "--out", root / f"out-{field}",
                                      "--epochs", 1], match)
    lm = _copy(ws["lm"], root / "lm")
    _edit(lm / "config.json", num_hidden_layers=10**9)
    cases["causal-lm-layers"] = (["generate", "--model", lm, "--prompt", "w5 w6", "--max-new-tokens", "2"],
                                 "says num_hidden_layers 1000000000")
    return cases


CASES = ["ten-million-labels", "confidence-20000000", "confidence-60000", "encoder-num_hidden_layers",
         "encoder-intermediate_size", "encoder-vocab_size", "causal-lm-layers"]


@pytest.fixture(scope="module")
def results(ws, tmp_path_factory) -> dict[str, tuple[int, str, str, Path]]:
    root = tmp_path_factory.mktemp("crafted")
    cases = _cases(ws, root)
    assert sorted(cases) == sorted(CASES)
    out = offramp_capped(*[cases[c][0] for c in CASES])
    return {c: (rc, err, cases[c][1], root) for c, (rc, err) in zip(CASES, out)}


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_size_is_refused_before_any_allocation(results, case):
    rc, err, match, root = results[case]
    assert rc == 2 and match in err and "Traceback" not in err, err[-2000:]
    assert not list(root.glob("out-*"))  # train wrote nothing
