"""``offramp predict``: texts in, label, confidence and exit layer out."""

from __future__ import annotations

import argparse
import json
from typing import Any

from offramp.cli import common


def add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="texts in, label + confidence + exit layer out (JSON lines)",
                       description="Classify texts given as arguments, in a file (--file: .txt one per "
                                   "line, or .csv/.jsonl with a text column), or on stdin. Prints one JSON "
                                   "object per text: label, confidence, exit_layer.")
    p.add_argument("texts", nargs="*", help="texts to classify ('-' or none: read stdin)")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--file", default=None, help=".txt (one text per line) or .csv/.tsv/.jsonl")
    p.add_argument("--text-column", default=None, help="text column of a .csv/.jsonl --file")
    common.add_policy_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None)
    common.add_device_args(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    common.require_min(args, batch_size=1, max_length=2)
    folder = common.checkpoint_dir(args.model)  # a wrong path is reported before any library loads
    texts = common.read_texts(args.texts, args.file, args.text_column)
    from offramp.modeling import EarlyExitModel

    model = EarlyExitModel.from_pretrained(folder, device=common.chosen_device(args, "predict"), dtype=args.dtype)
    policy = common.make_policy_arg(args.policy, args.value, model.config.policy)
    max_length = common.fit_max_length(model, args.max_length or model.config.extra.get("data", {}).get(
        "max_length", 128), given=args.max_length is not None)
    for row in common.predict_rows(model, texts, policy, batch_size=args.batch_size, max_length=max_length):
        print(json.dumps(row, ensure_ascii=False))
    return 0
