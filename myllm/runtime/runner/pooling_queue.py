"""Embedding and rerank calls in an embedding runner, gathered so concurrent callers share
llama.cpp batches.

A client that embeds one query per request (a RAG app, LangChain's `embed_query`) sends many small
calls at once. Evaluated one by one, each is a llama.cpp batch of a sequence or two, and the
model sits mostly idle between them; llama-server fills its batches from all its slots. Here one
thread takes every call waiting when it is free (up to `MOST_SEQUENCES` sequences), checks and
tokenizes each on its own (a bad input fails only its call), evaluates all their sequences
together (`EmbeddingEngine.evaluate` packs them into batches of the model's size) and answers
each call with its own part.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from myllm.runtime.engine.embedding import EmbeddingEngine

MOST_SEQUENCES = 256
"""Sequences one round gathers at most (the daemon sends 32 per call): the first caller's answer
waits for at most this much work."""

Reply = Callable[[int, BaseException | None, Any], None]
"""Answers call `id` with an error, or with its value."""


class PoolingQueue:
    """One thread evaluating `embed` and `rerank` calls (their arguments as the runner's calls
    take them), gathered while it was busy."""

    def __init__(self, engine: EmbeddingEngine, reply: Reply) -> None:
        self.engine = engine
        self._reply = reply
        self._calls: queue.SimpleQueue[tuple[int, str, list[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="pooling", daemon=True)
        self._thread.start()

    def put(self, call_id: int, method: str, args: list[Any]) -> None:
        self._calls.put((call_id, method, args))

    def close(self) -> None:
        self._calls.put(None)

    def _work(self) -> None:
        while (first := self._calls.get()) is not None:
            gathered = [first]
            count = self._size(first)
            while count < MOST_SEQUENCES:
                try:
                    call = self._calls.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    self._calls.put(None)  # end after this round
                    break
                gathered.append(call)
                count += self._size(call)
            self._round(gathered)

    @staticmethod
    def _size(call: tuple[int, str, list[Any]]) -> int:
        _, method, args = call
        return len(args[1] if method == "rerank" else args[0])

    def _round(self, calls: list[tuple[int, str, list[Any]]]) -> None:
        prepared: list[tuple[int, list[list[int]]]] = []
        for call_id, method, args in calls:
            try:
                seqs = (self.engine.rerank_sequences(*args) if method == "rerank"
                        else self.engine.embed_sequences(*args))
            except Exception as exc:  # this call's input: the others go on
                self._reply(call_id, exc, None)
            else:
                prepared.append((call_id, seqs))
        if not prepared:
            return
        try:
            results = self.engine.evaluate([seq for _, seqs in prepared for seq in seqs])
        except Exception as exc:  # the model's failure: every call of the round hears it
            for call_id, _ in prepared:
                self._reply(call_id, exc, None)
            return
        at = 0
        for call_id, seqs in prepared:
            self._reply(call_id, None, [results[at:at + len(seqs)], sum(map(len, seqs))])
            at += len(seqs)
