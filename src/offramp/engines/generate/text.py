"""Text of streamed generation: each row's new tokens turned into pieces of text that add up to
the row's whole decoded text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextPieces:
    """Per-row pieces of text for ``stream_generate``'s tokens.

    ``add(row, token, end)`` appends a token to ``row`` and returns the text it adds (``""`` while
    the text ends inside a character, as a lone byte of a multi-byte character decodes to U+FFFD;
    the piece is given once the character is complete, or at the row's ``end``). The pieces of a
    row add up to ``text(row)``, its tokens decoded at once with special tokens skipped.
    ``pieces=False`` only keeps the tokens (``add`` returns ``""``; decode once with ``text``).

    ``lines(step)`` turns one ``TokenStep`` into the lines of a stream: per row that got a token
    ``{"index", "token", "text", "exit_layer"}`` and, when the row ends, ``{"index", "done": True,
    "text", "tokens", "exit_layers"}``; ``index`` maps rows to the caller's numbering.
    """

    def __init__(self, tokenizer: Any, rows: int, *, pieces: bool = True, index: Sequence[int] | None = None) -> None:
        self.tokenizer, self.pieces = tokenizer, pieces
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.exit_layers: list[list[int]] = [[] for _ in range(rows)]
        self.index = list(index) if index is not None else list(range(rows))
        self._sent = [""] * rows

    def lines(self, step: Any) -> list[dict[str, Any]]:
        out = []
        for r, token, layer, end in zip(step.rows.tolist(), step.tokens.tolist(), step.exit_layers.tolist(),
                                        step.finished.tolist()):
            self.exit_layers[r].append(layer)
            out.append({"index": self.index[r], "token": token, "text": self.add(r, token, end), "exit_layer": layer})
            if end:
                out.append({"index": self.index[r], "done": True, "text": self.text(r), "tokens": self.tokens[r],
                            "exit_layers": self.exit_layers[r]})
        return out

    def add(self, row: int, token: int, end: bool = False) -> str:
        self.tokens[row].append(token)
        if not self.pieces:
            return ""
        text = self.text(row)
        if not text.startswith(self._sent[row]) or (not end and text.endswith("\ufffd")):
            return ""  # wait: the text so far is not final (a character is incomplete, or decoding revised it)
        piece, self._sent[row] = text[len(self._sent[row]):], text
        return piece

    def text(self, row: int) -> str:
        return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
