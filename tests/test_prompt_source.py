"""A prompt of little text goes to the runner with its request, for the runner to tokenize
(engine_types.py `PromptSource`): one message instead of a tokenizing round trip and then the
request. It must give exactly what tokenizing first gives: the same prompt tokens, the same
greedy output, the same refusals; a conversation too long for its budget is trimmed by the
daemon's own path. And the runner computes at a lower CPU priority than the daemon
(`MYLLM_RUNNER_NICE`), so the daemon's work on each request is not queued behind llama.cpp's
threads."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

import myllm.runtime.service as service
from myllm.errors import InvalidOptions, PromptTooLong
from myllm.registry.store import Registry
from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine.slots import EngineJob
from myllm.runtime.engine_types import DoneEvent, Failed, GenerationRequest, LoadSpec, PromptSource, Started
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.runner.child import Channel, RunnerLoop
from myllm.runtime.runner.protocol import decode_event, decode_request, encode_event, encode_request, unpacker
from myllm.runtime.service import GenerationStream, Runtime
from myllm.settings import Settings

T = TypeVar("T")
GREEDY = GenerationOptions(temperature=0.0, max_tokens=12)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "<|im_start|>Another one, please.<|im_end|>"},  # text, never markup
]


@pytest.fixture
async def runtime(shared_registry: Registry) -> AsyncIterator[Runtime]:
    rt = Runtime(shared_registry, Settings(num_threads=2, num_ctx=1024, runner_nice=7))
    await rt.start()
    yield rt
    await rt.close()


async def finished(stream: GenerationStream) -> tuple[int, list[int], str, int]:
    prompt_tokens = stream.prompt_tokens
    tokens = [event.token_id async for event in stream if hasattr(event, "token_id")]
    assert stream.done is not None
    return prompt_tokens, tokens, stream.done.text, stream.done.prompt_tokens


async def both_paths(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Awaitable[T]]) -> tuple[T, T]:
    """`run` with the prompt sent along, then with it tokenized first (the path of prompts over
    `SOURCE_CHARS`)."""
    sent = await run()
    monkeypatch.setattr(service, "SOURCE_CHARS", 0)
    first = await run()
    monkeypatch.undo()
    return sent, first


async def test_chat_and_raw_prompts_are_the_same_either_way(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    async def chat() -> tuple[int, list[int], str, int]:
        return await finished(await runtime.chat("smollm2:135m", CONVERSATION, GREEDY, prefill="My"))

    async def raw() -> tuple[int, list[int], str, int]:
        text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        return await finished(await runtime.generate("smollm2:135m", text, GREEDY, raw=True))

    for run in (chat, raw):
        sent, first = await both_paths(monkeypatch, run)
        assert sent == first, run.__name__
        prompt_tokens, tokens, _, done_prompt_tokens = sent
        assert prompt_tokens == done_prompt_tokens > 5 and tokens


async def test_refusals_are_the_same_either_way(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too long for the context (counted exactly or refused early), and nothing to generate
    from: status codes before any stream, whichever side tokenized."""
    small = GenerationOptions(num_ctx=256, max_tokens=4)

    async def refusals() -> list[tuple[type, str]]:
        """PromptTooLong's message has the count, or "more than" the context when refused early."""
        out = []
        for call in (
            lambda: runtime.generate("smollm2:135m", "word " * 400, small),
            lambda: runtime.generate("smollm2:135m", "word " * 400, small, raw=True),
            lambda: runtime.chat("smollm2:135m", [{"role": "user", "content": "word " * 400}], small),
        ):
            with pytest.raises(PromptTooLong) as info:
                await call()
            out.append((type(info.value), str(info.value)))
        return out

    sent, first = await both_paths(monkeypatch, refusals)
    assert sent == first
    assert "more than 256 tokens" in sent[0][1] and "more than" not in sent[1][1]

    async def empty() -> str:
        with pytest.raises(InvalidOptions) as info:  # SmolLM2 adds no BOS: an empty raw text has no tokens
            await runtime.generate("smollm2:135m", "", GREEDY, raw=True)
        return str(info.value)

    sent_empty, first_empty = await both_paths(monkeypatch, empty)
    assert sent_empty == first_empty and "empty" in sent_empty


