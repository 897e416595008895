"""``offramp bench``: the classify speed benchmark (benchmarks/classify_speed.py) as a command; its
options are parsed before torch loads, so ``--help`` and a bad option answer at once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from offramp.cli.common import add_device_args, chosen_device


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="the classify speed benchmark (plain HF vs early exit, JSON)",
                       description="The classify speed benchmark (benchmarks/classify_speed.py): overhead "
                                   "of the early-exit engine and realised vs ideal speed-up at batch sizes "
                                   "1 and 32, as JSON. Arguments after `bench` go to the benchmark "
                                   "(`offramp bench --help` lists them).",
                       add_help=False)
    p.set_defaults(func=cmd_bench, bench_args=[])


def cmd_bench(args: argparse.Namespace) -> int:
    argv = list(args.bench_args)
    argv = argv[1:] if argv[:1] == ["--"] else argv
    bench_parser("offramp bench").parse_args(argv)  # --help and bad options answer before torch loads
    bench_main(argv, prog="offramp bench")
    return 0


def bench_parser(prog: str | None = None) -> argparse.ArgumentParser:
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
    add_device_args(p)
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's moving malloc thresholds (by default they are fixed: see steady_allocator)")
    return p


def bench_main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    from offramp.cli.common import parse_ints
    from offramp.evaluation.bench import run
    from offramp.utils import check_out

    p = bench_parser(prog)
    a = p.parse_args(argv)
    device = chosen_device(a, "bench")
    if a.json_path:
        check_out(Path(a.json_path), True, "--json file", file=True)
    sizes = tuple(parse_ints(a.batch_sizes, "--batch-sizes", "comma-separated batch sizes like 1,32"))
    out = run("mpnet" if a.mpnet else a.model, batch_sizes=sizes,
              num_rows=a.rows, seq_len=a.seq_len, repeats=a.repeats, threads=a.threads, clock=a.clock,
              json_path=a.json_path, default_allocator=a.default_allocator, device=device, dtype=a.dtype)
    print(json.dumps(out, indent=2))
    return out
