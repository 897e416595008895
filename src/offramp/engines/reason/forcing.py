"""Forced exits: fork the generation from its cached prefix, force the answer, read it off.

At a cue the KV cache already holds the prefix. ``fork_cache`` copies it and crops the copy to
the prefix length (no re-encoding); the answer-forcing text is then fed in one forward pass and
the answer decoded greedily until its terminator (the closing brace of ``\\boxed{``, or the end
of the line for plain forcing). ``force_answers`` does that for many prefixes at once, in one batch.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from offramp.engines.reason.rowcache import RowCache, input_device, left_pad

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
        cache: an HF KV cache of one row holding exactly the prefix (use ``fork_cache``); it is consumed.
        forcing_ids: token ids of the answer-forcing text.
        boxed: the answer ends at the brace closing ``\\boxed{`` (else at the line/sentence end).
        decode: token ids -> text (the tokenizer's ``decode``).
        eos_ids: ids that end generation.
        max_answer_tokens: the most answer tokens to generate.
    """
    n, device = cache.get_seq_length(), input_device(model)
    rows = RowCache(cache, torch.ones(1, n, dtype=torch.long, device=device), torch.tensor([n], device=device))
    return force_answers(model, rows, [forcing_ids], boxed=boxed, decode=decode, eos_ids=eos_ids,
                         max_answer_tokens=max_answer_tokens)[0]


@torch.no_grad()
def force_answers(model, rows, forcing_ids: list[list[int]], *, boxed: bool, decode, eos_ids: set[int],
                  max_answer_tokens: int = 16) -> list[ForcedAnswer]:
    """The forced answers of every row of a ``RowCache`` of prefixes, decoded together.

    Row i gets ``forcing_ids[i]`` after its prefix (one forward pass for all rows; ragged forcing
    texts are left-padded in the block), then the answers are decoded greedily, a row leaving the
    batch when its answer is closed, it emits EOS or reaches ``max_answer_tokens``. ``rows`` is
    consumed. Each row's answer is the one ``force_answer`` gives it alone."""
    if len(forcing_ids) != rows.batch:
        raise ValueError(f"{len(forcing_ids)} forcing texts for {rows.batch} prefixes")
    if any(not f for f in forcing_ids):
        raise ValueError("forcing_ids is empty: the answer-forcing text must encode to tokens")
    inp, mask = left_pad(forcing_ids)
    logits = rows.step(model, inp, mask, logits_to_keep=1).logits[:, -1]  # (b, v)
    ids: list[list[int]] = [[] for _ in forcing_ids]
    logps: list[list[float]] = [[] for _ in forcing_ids]
    out: list[ForcedAnswer | None] = [None] * len(forcing_ids)
    live = list(range(len(forcing_ids)))  # rows of ``rows`` -> answer index
    for _ in range(max_answer_tokens):
        best, nxt = logits.float().log_softmax(-1).max(-1)  # (r,): greedy tokens and their log-probabilities
        host = torch.stack([best.double(), nxt.double()], 1).tolist()  # one transfer per answer token
        keep: list[int] = []
        for j, a in enumerate(live):
            t = int(host[j][1])
            if t in eos_ids:
                out[a] = ForcedAnswer(decode(ids[a]).strip(), tuple(ids[a]), _mean_prob(logps[a]), False)
                continue
            ids[a].append(t)
            text = decode(ids[a])
            end = answer_end(text, boxed)
            if end is not None:
                # the terminator token does not count towards the confidence unless it carries answer text
                if end > len(decode(ids[a][:-1])) or len(ids[a]) == 1:
                    logps[a].append(host[j][0])
                out[a] = ForcedAnswer(text[:end].strip(), tuple(ids[a]), _mean_prob(logps[a]), True)
                continue
            logps[a].append(host[j][0])
            keep.append(j)
        if not keep or len(ids[live[keep[0]]]) >= max_answer_tokens:
            break
        if len(keep) < len(live):
            rows.keep(keep)
            nxt = nxt[torch.tensor(keep, device=nxt.device)]
            live = [live[j] for j in keep]
        logits = rows.step(model, nxt[:, None], logits_to_keep=1).logits[:, -1]
    for a in range(len(out)):
        if out[a] is None:
            out[a] = ForcedAnswer(decode(ids[a]).strip(), tuple(ids[a]), _mean_prob(logps[a]), False)
    return out  # type: ignore[return-value]


def _mean_prob(logps: list[float]) -> float:
    return float(sum(math.exp(v) for v in logps) / len(logps)) if logps else 0.0


def reencoded_answer(model, prefix_ids: list[int], forcing_ids: list[int], **kwargs) -> ForcedAnswer:
    """The forced answer computed from scratch on ``prefix_ids`` (reference for ``force_answer``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([prefix_ids], device=input_device(model)), cache=cache, use_cache=True,
              logits_to_keep=1)
    return force_answer(model, cache, forcing_ids, **kwargs)


def hidden_features(hidden_states: tuple[Tensor, ...], layers: tuple[int, ...], row: int = 0) -> Tensor:
    """(len(layers) * h,) features of ``row``'s last position from HF ``hidden_states`` (0 = embeddings)."""
    return torch.cat([hidden_states[i][row, -1].float() for i in layers])  # (L*h,)