async def test_a_conversation_over_its_budget_is_trimmed(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner refuses what does not fit beside the reply; the daemon then drops the oldest
    messages as it always did, and the answer is what tokenizing first gives."""
    opts = GenerationOptions(temperature=0.0, max_tokens=8, num_ctx=256)
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"Fact {i}: " + "lorem ipsum " * 20}, {"role": "assistant", "content": "Noted."}]
    messages.append({"role": "user", "content": "Which facts do you know?"})

    async def trimmed() -> tuple[int, int, list[int]]:
        stream = await runtime.chat("smollm2:135m", messages, opts, trim=True)
        dropped = stream.dropped
        prompt_tokens, tokens, _, _ = await finished(stream)
        return dropped, prompt_tokens, tokens

    sent, first = await both_paths(monkeypatch, trimmed)
    assert sent == first
    dropped, prompt_tokens, _ = sent
    assert dropped > 0 and prompt_tokens + 8 <= 256


def test_a_sourced_request_crosses_the_channel_whole() -> None:
    units = [[("<|im_start|>user\n", True), ("hi <|im_end|>", False)], [("<|im_start|>assistant\n", True)]]
    options = GenerationOptions(temperature=0.0, max_tokens=3)
    req = GenerationRequest([], options, ("</s>",), None, None, (), PromptSource(units, None, 100))
    back = decode_request(encode_request(req))
    assert back.source == req.source and back.tokens == [] and back.extra_stop == ("</s>",)
    assert decode_request(encode_request(GenerationRequest([1, 2], options))).source is None
    assert decode_event(encode_event(Started(42))) == Started(42)


def test_started_precedes_the_first_token_however_fast_the_step(smollm2_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner announces a sourced request with `Started` after submitting it, and the
    scheduler may end a step in between (a tiny model's step takes a fraction of a
    millisecond): its tokens must still follow `Started` on the channel. Here the submit is
    held back a quarter of a second after the request went in, long enough for steps to end."""
    engine = BatchEngine(LoadSpec("smollm2", smollm2_path, 512), n_threads=2, kv_cache_bytes=0)
    ours, theirs = socket.socketpair()
    try:
        loop = RunnerLoop(Channel(theirs), engine)
        submit = engine.submit

        def slow_submit(*args: Any) -> EngineJob:
            job = submit(*args)
            time.sleep(0.25)
            return job

        monkeypatch.setattr(engine, "submit", slow_submit)
        source = PromptSource(None, "Count: one, two, three,", 100)
        request = GenerationRequest([], GenerationOptions(temperature=0.0, max_tokens=4), (), None, None, (), source)
        loop.serve(iter([["gen", 1, encode_request(request)]]))
        reader, events = unpacker(), []
        ours.settimeout(30)
        while not any(isinstance(e, DoneEvent | Failed) for e in events):
            reader.feed(ours.recv(1 << 16))
            events += [decode_event(event) for message in reader for _, event in message[1]]
        assert isinstance(events[0], Started) and isinstance(events[-1], DoneEvent)
    finally:
        engine.close()
        ours.close()
        theirs.close()


async def test_the_runner_computes_below_the_daemon(runtime: Runtime) -> None:
    """Every thread of the runner, llama.cpp's included, runs `runner_nice` below the daemon."""
    await finished(await runtime.generate("smollm2:135m", "Hello", GenerationOptions(max_tokens=2)))
    [info] = [i for i in runtime.loaded() if i.name == "smollm2:135m"]
    runner = psutil.Process(info.pid)
    threads = [Path(f"/proc/{runner.pid}/task/{t.id}/stat").read_text().rsplit(")", 1)[1].split()[16]
               for t in runner.threads()]
    assert len(threads) >= 3  # the main thread, the scheduler, llama.cpp's
    assert {int(nice) for nice in threads} == {os.getpriority(os.PRIO_PROCESS, 0) + 7}
