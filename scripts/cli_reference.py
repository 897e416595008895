"""Write docs/cli.md, the command-line reference, from the parsers themselves (``--check``: exit 1
when the committed page differs from what the parsers give, so the reference cannot drift).

    python scripts/cli_reference.py            # rewrite docs/cli.md
    python scripts/cli_reference.py --check    # CI
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "cli.md"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def reference() -> str:
    os.environ["COLUMNS"] = "100"  # the same line breaks on every terminal
    from offramp.cli import COMMANDS, build_parser

    parser = build_parser()
    commands = _subparsers(parser)
    out = ["# Command-line reference", "",
           "Generated from the parsers by `python scripts/cli_reference.py` (CI checks it is current).",
           "Every command also takes `--quiet`, `--debug` and `--encoding-errors`; `offramp --threads N`",
           "sets torch's CPU threads for any command.", ""]
    for name, _, _ in COMMANDS:
        sub = commands[name]
        children = _subparsers(sub)
        for full, p in [(name, sub)] + [(f"{name} {c}", q) for c, q in children.items()]:
            if full == name and children:
                continue
            out += [f"## offramp {full}", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write or check docs/cli.md.")
    p.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is not what the parsers give")
    a = p.parse_args(argv)
    text = reference()
    if a.check:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            print("docs/cli.md is not the parsers' reference: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
