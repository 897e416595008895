"""The tiny word-level tokenizer of the reasoning tests round-trips text."""

from __future__ import annotations

from reasoning import tiny_tokenizer


def test_tiny_tokenizer_round_trips_text():
    tok = tiny_tokenizer()
    text = "so the answer is 3.\n\nWait, add two and three"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert 0 not in ids  # no unknown tokens
