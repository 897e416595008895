"""Prompts for language models: the one chat-template helper and left-padded prompt batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def chat_text(tokenizer: Any, content: str) -> str:
    """``content`` as the user's turn of the tokenizer's chat template, ready for the reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def chat_texts(tokenizer: Any, prompts: Sequence[str], chat: bool = True) -> list[str]:
    """Each prompt through :func:`chat_text` when ``chat``, else as given."""
    return [chat_text(tokenizer, p) for p in prompts] if chat else list(prompts)


def prompt_batches(tok: Any, prompts: list[str], chat: bool, batch_size: int) -> list[tuple[Any, Any]]:
    """Left-padded (input_ids, attention_mask) batches of ``prompts`` (chat-templated with ``chat``)."""
    texts = chat_texts(tok, prompts, chat)
    tok.padding_side = "left"
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True)
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out
