"""No folder is replaced unasked and no command deletes its own input: an --out that exists is
refused without --overwrite, and one that is, holds or sits inside an input is refused even with it.
Readers find the copy that a save killed between its two renames left in ``.NAME.old``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from decoder_models import tiny_lm_folder
from tiny_assets import write_csv, write_model

from offramp.cli import main

COMMON = ["--threads", "1", "--quiet"]


def fails(capsys, *argv, match: str) -> None:
    capsys.readouterr()
    assert main([*COMMON, *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    (root / "data").mkdir()
    model, csv = write_model(root / "tiny"), write_csv(root / "data" / "d.csv", n=60)
    assert main([*COMMON, "train", "--model", str(model), "--data", str(csv), "--out", str(root / "run"),
                 "--epochs", "1", "--batch-size", "16"]) == 0
    assert main([*COMMON, "collect", "--model", str(root / "run"), "--out", str(root / "trace")]) == 0
    return {"root": root, "model": model, "csv": csv, "run": root / "run", "trace": root / "trace"}


@pytest.mark.parametrize("argv, match", [
    (["collect", "--model", "{run}", "--out", "{run}", "--overwrite"], "is --model {run}"),
    (["collect", "--model", "{run}", "--out", "{root}", "--overwrite"], "holds --model {run}"),
    (["collect", "--model", "{run}", "--out", "{run}/trace", "--overwrite"], "is inside --model {run}"),
    (["collect", "--model", "{run}", "--data", "{csv}", "--out", "{csv}/..", "--overwrite"], "holds --data {csv}"),
    (["sweep", "--trace", "{trace}", "--out", "{trace}", "--overwrite"], "is --trace {trace}"),
    (["sweep", "--trace", "{trace}", "--out", "{trace}/report", "--overwrite"], "is inside --trace {trace}"),
    (["train", "--model", "{model}", "--data", "{csv}", "--out", "{model}", "--overwrite"], "is --model {model}"),
    (["train", "--model", "{model}", "--data", "train={csv},test={csv}", "--out", "{root}/data", "--overwrite"],
     "holds --data train {csv}"),
])
def test_an_output_that_is_holds_or_sits_in_an_input_is_refused_even_with_overwrite(ws, capsys, argv, match):
    fill = {k: str(v) for k, v in ws.items()}
    before = {k: snapshot(ws[k]) for k in ("run", "trace", "model")}
    fails(capsys, *[a.format(**fill) for a in argv], match=match.format(**fill))
    assert {k: snapshot(ws[k]) for k in before} == before and ws["csv"].is_file()


def test_an_existing_output_is_refused_without_overwrite(ws, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    fails(capsys, "collect", "--model", ws["run"], "--out", keep, match="already exists; pass --overwrite")
    fails(capsys, "sweep", "--trace", ws["trace"], "--out", keep, match="already exists; pass --overwrite")
    assert (keep / "notes.txt").read_text() == "mine"


def test_fit_exits_refuses_a_folder_inside_its_model(tmp_path, capsys):
    folder, _ = tiny_lm_folder(tmp_path)
    before = snapshot(folder)
    fails(capsys, "fit-exits", "--model", folder, "--out", folder / "exits", "--overwrite",
          match=f"is inside --model {folder}")
    fails(capsys, "fit-exits", "--model", folder, "--out", folder, "--overwrite", match=f"is --model {folder}")
    assert snapshot(folder) == before


def _killed_mid_swap(run: Path) -> None:
    """What a save killed between its two renames leaves where the OS cannot swap two folders at once:
    the previous checkpoint in ``.checkpoint.old`` and no ``checkpoint``."""
    (run / "checkpoint").rename(run / ".checkpoint.old")


def test_readers_find_the_copy_a_killed_save_left(ws, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ws["run"], run)
    capsys.readouterr()
    assert main([*COMMON, "predict", "--model", str(ws["run"]), "good great"]) == 0
    expected = capsys.readouterr().out
    _killed_mid_swap(run)
    assert main([*COMMON, "predict", "--model", str(run), "good great"]) == 0
    assert capsys.readouterr().out == expected
    from offramp.serving.service import checkpoint_service_kind

    assert checkpoint_service_kind(run) == "classifier"
    assert main([*COMMON, "train", "--out", str(run), "--resume", "--epochs", "2"]) == 0  # and the writer puts it back
    assert (run / "checkpoint").is_dir() and not (run / ".checkpoint.old").exists()
    assert [h["epoch"] for h in json.loads((run / "checkpoint" / "history.json").read_text())] == [1, 2]
