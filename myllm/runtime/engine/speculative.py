"""Speculative decoding: a drafter proposes the next few tokens of a sequence, the step evaluates
them with the sequence's last token in one batch (a logits row each), and the request's own
sampler decides how many stand (slots.py's `SlotOutput.sample`).

Verification is exact for any drafter that proposes tokens deterministically (probability 1 each,
as prompt lookup does): row 0 is sampled as without speculation; row i is used only when every
earlier draft token equals what the sampler picked, in which case row i's logits are exactly the
logits that token's evaluation would have given, and it is sampled by the same sampler, in the
same state (penalties, grammar, random draws). So every emitted token is drawn by the request's
sampler from its true distribution, at any temperature, and the first mismatch is itself the
next token; the rows after it are discarded and their KV removed. A drafter with its own
distribution (a draft model sampling) would need the probabilistic acceptance rule instead; a
greedy draft model fits this rule as it is.

`PromptLookup` is the drafter for models with no draft model: the tokens that followed the
latest earlier occurrence of the sequence's last n tokens, in its prompt and output (a rewrite,
an edit, code quoted back, a summary that cites: outputs that copy their prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

NGRAM_MAX = 3
"""The longest tail `PromptLookup` looks for: a longer match predicts better, so it is tried first."""
NGRAM_MIN = 2
"""The shortest: one token alone recurs too often in unrelated places to predict what follows."""


class Drafter(Protocol):
    """Proposes a sequence's next tokens; one per request, used by the scheduler thread only."""

    def propose(self, history: Sequence[int], n: int) -> list[int]:
        """At most `n` tokens that may follow `history` (the prompt and every output token so
        far; within a request it only grows); [] when there is no good guess (the slot then
        decodes one token, at no extra cost)."""
        ...


class PromptLookup:
    """Prompt-lookup drafting (n-grams over the prompt and the output): an index from every
    n-gram (`NGRAM_MIN`..`NGRAM_MAX` tokens) to where its latest occurrence ended, kept up to date
    as the history grows (each token indexed once, not the history searched every step)."""

    def __init__(self) -> None:
        self._ends: dict[tuple[int, ...], int] = {}
        """n-gram -> the position right after its latest occurrence (all sizes in one map)."""
        self._indexed = 0
        """n-grams ending before this position are in `_ends`."""

    def propose(self, history: Sequence[int], n: int) -> list[int]:
        length = len(history)
        # Index the n-grams ending at positions up to length - 1, which a token follows; the one
        # ending at `length` (the tail being looked up) is not, so a match is always earlier.
        for end in range(max(self._indexed, NGRAM_MIN), length):
            for size in range(NGRAM_MIN, min(NGRAM_MAX, end) + 1):
                self._ends[tuple(history[end - size : end])] = end
        self._indexed = max(self._indexed, length)
        if n <= 0:
            return []
        for size in range(min(NGRAM_MAX, length), NGRAM_MIN - 1, -1):
            end = self._ends.get(tuple(history[length - size :]))
            if end is not None:
                return list(history[end : end + n])
        return []


class Speculation:
    """One request's speculation: its drafter, how many tokens it may draft a step, and the
    counts its final event reports. The draft length adapts: after a draft that was not wholly
    accepted the next is one longer than what was accepted, and each wholly accepted one
    doubles it up to the most allowed, so a sequence that stops copying soon stops paying
    for rows it throws away (on a CPU each costs about what a token of prompt does)."""

    def __init__(self, drafter: Drafter, n_max: int) -> None:
        self.drafter = drafter
        self.n_max = n_max
        self.n = n_max
        self.drafted = 0
        """Tokens drafted, for the final event's timings."""
        self.accepted = 0
        """Of them, those the sampler picked."""

    def draft(self, history: Sequence[int], room: int) -> list[int]:
        """The next draft, at most `room` tokens (what max_tokens, the context and the step's
        batch leave), counted as drafted (its accepted tokens are counted as they are)."""
        draft = self.drafter.propose(history, min(self.n, room))
        self.drafted += len(draft)
        return draft

    def resize(self, drafted: int, accepted: int) -> None:
        """Size the next draft after one of `drafted` tokens of which `accepted` stood."""
        self.n = min(self.n_max, 2 * self.n if accepted == drafted else accepted + 1)
