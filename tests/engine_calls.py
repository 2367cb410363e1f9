"""Straight on a `BatchEngine` (no runner, no daemon), for the engine's tests: a generation run
(its token events and its final event), and a decode of tokens into sequence 0 outside the
scheduler (for tests that sample its logits themselves)."""

from __future__ import annotations

import queue
from typing import Any

from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine_types import DoneEvent, GenerationRequest, TokenEvent
from myllm.runtime.request.options import GenerationOptions


def generate(engine: BatchEngine, tokens: list[int], **options: Any) -> tuple[list[TokenEvent], DoneEvent]:
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    engine.submit(GenerationRequest(list(tokens), GenerationOptions(**options)),
                  lambda items: [events.put(event) for _, event in items])
    out: list[TokenEvent] = []
    while not isinstance(event := events.get(timeout=300), DoneEvent):
        out.append(event)
    return out, event


def decode(engine: BatchEngine, tokens: list[int], start: int) -> None:
    """`tokens` into sequence 0 from position `start`, logits for the last one."""
    batch = engine.batch.batch
    batch.n_tokens = 0
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, False
        batch.seq_id[i][0] = 0
        batch.n_tokens += 1
    batch.logits[batch.n_tokens - 1] = True
    engine.ctx.decode(engine.batch)
