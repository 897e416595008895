"""Forced exits: fork the generation from its cached prefix, force the answer, read it off.

At a cue the KV cache already holds the prefix. ``fork_cache`` copies it and crops the copy to
the prefix length (no re-encoding); the answer-forcing text is then fed in one forward pass and
the answer decoded greedily until its terminator (the closing brace of ``\\boxed{``, or the end
of the line for plain forcing).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

FORCING_PRESETS: dict[str, str] = {
    "boxed": "\nThe final answer is \\boxed{",
    "r1": "\n</think> Final Answer: \\boxed{",
    "plain": "\nThe final answer is ",
}


def forcing_text(name_or_text: str) -> str:
    """The forcing text of a preset name ("boxed", "r1", "plain"), or the text itself."""
    if not name_or_text:
        raise ValueError("the answer-forcing text is empty: name a preset (boxed, r1, plain) or give text")
    return FORCING_PRESETS.get(name_or_text, name_or_text)


def is_boxed(forcing: str) -> bool:
    """Whether a forcing text opens a ``\\boxed{`` (the answer then ends at its closing brace)."""
    return forcing.rstrip().endswith("{")


@dataclass(frozen=True)
class ForcedAnswer:
    """A forced answer: its text, its token ids, the mean probability of those tokens."""

    text: str
    token_ids: tuple[int, ...]
    mean_prob: float
    complete: bool  # the terminator was reached within the token limit


def fork_cache(cache, length: int):
    """A copy of ``cache`` cropped to its first ``length`` positions (the original is untouched)."""
    if length < 1 or length > cache.get_seq_length():
        raise ValueError(f"fork length {length} is outside the cached prefix (1..{cache.get_seq_length()})")
    forked = copy.deepcopy(cache)
    forked.crop(length - cache.get_seq_length())  # negative: the number of positions to drop
    return forked


def answer_end(text: str, boxed: bool) -> int | None:
    """Where the answer in ``text`` (the text after the forcing) ends, or None if not yet."""
    if boxed:
        depth = 1
        for i, ch in enumerate(text):
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return i
        return None
    m = re.search(r"\n|\.(\s|$)|\.$", text)
    if m and m.start() > 0:
        return m.start()
    return None


@torch.no_grad()
def force_answer(model, cache, forcing_ids: list[int], *, boxed: bool, decode, eos_ids: set[int],
                 max_answer_tokens: int = 16) -> ForcedAnswer:
    """Feed ``forcing_ids`` after the (already forked) ``cache`` and decode the answer greedily.

    Args:
        model: an HF causal LM.
        cache: a KV cache holding exactly the prefix (use ``fork_cache``); it is consumed.
        forcing_ids: token ids of the answer-forcing text.
        boxed: the answer ends at the brace closing ``\\boxed{`` (else at the line/sentence end).
        decode: token ids -> text (the tokenizer's ``decode``).
        eos_ids: ids that end generation.
        max_answer_tokens: the most answer tokens to generate.
    """
    if not forcing_ids:
        raise ValueError("forcing_ids is empty: the answer-forcing text must encode to tokens")
    inp = torch.tensor([forcing_ids], dtype=torch.long)
    logits = model(input_ids=inp, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]  # (v,)
    ids: list[int] = []
    logps: list[float] = []
    for _ in range(max_answer_tokens):
        logp = logits.float().log_softmax(-1)
        nxt = int(logp.argmax())
        if nxt in eos_ids:
            break
        ids.append(nxt)
        text = decode(ids)
        end = answer_end(text, boxed)
        if end is not None:
            # the terminator token does not count towards the confidence unless it carries answer text
            if end > len(decode(ids[:-1])) or len(ids) == 1:
                logps.append(float(logp[nxt]))
            return ForcedAnswer(text[:end].strip(), tuple(ids), _mean_prob(logps), True)
        logps.append(float(logp[nxt]))
        logits = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    text = decode(ids)
    return ForcedAnswer(text.strip(), tuple(ids), _mean_prob(logps), False)


def _mean_prob(logps: list[float]) -> float:
    return float(sum(math.exp(v) for v in logps) / len(logps)) if logps else 0.0


def reencoded_answer(model, prefix_ids: list[int], forcing_ids: list[int], **kwargs) -> ForcedAnswer:
    """The forced answer computed from scratch on ``prefix_ids`` (reference for ``force_answer``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([prefix_ids]), cache=cache, use_cache=True, logits_to_keep=1)
    return force_answer(model, cache, forcing_ids, **kwargs)


def hidden_features(hidden_states: tuple[Tensor, ...], layers: tuple[int, ...]) -> Tensor:
    """(len(layers) * h,) features of the last position from HF ``hidden_states`` (index 0 = embeddings)."""
    return torch.cat([hidden_states[i][0, -1].float() for i in layers])  # (L*h,)
