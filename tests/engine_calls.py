"""A generation run straight on a `BatchEngine` (no runner, no daemon), for the engine's tests:
its token events and its final event."""

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
