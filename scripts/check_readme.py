"""Run every command block of the README and of the docs pages, as written, and check each one.

The pages run in ``PAGES`` order (README first, then docs/ in the order of mkdocs.yml's nav), so a
page may use what an earlier one wrote.

Each ```bash block is split into commands (a line ending in a backslash continues the command;
comment lines are skipped) and run with bash in the repository root, in README order, so that a
later command finds what an earlier one wrote. A command whose comment says "needs internet" is run with
the Hugging Face Hub offline and must stop with offramp's own error line (``offramp CMD: error:``)
that names the problem, not a traceback. The test command of the Quick start is the one CI runs
itself (.ci/run), so it is not run a second time here.

Each ```python block is run as a script; a block whose preceding paragraph says "Continuing the
Python example above" continues the python block before it (bash blocks may stand between): the
chain runs as one script, in place of its last block (so later commands find what it wrote). A python block whose first
line says it needs internet is compiled, not run.

Prints one JSON object per command on stdout as it finishes, and a summary line; progress on
stderr. Exit status 1 when any command failed.

    python scripts/check_readme.py                # every block
    python scripts/check_readme.py --list         # what would run, numbered
    python scripts/check_readme.py --only 3,4     # some blocks (by number)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERNET = re.compile(r"#.*\bneeds internet\b")
CONTINUES = "continuing the python example above"
CI_COMMAND = "python -m pytest"
OFFLINE_ERROR = re.compile(r"^offramp [\w -]+: error: .+", re.MULTILINE)


PAGES = ("README.md", "docs/tutorial.md", "docs/classification.md", "docs/calibration.md", "docs/generation.md",
         "docs/reasoning.md", "docs/serving.md", "docs/training.md")


@dataclass
class Block:
    number: int
    lang: str
    line: int  # 1-based line of the opening fence
    text: str
    continues: bool = False  # a python block that continues the one before it
    page: str = "README.md"

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"


def blocks(readme: str, page: str = "README.md", first: int = 1) -> list[Block]:
    """The fenced bash and python blocks of ``readme`` (a page), in order, numbered from ``first``."""
    out, lines, i = [], readme.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if m.group(1) in ("bash", "python"):
            before = "\n".join(lines[max(0, start - 4):start]).lower()
            out.append(Block(first + len(out), m.group(1), start + 1, "\n".join(body) + "\n",
                             continues=m.group(1) == "python" and CONTINUES in before, page=page))
    return out


def commands(block: Block) -> list[str]:
    """The commands of a bash block: continuation lines joined, comment lines dropped."""
    out, current = [], ""
    for raw in block.text.splitlines():
        line = raw.rstrip()
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return out


def _tail(text: str, n: int = 1500) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_command(cmd: str, timeout: float) -> dict:
    """Run one README command; offline ones must succeed, internet ones must fail cleanly."""
    internet = INTERNET.search(cmd) is not None
    env = dict(os.environ)
    if internet:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.time()
    try:
        proc = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"command": cmd, "ok": False, "why": f"ran past {timeout:.0f} s",
                "stderr": _tail((e.stderr or b"").decode("utf-8", "replace") if isinstance(e.stderr, bytes)
                                else (e.stderr or ""))}
    seconds = round(time.time() - t0, 1)
    result = {"command": cmd, "seconds": seconds, "rc": proc.returncode}
    if internet:
        error = OFFLINE_ERROR.search(proc.stderr)
        ok = proc.returncode != 0 and error is not None and "Traceback" not in proc.stderr
        result.update(kind="needs internet: checked offline", ok=ok,
                      error=error.group(0)[:400] if error else None)
        if not ok:
            result.update(why="expected offramp's own error line offline", stderr=_tail(proc.stderr))
    else:
        result.update(kind="offline", ok=proc.returncode == 0, stdout=_tail(proc.stdout, 600))
        if proc.returncode != 0:
            result.update(why=f"exit status {proc.returncode}", stderr=_tail(proc.stderr))
    return result


def run_python(chain: list[Block], timeout: float) -> dict:
    """Run python blocks as one script (a chain continues in one interpreter)."""
    source = "".join(b.text for b in chain)
    where = ", ".join(b.where for b in chain)
    if INTERNET.match(chain[0].text.lstrip()):
        try:
            compile(source, where, "exec")
        except SyntaxError as e:
            return {"python": where, "ok": False, "why": f"does not compile: {e}"}
        return {"python": where, "kind": "needs internet: compiled", "ok": True}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, f.name], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"python": where, "ok": False, "why": f"ran past {timeout:.0f} s"}
    finally:
        os.unlink(f.name)
    result = {"python": where, "kind": "offline", "seconds": round(time.time() - t0, 1), "ok": proc.returncode == 0,
              "stdout": _tail(proc.stdout, 600)}
    if proc.returncode != 0:
        result.update(why=f"exit status {proc.returncode}", stderr=_tail(proc.stderr))
    elif not proc.stdout.strip():
        result.update(ok=False, why="printed nothing: an example should show its result")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run every command block of the README and the docs pages and check it.")
    p.add_argument("--pages", nargs="+", default=list(PAGES), help="the pages, in order (default: README.md and "
                   "the docs pages)")
    p.add_argument("--only", default=None, help="block numbers to run, e.g. 3,4 (see --list)")
    p.add_argument("--list", action="store_true", help="list the blocks and their commands, run nothing")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one command may run (default 3600)")
    a = p.parse_args(argv)
    found: list[Block] = []
    for page in a.pages:
        found += blocks((ROOT / page).read_text(encoding="utf-8"), page, len(found) + 1)
    only = None if a.only is None else {int(x) for x in a.only.split(",") if x.strip()}
    if a.list:
        for b in found:
            print(f"[{b.number}] {b.lang} ({b.where}){' continues' if b.continues else ''}")
            for c in (commands(b) if b.lang == "bash" else [b.text.splitlines()[0] + " ..."]):
                print(f"    {c}")
        return 0
    results, chain = [], []

    def flush() -> None:
        if chain:
            note(f"python block at {chain[0].where} ({len(chain)} block(s))")
            results.append(run_python(list(chain), a.timeout))
            print(json.dumps(results[-1]), flush=True)
            chain.clear()

    def note(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def continued(i: int) -> bool:
        """Whether a later python block of the same page continues the chain that block ``i`` ends."""
        later = [c for c in found[i + 1:] if c.lang == "python" and c.page == found[i].page]
        return bool(later) and later[0].continues

    for i, b in enumerate(found):
        if only is not None and b.number not in only:
            continue
        if chain and chain[-1].page != b.page:
            flush()  # a python example continues on its own page only
        if b.lang == "python":
            if not b.continues:
                flush()
            chain.append(b)
            if not continued(i):
                flush()  # the chain is whole: run it now, before the commands after it use what it wrote
            continue
        for cmd in commands(b):
            if CI_COMMAND in cmd:
                results.append({"command": cmd, "kind": "the CI test command (.ci/run runs it)", "ok": True})
                print(json.dumps(results[-1]), flush=True)
                continue
            note(f"block {b.number} ({b.where}): {cmd[:150]}")
            results.append(run_command(cmd, a.timeout))
            print(json.dumps(results[-1]), flush=True)
    flush()
    failed = [r for r in results if not r["ok"]]
    print(json.dumps({"commands": len(results), "failed": len(failed),
                      "seconds": round(sum(r.get("seconds", 0) for r in results), 1)}))
    for r in failed:
        note(f"FAILED: {r.get('command') or r.get('python')}: {r.get('why')}\n{r.get('stderr', '')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
