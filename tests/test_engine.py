"""The whole chain on a real model, in-process: registry row -> the batch engine -> text."""

import queue
from pathlib import Path
from typing import Any

import pytest

from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.runtime.engine.batching import BatchEngine, EngineJob
from myllm.runtime.engine_types import DoneEvent, GenerationRequest, LoadSpec
from myllm.runtime.request.options import GenerationOptions


def run(engine: BatchEngine, req: GenerationRequest) -> list[Any]:
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def sink(items: list[tuple[EngineJob, Any]]) -> None:
        for _, event in items:
            events.put(event)

    engine.submit(req, sink)
    out = [events.get(timeout=60)]
    while not isinstance(out[-1], DoneEvent):
        out.append(events.get(timeout=60))
    return out


def smollm2(registry: Registry) -> tuple[ModelRow, Path]:
    """The test model's row and its file, as `LoadSpec.for_model` takes them."""
    row = registry.get("smollm2:135m")
    return row, registry.blobs.path(row.digest)


def test_generate_from_registered_smollm2(shared_registry: Registry) -> None:
    row = shared_registry.get("smollm2:135m")
    spec = LoadSpec.for_model(row, shared_registry.blobs.path(row.digest), num_ctx=512)
    assert spec.n_ctx == 512 and spec.n_parallel == 1
    engine = BatchEngine(spec, n_threads=2, kv_cache_bytes=0)
    try:
        tokens = engine.tokenize("The capital of France is")
        events = run(engine, GenerationRequest(tokens, GenerationOptions(temperature=0, max_tokens=8)))
    finally:
        engine.close()
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.prompt_tokens == 5
    assert done.completion_tokens == 8
    assert "Paris" in done.text


def test_context_capped_at_trained_length(shared_registry: Registry) -> None:
    assert LoadSpec.for_model(*smollm2(shared_registry), num_ctx=100_000).n_ctx == 8192


def test_context_rounded_to_llama_cpp_padding(shared_registry: Registry) -> None:
    spec = LoadSpec.for_model(*smollm2(shared_registry), num_ctx=320)
    assert spec.n_ctx == 512
    engine = BatchEngine(spec, n_threads=2, kv_cache_bytes=0)
    try:
        assert engine.n_ctx == 512 == engine.ctx.n_ctx()
    finally:
        engine.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is killed on purpose
def test_health_reports_a_stalled_or_dead_scheduler(shared_registry: Registry) -> None:
    """What the runner's health check reads: a scheduler stuck inside a step shows as stalled, a
    scheduler thread that died shows as gone (the daemon then restarts the runner)."""
    import threading
    import time

    engine = BatchEngine(LoadSpec.for_model(*smollm2(shared_registry), num_ctx=512), n_threads=2, kv_cache_bytes=0)
    try:
        assert engine.health() == {"scheduler": True, "stalled": 0.0}  # idle is not stalled
        release = threading.Event()

        def stuck_step() -> None:  # a step that does not return until released, then one that kills the thread
            release.wait(30)
            raise SystemExit

        engine._step = stuck_step  # type: ignore[method-assign]
        engine.submit(GenerationRequest(engine.tokenize("Hello"), GenerationOptions(max_tokens=4)), lambda items: None)
        time.sleep(0.5)
        health = engine.health()
        assert health["scheduler"] and health["stalled"] >= 0.4, health
        release.set()
        engine._thread.join(10)
        assert engine.health()["scheduler"] is False
    finally:
        release.set()


def test_a_failure_in_one_sequence_fails_that_request_only(shared_registry: Registry) -> None:
    """An exception while sampling one sequence ends that request with its error; the other
    sequence in the same batch, and the scheduler, go on."""
    from myllm.runtime.engine_types import Failed

    spec = LoadSpec.for_model(*smollm2(shared_registry), num_ctx=512, n_parallel=2)
    engine = BatchEngine(spec, n_threads=2, kv_cache_bytes=0)
    sample = engine._sample

    def failing(slot: Any) -> None:
        if slot.job.tag == "bad":
            raise ValueError("boom")
        sample(slot)

    engine._sample = failing  # type: ignore[method-assign]
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    try:
        for tag in ("bad", "good"):
            req = GenerationRequest(engine.tokenize("The capital of France is"), GenerationOptions(temperature=0, max_tokens=8))
            engine.submit(req, lambda items: [events.put((job.tag, event)) for job, event in items], tag)
        ends: dict[str, Any] = {}
        while len(ends) < 2:
            tag, event = events.get(timeout=60)
            if isinstance(event, (DoneEvent, Failed)):
                ends[tag] = event
        assert isinstance(ends["bad"], Failed) and "boom" in str(ends["bad"].error)
        assert isinstance(ends["good"], DoneEvent) and ends["good"].completion_tokens == 8
        assert engine.health()["scheduler"]
    finally:
        engine.close()
