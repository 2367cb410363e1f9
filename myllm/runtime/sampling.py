"""Greedy decoding (temperature 0, no grammar) from one row of logits, computed as llama.cpp's
penalties + greedy sampler chain computes it.

llama.cpp's `llama_sampler_sample` first copies the whole vocabulary into a candidate array and
looks every candidate up in the penalty counts: ~0.2 ms a token for a 49k vocabulary, most of a
batch step's time outside `llama_decode`. Here only the (at most `last_n`) penalized logits are
touched and one argmax picks the token. Sampling at a temperature, and grammars, stay with
llama.cpp's samplers.
"""

from __future__ import annotations

from collections import Counter, deque

import numpy as np


class GreedySampler:
    def __init__(self, last_n: int, repeat: float, frequency: float, presence: float) -> None:
        self.window: deque[int] = deque(maxlen=max(last_n, 1))
        """The last `last_n` accepted (generated) tokens: the penalties' memory, as llama.cpp keeps it."""
        self.repeat = np.float32(repeat)
        self.frequency = np.float32(frequency)
        self.presence = np.float32(presence)
        self.disabled = last_n == 0 or (repeat == 1 and frequency == 0 and presence == 0)

    def sample(self, logits: np.ndarray) -> int:
        """The token, which is also accepted into the penalty window. Ties go to the lowest id,
        as llama.cpp's greedy sampler breaks them."""
        if self.disabled or not self.window:
            token = int(np.argmax(logits))
        else:
            counts = Counter(self.window)
            ids = np.fromiter(counts, dtype=np.int64, count=len(counts))
            seen = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            raw = logits[ids]
            penalized = np.where(raw <= 0, raw * self.repeat, raw / self.repeat)
            penalized -= seen * self.frequency + self.presence
            row = logits.copy()
            row[ids] = penalized
            token = int(np.argmax(row))
        if not self.disabled:
            self.window.append(token)
        return token
