"""Incremental detokenisation: an answer's text grows with each token, decoding only a window.

Re-decoding a row's whole answer at every step costs O(length) a step, O(length^2) an
answer. `Detokenizer` keeps the text so far and, per new token, decodes only the few tokens
since the last complete character (as vLLM's and tokenizers' `DecodeStream` do): the window
runs from the token before the last emitted text (so a decoder that joins tokens sees its
left neighbour) to the newest token, and text is emitted only once it no longer ends in a
split character ("\ufffd"). It records the text's length after every token, so the text of
any prefix of the answer is a slice, and finds stop strings as they complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_SPLIT = "\ufffd"  # a character whose bytes are not all decoded yet


class Detokenizer:
    """The text of a growing sequence of token ids (special tokens skipped)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.text = ""
        self._ends: list[int] = []  # len(text) after each token
        self._complete: list[bool] = []  # whether every token up to it is in `text`
        self._prefix = 0  # the window's first token: the one before the emitted text's end
        self._read = 0  # tokens whose text is emitted
        self.stopped_at: int | None = None  # tokens up to the first completed stop string
        for token in ids:
            self.add(token)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def add(self, token: int) -> bool:
        """Append one token; returns whether the text now contains a stop string (first
        completed by this token)."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        start = len(self.text)
        if len(window) > len(before) and not window.endswith(_SPLIT):
            self.text += window[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        self._ends.append(len(self.text))
        self._complete.append(self._read == len(self.ids))
        if self.stopped_at is None and self.stops and len(self.text) > start:
            tail = self.text[max(start - self._longest + 1, 0) :]
            if any(s in tail for s in self.stops):
                self.stopped_at = len(self.ids)
                return True
        return False

    def text_at(self, tokens: int) -> str:
        """The text of the first `tokens` ids (a character still split at their end waits)."""
        return self.text[: self._ends[tokens - 1]] if tokens > 0 else ""

    def complete_at(self, tokens: int) -> bool:
        """Whether `text_at(tokens)` is all of those tokens' text (none still split)."""
        return tokens <= 0 or self._complete[tokens - 1]

    def full(self, tokens: int | None = None) -> str:
        """The first `tokens` ids decoded as one (a split character at the end shows as
        "\ufffd"): a slice of `text` when nothing is pending there, else one decode."""
        n = len(self.ids) if tokens is None else tokens
        if self.complete_at(n):
            return self.text_at(n)
        return self._decode(self.ids[:n])


__all__ = ["Detokenizer"]
