"""Formatting helpers shared by the CLI verbs, and how `run` writes a streamed answer."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TextIO

DIM, UNDIM = "\x1b[2m", "\x1b[22m"
"""ANSI faint on and off (SGR 2 and 22): the answer streams with plain writes, not Rich."""


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def ago(when: datetime, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


class AnswerWriter:
    """A streamed answer as `myllm run` shows it: a thinking model's thinking first, apart.

    To a terminal the thinking is dimmed and a blank line follows it, then the answer. Piped
    (stdout not a terminal) the thinking goes to stderr and stdout gets the answer alone, so
    `myllm run MODEL "..." > answer.txt` keeps the answer and a script need not cut the
    thinking out (Ollama writes both to stdout between "Thinking..." and "...done thinking.").
    """

    def __init__(self, out: TextIO, err: TextIO, terminal: bool) -> None:
        self.out, self.err, self.terminal = out, err, terminal
        self._thinking = False
        """Whether thinking is being written now (dim on, or stderr's line open)."""
        self._ends_line = True
        """Whether what the thinking went to ends with a line break."""

    def thinking(self, text: str) -> None:
        where = self.out if self.terminal else self.err
        if self.terminal and not self._thinking:
            where.write(DIM)
        self._thinking = True
        where.write(text)
        where.flush()
        self._ends_line = text.endswith("\n") if text else self._ends_line

    def answer(self, text: str) -> None:
        if self._thinking:
            self.end_thinking()
            if self.terminal:
                self.out.write("\n")  # a blank line between the thinking and the answer
        self.out.write(text)
        self.out.flush()

    def end_thinking(self) -> None:
        """Dim off and the thinking's line ended; called at the answer's start, and when the
        output ends (done, an error, Ctrl-C) so no dim outlives it."""
        if not self._thinking:
            return
        where = self.out if self.terminal else self.err
        if self.terminal:
            where.write(UNDIM)
        if not self._ends_line:
            where.write("\n")
        where.flush()
        self._thinking, self._ends_line = False, True
