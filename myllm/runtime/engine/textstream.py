"""Turning token bytes into text pieces that are safe to send.

Two things can straddle token boundaries: a multi-byte UTF-8 character (emoji, CJK) and a stop
string. Bytes are decoded incrementally, and text that could still turn out to be the start of
a stop string is held back until it cannot, so no event carries half a character and the stop
text never reaches the client.
"""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._pending = ""
        self.stop_sequence: str | None = None
        """The stop string that ended the text, once one has (APIs report which)."""
        self.text = ""
        """Everything emitted so far."""

    @property
    def stopped(self) -> bool:
        return self.stop_sequence is not None

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; returns the text that may be sent now ("" if none)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush at the end of generation: held-back text that never became a stop string.
        A character cut off by the token limit is dropped, not sent as U+FFFD."""
        if self.stopped:
            return ""
        self._decoder.reset()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hit = self._first_stop()
        if hit is not None:
            cut, self.stop_sequence = hit
            out, self._pending = self._pending[:cut], ""
        elif final:
            out, self._pending = self._pending, ""
        else:
            keep = self._held_back()
            out = self._pending[: len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep :]
        self.text += out
        return out

    def _first_stop(self) -> tuple[int, str] | None:
        """Where the earliest stop string starts in the pending text, and which it is (the
        first listed of those starting there)."""
        hits = [(i, s) for s in self._stop if (i := self._pending.find(s)) >= 0]
        return min(hits, key=lambda hit: hit[0]) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of pending text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:n]):
                    best = n
                    break
        return best
