"""The runner's stream interval (`MYLLM_STREAM_INTERVAL_MS`, engine/slots.py `Outbox`): streamed
tokens may wait up to the interval to go out together, a request's first token of text and its
end never wait, and nothing is lost or reordered. The `Outbox` alone with a list for its sink
(pure logic), then SmolLM2's engine with an interval no step reaches, and the setting's way
from the daemon's settings into the runner's load spec."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

from myllm.registry.schema import ModelRow
from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine.slots import EngineJob, Outbox
from myllm.runtime.engine_types import DoneEvent, GenerationRequest, LoadSpec, TokenEvent
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.runner.protocol import RunnerConfig
from myllm.settings import Settings


def job(sink: Any) -> EngineJob:
    return EngineJob(GenerationRequest([1], GenerationOptions()), sink)


def test_tokens_wait_for_the_interval_but_a_first_token_and_an_end_do_not() -> None:
    sent: list[list[Any]] = []
    box = Outbox(interval=60.0)
    a = job(lambda items: sent.append([e for _, e in items]))
    b = job(a.sink)
    empty, first, second, third = TokenEvent("", 1), TokenEvent("Hi", 2), TokenEvent(" there", 3), TokenEvent("!", 4)
    box.post(a, empty)  # no text yet: a client still waits for its first token
    box.flush(due=True)
    box.post(a, first)
    box.flush(due=True)
    box.post(a, second)
    box.flush(due=True)  # held: the interval has not passed
    box.post(b, first)  # another request's first token goes at once, with what was held
    box.flush(due=True)
    box.post(a, third)
    box.flush(due=True)
    done = DoneEvent("stop", "Hi there!", 1, 1, 3, 1.0, 1.0)
    box.post(a, done)
    box.flush(due=True)
    assert sent == [[empty], [first], [second, first], [third, done]]
    box.post(a, second)
    box.flush()  # not after a step (the engine going idle, closing): whatever is held goes
    assert sent[-1] == [second]


def test_without_an_interval_every_step_goes_and_with_one_after_it_passes() -> None:
    sent: list[list[Any]] = []
    for interval in (0.0, 0.05):
        box = Outbox(interval)
        a = job(lambda items: sent.append([e for _, e in items]))
        box.post(a, TokenEvent("a", 1))
        box.flush(due=True)
        box.post(a, TokenEvent("b", 2))
        box.flush(due=True)
        if interval:
            time.sleep(interval)
            box.flush(due=True)
        assert [len(batch) for batch in sent] == [1, 1]
        sent.clear()


def test_an_engine_holds_tokens_for_the_interval_and_loses_none(smollm2_path: Path) -> None:
    """SmolLM2 with an interval longer than the whole answer: its first token comes alone, the
    rest with its end, and the tokens are those of an engine without an interval."""
    answers = []
    for interval in (0.0, 60.0):
        engine = BatchEngine(LoadSpec("smollm2", smollm2_path, 512, stream_interval=interval), n_threads=2, kv_cache_bytes=0)
        batches: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        try:
            engine.submit(GenerationRequest(engine.tokenize("The capital of France is"),
                                            GenerationOptions(temperature=0, max_tokens=8)),
                          lambda items: batches.put([e for _, e in items]))
            got = [batches.get(timeout=60)]
            while not isinstance(got[-1][-1], DoneEvent):
                got.append(batches.get(timeout=60))
        finally:
            engine.close()
        answers.append([e.token_id for batch in got for e in batch if isinstance(e, TokenEvent)])
        if interval:
            assert [len(batch) for batch in got] == [1, 7 + 1] and got[0][0].text  # the 7 others and the end
        else:
            assert [len(batch) for batch in got] == [1] * 7 + [2]  # a message per step, the last with the end
    assert answers[0] == answers[1] and len(answers[0]) == 8


def test_the_setting_reaches_the_runners_load_spec() -> None:
    settings = Settings(stream_interval_ms=2.5)
    row = ModelRow(name="m:1", digest="0" * 64)
    spec = LoadSpec.for_model(row, Path("/m.gguf"), 512, stream_interval=settings.stream_interval_ms / 1000)
    assert RunnerConfig.decode(RunnerConfig(spec, 2, 0).encode()).spec.stream_interval == 0.0025
    assert Settings().stream_interval_ms == 1.0
