"""Cue detection: whole words, step boundaries, streaming confirmation and token mapping."""

from __future__ import annotations

import pytest

from offramp.engines.reason.cues import CueConfig, CueDetector, char_to_token, find_cues
from reasoning import tiny_tokenizer

WORDS = CueConfig(step_boundaries=False)
STEPS = CueConfig(words=(), step_boundaries=True)


def test_whole_words_only():
    text = "I await it. Wait, hmm... waiting is Alternatively fine; rewait wait-list wait"
    cues = find_cues(text, WORDS, final=True)
    assert [c.cue for c in cues] == ["wait", "hmm", "alternatively", "wait", "wait"]
    assert [text[c.start:c.end] for c in cues][:2] == ["Wait", "hmm"]
    assert all(text[c.start:c.end].lower() == c.cue for c in cues)
    assert "await" not in {text[max(0, c.start - 1):c.end] for c in cues}


def test_word_at_end_waits_for_confirmation():
    assert find_cues("so wait", WORDS) == []  # could still become "waiting"
    assert [c.cue for c in find_cues("so wait", WORDS, final=True)] == ["wait"]
    assert [c.cue for c in find_cues("so wait,", WORDS)] == ["wait"]


def test_step_boundaries():
    text = "Step one is 3.\nx = 3\ny = 4\n\nSo the answer:\nDone"
    cues = find_cues(text, STEPS, final=True)
    # after "3." (sentence end), the blank line, after "answer:"; not after "x = 3"
    assert [c.start for c in cues] == [text.index("\n"), text.index("\n\n") + 1, text.index(":\n") + 1]
    assert find_cues("\n\nHello", STEPS, final=True) == []  # no finished step before it
    assert find_cues("It is 3.\n", STEPS) == []  # the newline run may go on


def test_config_validation():
    with pytest.raises(ValueError, match="detects nothing"):
        CueConfig(words=(), step_boundaries=False)
    with pytest.raises(ValueError, match="cue word"):
        CueConfig(words=("",))
    with pytest.raises(ValueError, match="min_gap"):
        CueConfig(min_gap_tokens=-1)


def test_char_to_token():
    ends = [3, 5, 9]  # tokens cover [0,3) [3,5) [5,9)
    assert [char_to_token(ends, c) for c in (0, 2, 3, 4, 5, 8)] == [0, 0, 1, 1, 2, 2]


def _stream(text: str, config: CueConfig):
    tok = tiny_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    det, ends = CueDetector(config), []
    for i in range(len(ids)):
        prefix = tok.decode(ids[: i + 1])
        ends.append(len(prefix))
        det.update(prefix, ends)
    det.update(tok.decode(ids), ends, final=True)
    return tok, ids, det.events


def test_streaming_maps_words_to_tokens():
    text = "add two and three.\nWait, so 5 hmm\n\nthe answer is 5. await"
    tok, ids, events = _stream(text, CueConfig())
    words = [e for e in events if e.kind == "word"]
    assert [e.cue for e in words] == ["wait", "hmm"]
    for e in words:
        assert tok.decode(ids[e.token: e.token + 1]).strip().lower() == e.cue  # the cue token
        before = tok.decode(ids[: e.fork])
        assert e.cue not in before[-len(e.cue) - 1:].lower()  # the prefix stops before the cue
        assert tok.decode(ids[e.fork: e.token + 1]).strip().lower() == e.cue
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 2  # after "three." and the blank line after "hmm"
    for e in steps:
        assert tok.decode(ids[e.token: e.token + 1]) == "\n"
        assert tok.decode(ids[: e.fork]).endswith("\n")  # the finished step stays in the prefix
    assert [e.index for e in events] == list(range(len(events)))
    assert all(a.token < b.token for a, b in zip(events, events[1:]))


def test_streaming_equals_batch_detection():
    text = "so 3.\n\nWait the 4.\nhmm, 5!\nalternatively 6"
    tok, ids, events = _stream(text, CueConfig())
    batch = find_cues(text, CueConfig(), final=True)
    assert [e.char for e in events] == [c.start for c in batch]
