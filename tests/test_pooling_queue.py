"""Concurrent embedding and rerank calls in an embedding runner share llama.cpp batches
(runtime/runner/pooling_queue.py), on real encoder fixtures (tests/encoder_fixture.py): calls that
arrive while a round runs are evaluated together in the next, each answered with its own part
(equal to what it gets alone), and a bad input fails only its own call."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from myllm.errors import InvalidOptions
from myllm.runtime.engine.embedding import EmbeddingEngine
from myllm.runtime.engine_types import POOLING_RANK, LoadSpec
from myllm.runtime.runner.pooling_queue import PoolingQueue
from tests.encoder_fixture import write_encoder


class Gated:
    """An engine whose first `evaluate` waits until the test lets it go, so later calls queue up."""

    def __init__(self, engine: EmbeddingEngine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.started = threading.Event()
        self.rounds: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def evaluate(self, seqs: list[list[int]]) -> Any:
        self.rounds.append(len(seqs))
        self.started.set()
        self.gate.wait(30)
        return self.engine.evaluate(seqs)


def run(engine: EmbeddingEngine, calls: list[tuple[str, list[Any]]]) -> tuple[dict[int, Any], list[int]]:
    """`calls` through a queue: the first alone, the rest while it runs; each call's answer."""
    gated = Gated(engine)
    answers: dict[int, Any] = {}
    done = threading.Semaphore(0)

    def reply(call_id: int, error: BaseException | None, value: Any) -> None:
        answers[call_id] = error if error is not None else value
        done.release()

    queue = PoolingQueue(gated, reply)  # type: ignore[arg-type]
    try:
        queue.put(0, *calls[0])
        assert gated.started.wait(30)
        for i, call in enumerate(calls[1:], 1):
            queue.put(i, *call)
        gated.gate.set()
        for _ in calls:
            assert done.acquire(timeout=30)
    finally:
        queue.close()
    return answers, gated.rounds


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EmbeddingEngine]]:
    folder = tmp_path_factory.mktemp("pooling")
    engines = {
        "mean": EmbeddingEngine(LoadSpec("mean", write_encoder(folder / "mean.gguf", "mean"), 512, embedding=True), 1),
        "rank": EmbeddingEngine(LoadSpec("rank", write_encoder(folder / "rank.gguf", "rank"), 512, embedding=True,
                                         pooling=POOLING_RANK), 1),
    }
    yield engines
    for engine in engines.values():
        engine.close()


def test_embed_calls_waiting_share_one_round_and_get_their_own_vectors(models: dict[str, EmbeddingEngine]) -> None:
    engine = models["mean"]
    calls = [("embed", [["the cat"], False]), ("embed", [["a dog", "the city at night"], False]),
             ("embed", [[[10**6]], False]), ("embed", [["water"], False])]  # a token id outside the vocabulary
    answers, rounds = run(engine, calls)
    assert rounds == [1, 3]  # the bad call's input never reached llama.cpp
    assert isinstance(answers[2], InvalidOptions)
    for i in (0, 1, 3):
        vectors, count = answers[i]
        alone, alone_count = engine.embed(calls[i][1][0])
        assert count == alone_count
        np.testing.assert_allclose(vectors, alone, atol=2e-4)


def test_rerank_calls_share_rounds_too(models: dict[str, EmbeddingEngine]) -> None:
    engine = models["rank"]
    calls = [("rerank", ["the cat", ["a cat"], False]), ("rerank", ["water", ["the sea", "fire", "a lake"], False]),
             ("embed", [["not here"], False])]
    answers, rounds = run(engine, calls)
    assert rounds == [1, 3]
    assert isinstance(answers[2], InvalidOptions)  # a reranker does not embed
    scores, _ = answers[1]
    alone, _ = engine.rerank("water", ["the sea", "fire", "a lake"])
    np.testing.assert_allclose(scores, alone, rtol=1e-3)
