"""Cue events in a generated chain of thought: cue words and step boundaries, mapped to tokens.

A cue event is a place where the model pauses its reasoning: a cue word ("hmm", "wait",
"alternatively" for reasoning models; matched as whole words, so "await" and "waiting" do not
fire) or a step boundary (a blank line, or a newline right after a sentence) for instruct models
that reason in steps without such words.

Detection is streaming: an event is *confirmed* only once the text that follows settles it (a
non-letter after a word, a non-newline after a newline run), so online detection may lag one
token behind the cue. Every event is mapped to token indices of the generated sequence:

* ``token``: the token holding the cue's last character; the probe reads the hidden state there.
* ``fork``: how many generated tokens the forced-exit prefix keeps. For a cue word it is the
  first token touching the word (the prefix *before* the cue, as in LYNX); for a step boundary it
  is the token after the newline run (the finished step stays in the prefix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_CUE_WORDS: tuple[str, ...] = ("hmm", "wait", "alternatively")
SENTENCE_END = ".!?:"


@dataclass(frozen=True)
class CueConfig:
    """Which cue events to detect.

    Attributes:
        words: cue words, matched case-insensitively as whole words.
        step_boundaries: also fire at blank lines and at newlines that follow a sentence end.
        min_gap_tokens: drop an event that lands within this many tokens after the previous one.
    """

    words: tuple[str, ...] = DEFAULT_CUE_WORDS
    step_boundaries: bool = True
    min_gap_tokens: int = 0

    def __post_init__(self) -> None:
        for w in self.words:
            if not w or not re.fullmatch(r"[\w' -]+", w):
                raise ValueError(f"cue word {w!r} must be non-empty letters/digits; fix CueConfig.words")
        if not self.words and not self.step_boundaries:
            raise ValueError("CueConfig detects nothing: give cue words or set step_boundaries=True")
        if self.min_gap_tokens < 0:
            raise ValueError(f"min_gap_tokens must be >= 0, got {self.min_gap_tokens}")


@dataclass(frozen=True)
class CueMatch:
    """A cue in character space: ``text[start:end]`` is the cue, ``kind`` is "word" or "step"."""

    start: int
    end: int
    kind: str
    cue: str


@dataclass(frozen=True)
class CueEvent:
    """A cue mapped to generated-token indices (see the module docstring)."""

    index: int  # running number of the event in its chain
    token: int
    fork: int
    kind: str
    cue: str
    char: int  # character offset of the cue in the generated text


def find_cues(text: str, config: CueConfig, *, final: bool = False) -> list[CueMatch]:
    """All confirmed cues of ``text`` in order. ``final=True`` treats the text as finished.

    Args:
        text: the generated text (without the prompt).
        config: what to detect.
        final: if False, a cue touching the end of ``text`` is not yet confirmed (the next
            characters may extend the word or the newline run) and is left out.
    """
    out: list[CueMatch] = []
    if config.words:
        alt = "|".join(re.escape(w) for w in sorted(config.words, key=len, reverse=True))
        for m in re.finditer(rf"(?<![\w])({alt})(?![\w])", text, flags=re.IGNORECASE):
            if m.end() < len(text) or final:
                out.append(CueMatch(m.start(), m.end(), "word", m.group(1).lower()))
    if config.step_boundaries:
        for m in re.finditer(r"\n+", text):
            if m.end() == len(text) and not final:
                continue  # the run may go on
            before = text[: m.start()].rstrip(" \t")
            if len(m.group()) >= 2 or (before and before[-1] in SENTENCE_END):
                if before.strip():  # a boundary needs a finished step before it
                    out.append(CueMatch(m.end() - 1, m.end(), "step", "\\n"))
    out.sort(key=lambda c: c.start)
    return out


def char_to_token(ends: list[int], char: int) -> int:
    """Index of the token holding character ``char``, given each token's end offset (sorted)."""
    lo, hi = 0, len(ends)
    while lo < hi:  # first token whose end is past char
        mid = (lo + hi) // 2
        if ends[mid] > char:
            hi = mid
        else:
            lo = mid + 1
    return min(lo, len(ends) - 1)


@dataclass
class CueDetector:
    """Streaming detector: feed the growing text and token end offsets, get new events once.

    Usage::

        det = CueDetector(CueConfig())
        for each new token: events = det.update(text, token_ends)
    """

    config: CueConfig
    events: list[CueEvent] = field(default_factory=list)
    _seen: set = field(default_factory=set)

    def update(self, text: str, token_ends: list[int], *, final: bool = False) -> list[CueEvent]:
        """New confirmed events of ``text``; ``token_ends[i]`` is where token i ends in ``text``."""
        if not token_ends:
            return []
        new: list[CueEvent] = []
        for c in find_cues(text, self.config, final=final):
            key = (c.start, c.kind)
            if key in self._seen:
                continue
            self._seen.add(key)
            token = char_to_token(token_ends, c.end - 1)
            if c.kind == "word":
                fork = char_to_token(token_ends, c.start)
            else:
                fork = token + 1
            last = self.events[-1].token if self.events else None
            if last is not None and token - last <= self.config.min_gap_tokens:
                continue  # at most one event per token (min_gap_tokens = 0), or sparser
            ev = CueEvent(len(self.events), token, fork, c.kind, c.cue, c.start)
            self.events.append(ev)
            new.append(ev)
        return new
