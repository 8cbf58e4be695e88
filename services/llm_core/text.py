"""Turning a token stream into a text stream: UTF-8 reassembly and stop strings."""

from __future__ import annotations

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

    def feed(self, data: bytes) -> str:
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        for stop in self._stop:
            index = self._held.find(stop)
            if index >= 0:
                self.stopped, self.matched = True, stop
                out, self._held = self._held[:index], ""
                return out
        keep = self._longest_stop_prefix_suffix()
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out

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
