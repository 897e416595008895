"""A tiny word-level tokenizer and a random-init Llama for the reasoning tests (offline)."""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def test_tiny_tokenizer_round_trips_text():
    tok = tiny_tokenizer()
    text = "so the answer is 3.\n\nWait, add two and three"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert 0 not in ids  # no unknown tokens
