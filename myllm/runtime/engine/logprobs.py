"""Token probabilities from one row of logits: the chosen token's and the top k candidates'."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from myllm.runtime.engine_types import Candidate


def top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """The k largest logits, best first. Partitioning the whole vocabulary costs ~0.5 ms a
    token (a tenth of a decode step here), so the k-th largest of every 64th logit serves as a
    threshold first: at least k logits reach it, and few more than 64 k do."""
    sample = logits[::64]
    if len(sample) > k:
        threshold = np.partition(sample, len(sample) - k)[len(sample) - k]
        near = np.flatnonzero(logits >= threshold) if np.isfinite(threshold) else np.arange(len(logits))
    else:
        near = np.arange(len(logits))
    if len(near) > k:
        near = near[np.argpartition(logits[near], len(near) - k)[len(near) - k :]]
    return near[np.argsort(-logits[near], kind="stable")]


def log_probabilities(
    logits: np.ndarray, token: int, k: int, piece: Callable[[int], str]
) -> tuple[float, tuple[Candidate, ...] | None]:
    """The chosen token's log-probability and the top k candidates of one row of logits
    (log-softmax over the whole row; no sort of the vocabulary)."""
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))
    chosen = float(logits[token]) - log_z
    if k == 0:
        return chosen, None
    return chosen, tuple(Candidate(int(i), piece(int(i)), float(logits[i]) - log_z) for i in top_k_indices(logits, k))
