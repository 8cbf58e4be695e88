"""Turning a token stream into a text stream: UTF-8 reassembly and stop strings."""

from __future__ import annotations

import bisect
import codecs


class TextStream:
    """Feeds token bytes, returns text safe to show now.

    A multi-byte character split across tokens is held until complete, and text
    that could be the start of a stop string is held until it is decided.
    """

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._held = ""
        self.stopped = False
        self.matched = ""  # the stop string that ended the stream
        self._starts: list[int] = []  # where each fed token's text begins, in characters of the stream
        self._chars = 0  # characters decoded so far
        self._shown = 0  # characters returned so far

    def feed(self, data: bytes) -> str:
        if self.stopped:
            return ""
        decoded = self._decoder.decode(data)
        self._starts.append(self._chars)
        self._chars += len(decoded)
        self._held += decoded
        for stop in self._stop:
            index = self._held.find(stop)
            if index >= 0:
                self.stopped, self.matched = True, stop
                out, self._held = self._held[:index], ""
                return self._show(out)
        keep = self._longest_stop_prefix_suffix()
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return self._show(out)

    def _show(self, out: str) -> str:
        self._shown += len(out)
        return out

    @property
    def hidden_tokens(self) -> int:
        """Tokens fed of which nothing was shown: those that spelled the stop string that ended the stream."""
        return len(self._starts) - bisect.bisect_left(self._starts, self._shown) if self.stopped else 0

    def flush(self) -> str:
        """Text still held when generation ends for another reason."""
        if self.stopped:
            return ""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:n]):
                    best = n
                    break
        return best
