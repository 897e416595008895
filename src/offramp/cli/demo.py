"""``offramp demo``: the offline end-to-end comparison of exit rules."""

from __future__ import annotations

import argparse
from typing import Any

from offramp.cli import common


def add_demo_parser(sub: Any) -> None:

    p = sub.add_parser("demo", help="the offline end-to-end comparison of exit rules (the README's command)",
                       description="Train exits on a frozen MiniLM-L6 for the offline tweets set, compare "
                                   "PABEE, PonderNet, PALBERT (Q-exit), entropy and max-prob, measure real "
                                   "speed-ups, and write a report folder with summary.json.")
    _add_demo_args(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    common.chosen_device(args, "demo")  # a missing GPU is an error before any loading
    from offramp.demo import run_demo

    return run_demo(args)


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF encoder name or folder, or an offline alias: minilm "
                   "(the default), mpnet")
    p.add_argument("--data", default="tweets", help="tweets (default), bbc, a .csv/.jsonl file, split files "
                   "(train=FILE,validation=FILE,test=FILE) or a HF dataset")
    p.add_argument("--data-config", default=None, help="HF dataset configuration")
    p.add_argument("--out", default=None, help="report folder (default: a fresh offramp-demo-<time> folder)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max-train", type=int, default=2000, help="training examples (default 2000)")
    p.add_argument("--max-eval", type=int, default=500, help="validation and test examples (default 500)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    p.add_argument("--epochs", type=int, default=12, help="epochs over the cached states (default 12)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--time-examples", type=int, default=160, help="test examples timed per rule (default 160)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per rule (median kept; default 3)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time by wall-clock (default) or by this process's CPU time; with offramp --threads 1 "
                        "the ratio holds when other processes load the machine (with more threads, waiting "
                        "threads burn CPU time too)")
    p.add_argument("--tolerance", type=float, default=0.01, help="accuracy within this of the full model")
    p.add_argument("--seed", type=int, default=0)
    common.add_state_cache_arg(p)
    common.add_device_args(p, dtype_help="training precision: float32, or bfloat16 / float16 mixed precision "
                                         "(autocast, float32 weights)")
