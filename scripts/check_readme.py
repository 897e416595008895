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
chain runs as one script, in place of its last block (so later commands find what it wrote). A
python block whose first line says it needs internet is compiled, not run.

An ```output block after a bash or python block (```output of="offramp demo": after the block
that holds that) is what the block's last command (or the python example) prints: every line shown
must be printed, in order (other lines may come between); ``...`` stands for anything, and
```output tolerance=0.1 lets each shown number be off by 10% of itself (timings, sampled
figures); without it numbers must be exact. So a shown output cannot drift from what the command
prints.

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
         "docs/reasoning.md", "docs/serving.md", "docs/training.md", "docs/devices.md")


@dataclass
class Block:
    number: int
    lang: str
    line: int  # 1-based line of the opening fence
    text: str
    continues: bool = False  # a python block that continues the one before it
    page: str = "README.md"
    expect: str | None = None  # a shown output (an ```output block right after it) its last command must print
    tolerance: float = 0.0     # how far a shown number may be from the printed one (relative)

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"


def blocks(readme: str, page: str = "README.md", first: int = 1) -> list[Block]:
    """The fenced bash and python blocks of ``readme`` (a page), in order, numbered from ``first``."""
    out, lines, i = [], readme.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w+)(.*)$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if m.group(1) == "output":
            of = re.search(r'of="([^"]+)"', m.group(2))  # the earlier command it shows, when not the last one
            owners = [b for b in out if of is None or of.group(1) in b.text]
            if owners and owners[-1].expect is None:
                tol = re.search(r"tolerance=([0-9.]+)", m.group(2))
                owners[-1].expect, owners[-1].tolerance = "\n".join(body), float(tol.group(1)) if tol else 0.0
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


NUMBER = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"


def line_matches(expected: str, actual: str, tolerance: float) -> bool:
    """Whether a printed line is the shown one: ``...`` stands for anything, and each number may be
    off by ``tolerance`` of itself (0: exactly); the rest must be the same."""
    parts = re.split(f"({NUMBER}|\\.\\.\\.)", expected.strip())
    pattern = "".join(f"({NUMBER})" if re.fullmatch(NUMBER, p) else ".*?" if p == "..." else re.escape(p)
                      for p in parts)
    m = re.fullmatch(pattern, actual.strip())
    if m is None:
        return False
    shown = [float(p) for p in parts if re.fullmatch(NUMBER, p)]
    return all(abs(float(got) - want) <= tolerance * abs(want) for got, want in zip(m.groups(), shown))


def output_mismatch(expected: str, printed: str, tolerance: float) -> str | None:
    """None when every shown line is printed, in order (other lines may come between); else the
    first shown line that was not."""
    lines = printed.splitlines()
    at = 0
    for want in filter(str.strip, expected.splitlines()):
        while at < len(lines) and not line_matches(want, lines[at], tolerance):
            at += 1
        if at == len(lines):
            return want
        at += 1
    return None


def _tail(text: str, n: int = 1500) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_command(cmd: str, timeout: float, expect: str | None = None, tolerance: float = 0.0) -> dict:
    """Run one README command; offline ones must succeed, internet ones must fail cleanly; with
    ``expect`` (the page's shown output), it must print those lines."""
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
        elif expect is not None:
            missing = output_mismatch(expect, proc.stdout, tolerance)
            if missing is not None:
                result.update(ok=False, why=f"the page shows a line it did not print: {missing!r}",
                              stdout=_tail(proc.stdout))
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
    elif chain[-1].expect is not None:
        missing = output_mismatch(chain[-1].expect, proc.stdout, chain[-1].tolerance)
        if missing is not None:
            result.update(ok=False, why=f"the page shows a line it did not print: {missing!r}")
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
        cmds = commands(b)
        for k, cmd in enumerate(cmds):
            if CI_COMMAND in cmd:
                results.append({"command": cmd, "kind": "the CI test command (.ci/run runs it)", "ok": True})
                print(json.dumps(results[-1]), flush=True)
                continue
            note(f"block {b.number} ({b.where}): {cmd[:150]}")
            last = k == len(cmds) - 1
            results.append(run_command(cmd, a.timeout, b.expect if last else None, b.tolerance))
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
