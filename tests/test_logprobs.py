"""Top-k candidates and log-probabilities of one row of logits (pure logic, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from myllm.runtime.engine.logprobs import log_probabilities, top_k_indices


def rows() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    vocab = 49152
    peaked = (rng.standard_normal(vocab) * 2).astype(np.float32)
    peaked[123] = 40.0  # one clear winner, the rest far below
    flat = rng.uniform(-0.01, 0.01, vocab).astype(np.float32)  # thousands within the first window
    wide = (rng.standard_normal(vocab) * 300).astype(np.float32)  # gaps wider than the window
    ties = np.zeros(vocab, dtype=np.float32)
    ties[[5, 9, 11]] = 3.0
    masked = np.full(vocab, -np.inf, dtype=np.float32)  # a grammar-like mask: few finite logits
    masked[[17, 4000, 31000]] = [1.0, 2.0, 0.5]
    return [peaked, flat, wide, ties, masked]


@pytest.mark.parametrize("k", [1, 2, 5, 20])
def test_top_k_matches_a_full_sort(k: int) -> None:
    for row in rows():
        expected = np.argsort(-row, kind="stable")[:k]
        got = top_k_indices(row, k)
        assert len(got) == k
        np.testing.assert_array_equal(row[got], row[expected])
        if len(np.unique(row[expected])) == k and np.isfinite(row[expected]).all():
            np.testing.assert_array_equal(got, expected)


def test_log_probabilities_are_a_log_softmax() -> None:
    row = rows()[0]
    chosen, top = log_probabilities(row, 123, 3, str)
    reference = row.astype(np.float64) - np.log(np.exp(row.astype(np.float64)).sum())
    assert chosen == pytest.approx(reference[123], abs=1e-5)
    assert top is not None and [c.token_id for c in top][0] == 123
    for c in top:
        assert c.logprob == pytest.approx(reference[c.token_id], abs=1e-5) and c.text == str(c.token_id)
    assert log_probabilities(row, 5, 0, str)[1] is None
