"""A tiny word-level tokenizer, a random-init Llama, questions, a probe that always accepts and a
stateful rule, for the reasoning tests (offline)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from offramp.calibration.lynx import LynxProbe
from offramp.policies import ExitPolicy

WORDS = ["wait", "await", "hmm", "alternatively", "Wait", "so", "the", "final", "answer", "is", "boxed",
         "Question", "Answer", "Solve", "it", "step", "by", "then", "give", "as", "add", "two", "and",
         "three", "waiting"] + [str(i) for i in range(21)]
PUNCT = [".", ",", ":", "{", "}", "\\", "=", "+", "?", "!"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: words with an optional leading space, punctuation, newline, space."""
    vocab = {"<unk>": 0, "<eos>": 1, "\n": 2, " ": 3}
    for w in WORDS + PUNCT:
        for t in (w, " " + w):
            vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\w+| ?[^\w\s]|\n| "), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_lm(vocab_size: int, seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    """A random-init Llama (hidden 32) in fp32, eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=1, bos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


QUESTIONS = ["add two and three", "Solve it", "add three and two then give the answer as boxed",
             "two", "so the final answer is", "add 4 and 9 step by step", "Question 7 + 3 ?"]


def always_accepting_probe(d: int) -> LynxProbe:
    """A fitted probe whose conformal set holds class 1 always and class 0 never: it accepts
    every cue event (set the quantiles to [inf, inf] to accept none)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, d)).astype(np.float32)
    y = (np.arange(40) % 2).astype(int)
    probe = LynxProbe(epochs=5).fit(x, y).calibrate(x, y, delta=0.5)
    probe.conformal_.quantiles_ = np.array([-1.0, np.inf])  # class 0 never in the set, class 1 always
    return probe


@dataclass(frozen=True)
class AcceptEvery(ExitPolicy):
    """Accept a chain's k-th event, k = the chain's first-event token index mod 3 (a stateful rule)."""

    def start(self, batch, device):
        return {"k": None}

    def decide(self, index, signals, state):
        if state["k"] is None:
            state = {"k": int(signals.hidden.abs().sum() * 1e3) % 3}
        return torch.tensor([index == state["k"]]), state
