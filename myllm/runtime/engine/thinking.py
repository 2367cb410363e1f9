"""Separating a reasoning model's thinking from its answer as the text streams.

Thinking models write their reasoning between two markers before the answer: `<think>` and
`</think>` for DeepSeek-R1's and Qwen3's families, gpt-oss's analysis channel
(`<|channel|>analysis<|message|>` to `<|end|>`, then `<|start|>assistant<|channel|>final<|message|>`
and the answer, whose header pieces are `Thinking.headers`, markup dropped from the answer).
Templates often open the section themselves at the end of the prompt, so the output starts
inside it; other models write the opening marker first. The markers are text like any other:
they may arrive split over several tokens (every piece of `</think>` is its own token in a
vocabulary without it), as one token (gpt-oss's markers are special tokens, whose text the
engine renders: vocabulary.py) or inside one token with text on either side, so text that could
still be the start of a marker is held back until it cannot, as the stop strings are
(textstream.py). The markers never reach the client; a model that never closes the section ends
with all of it as thinking.
"""

from __future__ import annotations

from myllm.runtime.engine.textstream import TextAssembler
from myllm.runtime.engine_types import Thinking


class ThinkingSplitter:
    def __init__(self, spec: Thinking) -> None:
        self.spec = spec
        self.inside = spec.started
        """Whether the text now being written is thinking."""
        self._pending = ""
        self.thinking = ""
        """All thinking released so far."""
        self.content = ""
        """All answer text released so far."""
        self._closed = False

    def _markers(self) -> tuple[str, ...]:
        """What may come next: inside, the close; outside, the open or a header to drop."""
        return (self.spec.close,) if self.inside else (self.spec.open, *self.spec.headers)

    def feed(self, text: str) -> tuple[str, str]:
        """Add released text; returns (thinking, answer) that may be sent now."""
        self._pending += text
        thinking, content = [], []
        while True:
            hits = [(at, marker) for marker in self._markers() if (at := self._pending.find(marker)) >= 0]
            if not hits:
                break
            at, marker = min(hits, key=lambda hit: hit[0])
            (thinking if self.inside else content).append(self._pending[:at])
            self._pending = self._pending[at + len(marker):]
            if marker in (self.spec.open, self.spec.close):
                self.inside = not self.inside
                self._closed = self._closed or not self.inside
        keep = max(_held_back(self._pending, marker) for marker in self._markers())
        (thinking if self.inside else content).append(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]
        return self._released("".join(thinking), "".join(content))

    def finish(self) -> tuple[str, str]:
        """The held-back text at the end: it never became a marker."""
        out = (self._pending, "") if self.inside else ("", self._pending)
        self._pending = ""
        return self._released(*out)

    def _released(self, thinking: str, content: str) -> tuple[str, str]:
        if not self.thinking:  # the line break after the opening marker belongs to it
            thinking = thinking.lstrip("\n")
        if not self.content and self._closed:  # so do the blank lines after the closing one
            content = content.lstrip()
        self.thinking += thinking
        self.content += content
        return thinking, content


def _held_back(text: str, marker: str) -> int:
    """The length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class OutputText:
    """A request's output as text: bytes to safe pieces (TextAssembler: characters, stop
    strings), then, for a thinking request, thinking apart from the answer, with its budget."""

    def __init__(self, stop: tuple[str, ...], thinking: Thinking | None) -> None:
        self._assembler = TextAssembler(stop)
        self._split = ThinkingSplitter(thinking) if thinking is not None else None
        self._left = thinking.budget if thinking is not None else None
        self.thinking_tokens = 0
        """Tokens fed while the reasoning section was open (its closing marker included)."""

    @property
    def stopped(self) -> bool:
        return self._assembler.stopped

    @property
    def stop_sequence(self) -> str | None:
        return self._assembler.stop_sequence

    @property
    def text(self) -> str:
        """The answer so far."""
        return self._split.content if self._split is not None else self._assembler.text

    @property
    def thinking(self) -> str:
        return self._split.thinking if self._split is not None else ""

    def feed(self, data: bytes) -> tuple[str, str]:
        """One token's bytes: (answer, thinking) that may be sent now."""
        if self._split is not None and self._split.inside:
            self.thinking_tokens += 1
        return self._divide(self._assembler.feed(data), final=False)

    def finish(self) -> tuple[str, str]:
        """What was held back, at the end of the output."""
        return self._divide(self._assembler.finish(), final=True)

    def _divide(self, text: str, final: bool) -> tuple[str, str]:
        if self._split is None:
            return text, ""
        thinking, answer = self._split.feed(text)
        if final:
            more_thinking, more_answer = self._split.finish()
            thinking, answer = thinking + more_thinking, answer + more_answer
        return answer, thinking

    def over_budget(self) -> bool:
        """Count a token written inside the thinking section; True once the budget is spent
        and the section is still open (the engine then writes the closing marker itself)."""
        if self._split is None or self._left is None or not self._split.inside:
            return False
        self._left -= 1
        return self._left <= 0
