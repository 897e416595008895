"""The ``offramp`` command line: one explicit table of commands, one error and progress convention.

``COMMANDS`` lists every subcommand with the module that defines it (``add_<name>_parser`` next to
``cmd_<name>``): ``train``, ``traces`` (collect, sweep, evaluate), ``predict``, ``demo``, ``bench``,
``train_lm``, ``fit_exits``, ``generate``, ``reason`` (run, build, fit), ``calibrate`` and ``serve``; ``common`` holds the shared
options (data, policy, outputs). Adding a command is its module's two functions plus one line in ``COMMANDS``. Bad input
ends with ``offramp <cmd>: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import warnings
from typing import Any

COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("train", "offramp.cli.train", "add_train_parser"),
    ("collect", "offramp.cli.traces", "add_collect_parser"),
    ("sweep", "offramp.cli.traces", "add_sweep_parser"),
    ("evaluate", "offramp.cli.traces", "add_evaluate_parser"),
    ("predict", "offramp.cli.predict", "add_predict_parser"),
    ("train-lm", "offramp.cli.train_lm", "add_train_lm_parser"),
    ("fit-exits", "offramp.cli.fit_exits", "add_fit_exits_parser"),
    ("generate", "offramp.cli.generate", "add_generate_parser"),
    ("reason", "offramp.cli.reason", "add_reason_parser"),
    ("calibrate", "offramp.cli.calibrate", "add_calibrate_parser"),
    ("serve", "offramp.cli.serve", "add_serve_parser"),
    ("demo", "offramp.cli.demo", "add_demo_parser"),
    ("bench", "offramp.cli.bench", "add_bench_parser"),
)


# -------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The ``offramp`` parser with every subcommand of ``COMMANDS``."""
    from offramp.version import __version__

    parser = argparse.ArgumentParser(prog="offramp", description="Early exits for Hugging Face models "
                                     "that really skip the compute.")
    parser.add_argument("--version", action="version", version=f"offramp {__version__}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _add_common_flags(parser, "_main")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, module, name in COMMANDS:  # an import error here is an error, never a missing command
        getattr(importlib.import_module(module), name)(sub)
    _add_to_subcommands(sub)
    return parser


def _add_common_flags(p: argparse.ArgumentParser, suffix: str = "") -> None:
    """--quiet, --debug and --encoding-errors; on the main parser (``offramp --quiet train``) and on
    every subcommand (``offramp train --quiet``), under different names so neither hides the other."""
    p.add_argument("--quiet", dest=f"quiet{suffix}", action="store_true", default=False,
                   help="no progress bars or progress lines on stderr")
    p.add_argument("--debug", dest=f"debug{suffix}", action="store_true", default=False,
                   help="show the full traceback of an error")
    p.add_argument("--encoding-errors", dest=f"encoding_errors{suffix}", choices=["strict", "replace"],
                   default=None, help="text input that is not UTF-8: strict (default: an error naming the file "
                                      "and line) or replace (such bytes become U+FFFD)")


def _add_to_subcommands(sub: Any) -> None:
    for name, p in sub.choices.items():
        if name == "bench":  # its arguments go to the benchmark as they are
            continue
        _add_common_flags(p)
        for action in p._actions:  # nested subcommands (reason run | build | fit)
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    _add_common_flags(child)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``offramp`` command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.bench_args = extra  # everything after `bench` belongs to the benchmark
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    quiet = args.quiet_main or getattr(args, "quiet", False)
    debug = args.debug_main or getattr(args, "debug", False)
    errors = getattr(args, "encoding_errors", None) or args.encoding_errors_main or "strict"
    name = " ".join(filter(None, [args.command, getattr(args, "reason_command", None)]))
    try:
        _text_arguments(args, errors)
    except ValueError as e:
        print(f"offramp {name}: error: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from offramp.data.sources import encoding_errors
    from offramp.utils import is_quiet, set_quiet

    was_quiet, shown = is_quiet(), warnings.showwarning
    set_quiet(quiet)
    warnings.showwarning = _show_warning(name)
    try:
        with encoding_errors(errors):
            return int(args.func(args) or 0)
    except ValueError as e:  # offramp's own errors: bad input, damaged or foreign files
        if debug:
            raise
        print(f"offramp {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused: name the file
        if debug or e.errno not in USER_OS_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"offramp {name}: error: cannot write or read{where}: {e.strerror}; check the path and its "
              "permissions and free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"offramp {name}: interrupted; files already written are complete", file=sys.stderr)
        return 130
    finally:
        set_quiet(was_quiet)
        warnings.showwarning = shown


TEXT_ARGUMENTS = {"texts": "text", "prompt": "--prompt", "question": "--question"}  # dest: how it is named


def _text_arguments(args: argparse.Namespace, errors: str) -> None:
    """Texts given as arguments that hold bytes which are not UTF-8 (Python keeps them as lone
    surrogates): an error naming the argument (strict), or the bytes replaced by U+FFFD (replace),
    as for text read from files. Paths are left alone (any bytes name a file)."""
    for dest, label in TEXT_ARGUMENTS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        many = isinstance(value, list)
        fixed = []
        for n, text in enumerate(value if many else [value], 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                if errors != "replace":
                    byte = ord(text[e.start]) - 0xDC00
                    where = f"{label} {n}" if many else label
                    raise ValueError(f"{where} is not UTF-8 (byte 0x{byte:02x} at character {e.start}): pass UTF-8 "
                                     "text, or --encoding-errors replace to read such bytes as U+FFFD") from None
                text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            fixed.append(text)
        setattr(args, dest, fixed if many else fixed[0])


USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOTDIR, errno.EISDIR,
                  errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.EDQUOT}


ONCE_PER_COMMAND = ("TruncationWarning",)  # said once: the same advice for every split a command reads


def _show_warning(command: str):
    """Warnings as one line, ``offramp CMD: warning: ...``, on stderr; a warning of a category in
    ``ONCE_PER_COMMAND`` only the first time in a command (the others name another split)."""
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        name = getattr(category, "__name__", "")
        if name in ONCE_PER_COMMAND:
            if name in said:
                return
            said.add(name)
        print(f"offramp {command}: warning: {message}", file=file or sys.stderr, flush=True)
    return show


if __name__ == "__main__":
    sys.exit(main())
