"""The options of the classify speed benchmark (``offramp bench``, ``benchmarks/classify_speed.py``),
kept apart from the benchmark so that ``--help`` and bad options answer without loading torch."""

from __future__ import annotations

import argparse


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's argument parser (``prog``: the program name in usage lines)."""
    p = argparse.ArgumentParser(prog=prog,
                                description="Per-row early-exit classification speed vs the plain HF forward.")
    p.add_argument("--model", default="minilm", help="minilm | mpnet | offramp checkpoint | HF encoder path")
    p.add_argument("--mpnet", action="store_true", help="shorthand for --model mpnet (12 layers)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--rows", type=int, default=64, help="rows timed per variant")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall-clock (default) or this process's CPU time (robust on a shared machine); "
                        "both are recorded under detail_bs*")
    p.add_argument("--json", dest="json_path", default=None, help="write the JSON here too")
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's moving malloc thresholds (by default they are fixed: see steady_allocator)")
    return p
