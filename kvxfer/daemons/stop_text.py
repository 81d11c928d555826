"""The text of a growing list of generated tokens, cut at the first stop string (OpenAI's
`stop`), released piece by piece for streaming.

A piece is held back while it could still become a stop string (its tail is a prefix of one) or
ends in an incomplete UTF-8 character (a byte-level tokenizer splits characters over tokens), so
a stream never shows text that the whole answer would not contain.
"""

from __future__ import annotations

from collections.abc import Callable

_INCOMPLETE = "\ufffd"  # what decoding gives for a character whose bytes have not all arrived


class StopText:
    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0  # characters of _text already released
        self.stopped = False  # a stop string appeared; push nothing more

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    def push(self, token: int) -> str:
        """Add one token; the text that is now certain (maybe empty)."""
        self._ids.append(token)
        self._text = self._decode(self._ids)
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation: whatever was held back (nothing after a stop)."""
        return "" if self.stopped else self._release(len(self._text))

    def _first_stop(self) -> int | None:
        """Where the earliest stop string begins, searching only text not yet released (a stop
        string found there may begin inside the held-back tail)."""
        found = [i for s in self._stops if (i := self._text.find(s, self._sent)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Characters at the end that may yet turn into a stop string or a whole character."""
        text = self._text
        if text.endswith(_INCOMPLETE):
            return len(text) - len(text.rstrip(_INCOMPLETE))
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        piece, self._sent = self._text[self._sent:end], end
        return piece
