"""Replacing a folder is atomic: a process killed at any step of a save leaves the old or the new
folder readable, never neither, and the next save cleans what the killed one left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from paths import ROOT

from offramp.utils import atomic_dir, clean_stale, readable_dir

UTILS = ROOT / "src" / "offramp" / "utils.py"

# A save of 3 files into TARGET under atomic_dir that SIGKILLs itself at its STEP-th step: every file
# write, the flush, each rename or exchange, each removal. utils.py is loaded alone (no torch), so
# each run takes milliseconds. STEP 0 never kills. MODE "fallback": the OS offers no exchange rename.
SAVER = textwrap.dedent("""
    import importlib.util, os, shutil, signal, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("u", sys.argv[1])
    u = importlib.util.module_from_spec(spec); spec.loader.exec_module(u)
    target, step, mode, content = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    count = 0
    def kill_point(fn):
        def wrapped(*a, **k):
            global count
            count += 1
            if count == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapped
    if mode == "fallback":
        u._exchange = lambda a, b: False
    u._exchange = kill_point(u._exchange)
    u._fsync_tree = kill_point(u._fsync_tree)
    os.replace = kill_point(os.replace)
    shutil.rmtree = kill_point(shutil.rmtree)
    write = kill_point(lambda p, s: p.write_text(s))
    with u.atomic_dir(target) as tmp:
        for name in ("a", "b", "c"):
            write(tmp / name, content)
    print("steps", count)
""")


def _save(target: Path, step: int, mode: str, content: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SAVER, str(UTILS), str(target), str(step), mode, content],
                          capture_output=True, text=True, timeout=60)


def _state(target: Path) -> str:
    """"old" or "new" if the folder a reader opens is one complete version, else what is wrong."""
    folder = readable_dir(target)
    if not folder.is_dir():
        return "missing"
    files = {p.name: p.read_text() for p in folder.iterdir()}
    if set(files) != {"a", "b", "c"} or len(set(files.values())) != 1:
        return f"mixed {files}"
    return next(iter(files.values()))


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_a_kill_at_every_step_leaves_one_complete_version(tmp_path, mode):
    probe = tmp_path / "probe"
    assert _save(probe, 0, mode, "old").returncode == 0
    first = _save(probe, 0, mode, "new")  # a full save over an existing folder: count its steps
    assert first.returncode == 0
    steps = int(first.stdout.split()[-1])
    assert steps >= 6  # 3 writes, flush, swap, removal (fallback: two renames)
    for step in range(1, steps + 1):
        target = tmp_path / f"s{step}" / "model"
        assert _save(target, 0, mode, "old").returncode == 0
        killed = _save(target, step, mode, "new")
        assert killed.returncode == -9, (step, killed.stderr)  # really killed at that step
        state = _state(target)
        assert state in ("old", "new"), (mode, step, state)
        assert _save(target, 0, mode, "newer").returncode == 0  # the next save cleans up and lands
        assert _state(target) == "newer" and target.is_dir()
        assert sorted(p.name for p in target.parent.iterdir()) == ["model"], (mode, step)


def test_readers_fall_back_to_the_previous_copy(tmp_path):
    """Where the swap was cut between its two renames, readers open .NAME.old; the next save puts it
    back first, so nothing is lost."""
    target = tmp_path / "ckpt"
    old = tmp_path / ".ckpt.old"
    old.mkdir()
    (old / "x").write_text("previous")
    assert readable_dir(target) == old
    clean_stale(target)
    assert (target / "x").read_text() == "previous" and not old.exists()


def test_a_failed_block_keeps_the_old_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "f").write_text("two")
        raise RuntimeError("boom")
    assert (target / "f").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temp_folders_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.{dead}.abc.tmp"
    live = tmp_path / f".out.{os.getpid()}.xyz.tmp"  # this process: another save may be under way
    for p in (stale, live):
        p.mkdir()
    removed = clean_stale(target)
    assert removed == [stale] and not stale.exists() and live.exists()


def test_the_sweep_report_is_replaced_as_one_folder(tmp_path, monkeypatch):
    """A sweep that fails half-way (here: while writing report.md, after report.json) leaves the
    previous report folder byte-identical, not a new report.json beside an old report.md."""
    from tiny_assets import write_csv, write_model

    from offramp.cli import main
    from offramp.evaluation import report

    model, csv = write_model(tmp_path / "tiny"), write_csv(tmp_path / "d.csv", n=60)
    common = ["--threads", "1", "--quiet"]
    assert main([*common, "train", "--model", str(model), "--data", str(csv), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "16"]) == 0
    assert main([*common, "collect", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "trace")]) == 0
    sweep = [*common, "sweep", "--trace", str(tmp_path / "trace"), "--out", str(tmp_path / "rep"), "--overwrite"]
    assert main([*sweep, "--rules", "entropy"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}
    real = report.atomic_write_text

    def fail_on_markdown(path, text):
        if Path(path).name == "report.md":
            raise KeyboardInterrupt  # as if killed while writing the second file
        real(path, text)

    monkeypatch.setattr(report, "atomic_write_text", fail_on_markdown)
    assert main([*sweep, "--rules", "max_prob"]) == 130
    assert {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".rep")) == []
