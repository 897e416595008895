"""Offline assets for the data / CLI / sweep tests: a word-level tokenizer, a tiny BERT, a CSV.

Everything is synthetic: the tokenizer is a ``BertTokenizerFast`` over a vocab file written here,
the model a random-init 4-layer BERT (hidden 32), and the CSV a 3-class "sentiment" set whose label
is set by the words it contains (so a few steps of training learn something).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "love", "happy", "excellent", "nice", "fun", "best"]
NEGATIVE = ["bad", "awful", "hate", "sad", "terrible", "worst", "boring", "ugly"]
NEUTRAL = ["car", "road", "day", "city", "news", "phone", "train", "table", "paper", "window"]
FILLER = ["the", "a", "is", "was", "very", "this", "that", "it", "and", "my"]
LABELS = {"negative": NEGATIVE, "neutral": NEUTRAL, "positive": POSITIVE}


def write_tokenizer(directory: Path) -> BertTokenizerFast:
    """A lowercase word-level BERT tokenizer over the words above, saved into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + NEUTRAL + FILLER))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(directory)
    return tok


def write_model(directory: Path, *, layers: int = 4, seed: int = 0) -> Path:
    """A random-init tiny BERT with its tokenizer, saved as a HF model folder."""
    tok = write_tokenizer(directory)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(directory)
    return directory


def sentence(label: str, rng: random.Random) -> str:
    """A few words with one to three words of the label's list mixed into filler."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randint(0, len(words)), rng.choice(LABELS[label]))
    return " ".join(words)


def write_csv(path: Path, n: int = 90, *, seed: int = 0, text_column: str = "text",
              label_column: str = "label", pair: bool = False) -> Path:
    """A CSV of ``n`` rows (text, label), balanced over the three labels; with ``pair`` two texts."""
    rng = random.Random(seed)
    names = sorted(LABELS)
    with path.open("w", newline="") as f:
        cols = [text_column] + (["text2"] if pair else []) + [label_column]
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(n):
            label = names[i % 3]
            row = [sentence(label, rng)] + ([sentence("neutral", rng)] if pair else []) + [label]
            w.writerow(row)
    return path
