"""``offramp fit-exits``: token exits for a frozen causal LM, distilled on its own greedy
continuations of offline prompts (or on your text) and saved to a folder ``generate --exits`` and
``calibrate`` take.

    offramp fit-exits --model smollm2-offline --out exits/smollm2 --chat
    offramp fit-exits --model runs/llama --out exits/llama --fit-text corpus.txt --exit-layers 4,6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from offramp.cli import common
from offramp.names import LM_HEAD_TYPES


def add_fit_exits_parser(subparsers: Any) -> None:
    """Register the ``fit-exits`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("fit-exits", help="fit token exits on a frozen causal LM",
                              description=common.help_text(__doc__))
    p.add_argument("--model", required=True,
                   help="HF causal LM folder or Hub id, or an offline alias: smollm2-offline, mamba-bbc-offline")
    p.add_argument("--out", required=True, help="folder for the exits (DecoderExitModel.save_pretrained)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--chat", action="store_true", help="wrap the offline prompts in the model's chat template")
    common.add_device_args(p, dtype_help="the LM's dtype")
    p.add_argument("--head", choices=LM_HEAD_TYPES, default="ffn",
                   help="the exit head (default ffn; mamba: the DYNAMAX Mamba block)")
    p.add_argument("--exit-layers", metavar="LAYERS",
                   help="layers run before each exit, e.g. 15,18,21 "
                   "(default: 5 exits in the second half)")
    p.add_argument("--train-prompts", type=int, default=64,
                   help="without --fit-text: how many offline BBC News prompts the model continues (default 64)")
    p.add_argument("--fit-text", metavar="DATA", help="distil on this text instead of the "
                   "model's own continuations (teacher-forced, no decoding): a .txt file (documents "
                   "separated by blank lines), a .csv/.tsv/.jsonl file, bbc, or a Hub dataset name")
    p.add_argument("--text-column", help="with --fit-text: the column holding the text (default: detected)")
    p.add_argument("--fit-split", default="train", help="with --fit-text and a Hub dataset: the split")
    p.add_argument("--fit-texts", type=int, default=256, help="with --fit-text: how many texts to use")
    p.add_argument("--fit-max-tokens", type=int, default=256, help="with --fit-text: tokens kept per text")
    p.add_argument("--fit-epochs", type=int, default=3, help="epochs of head distillation (default 3)")
    p.add_argument("--top-k", type=int, default=1,
                   help="an exit is right where its token is among the full model's top k (default 1)")
    p.set_defaults(func=cmd_fit_exits)


def cmd_fit_exits(args: argparse.Namespace) -> int:
    """Handler of ``offramp fit-exits``; ValueError on bad input (the main CLI prints it)."""
    from offramp.data import load_texts
    from offramp.modeling.causal_lm import load_causal_lm
    from offramp.training.distill import fit_token_exits

    common.require_min(args, fit_epochs=1, train_prompts=1, fit_texts=1, fit_max_tokens=2, top_k=1)
    layers = common.parse_exits(args.exit_layers) if args.exit_layers else None
    if args.text_column and not args.fit_text:
        raise ValueError("--text-column names a column of --fit-text: add --fit-text DATA, or drop it")
    common.check_out(Path(args.out), args.overwrite, "exits folder",
                     common.inputs(model=args.model, fit_text=args.fit_text))
    backbone, tok = load_causal_lm(args.model, args.dtype, common.chosen_device(args, "fit-exits"))
    texts = None
    if args.fit_text:
        texts = load_texts(args.fit_text, text_column=args.text_column, split=args.fit_split, limit=args.fit_texts)
    model = fit_token_exits(backbone, tok, args.model, exit_layers=layers, head=args.head, top_k=args.top_k,
                            texts=texts, max_tokens=args.fit_max_tokens, prompts=args.train_prompts, chat=args.chat,
                            epochs=args.fit_epochs, log=lambda m: common.log(f"fit-exits: {m}"))
    model.save_pretrained(args.out)
    common.log(f"fit-exits: saved to {args.out}")
    print(json.dumps({"out": args.out, "model": model.config.base_model_name_or_path,
                      "exit_layers": list(model.exit_layers), "head": args.head}))
    return 0
