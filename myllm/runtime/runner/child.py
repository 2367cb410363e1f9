"""The runner process: one loaded model, served over the channel its parent passed it.

`python -m myllm.runtime.runner NAME FD NICE`: NAME is only there so `ps` shows which model a
runner holds; FD is the inherited end of the socket pair; NICE lowers the process's CPU priority
below the daemon's (`MYLLM_RUNNER_NICE`), applied in `__main__` before any thread starts. The main thread reads messages; generation
runs on the batch engine's scheduler thread, whose sink writes one message per step; other calls
(tokenizing, embeddings) run on a small pool so a long one never delays a cancel, except a
tokenizing call on little text, which the main thread answers at once: it takes microseconds,
and every request waits for one before its first token (`INLINE_TEXT`).

The runner exits when told to, and when the channel closes (the daemon died): its memory goes
back to the OS with it. It ignores SIGINT and SIGTERM, which a terminal or a service manager
sends the whole process group: the daemon decides when its runners stop, after its grace period.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psutil

from myllm.errors import InvalidOptions, MyLLMError
from myllm.runtime.engine.batching import BatchEngine, EngineJob
from myllm.runtime.engine.embedding import EmbeddingEngine
from myllm.runtime.engine.llama_setup import bindings_only
from myllm.runtime.engine_types import DecodedImage, Failed, GenerationRequest, Started, check_prompt
from myllm.runtime.runner.pooling_queue import PoolingQueue
from myllm.runtime.runner.protocol import (
    RunnerConfig,
    decode_request,
    encode_error,
    encode_event,
    pack,
    unpacker,
)

INLINE_TEXT = 8192
"""Characters of text up to which a tokenizing call runs on the main thread: well under a
millisecond of llama.cpp's tokenizer, against a thread hop on every request's path."""
TOKENIZING = {"tokenize", "units", "count"}
POOLED = {"embed", "rerank"}
T = TypeVar("T")


def _text_size(args: list[Any]) -> int:
    """The characters a tokenizing call's arguments hold (a text, texts, or units of parts)."""
    size = 0
    stack: list[Any] = list(args)
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return size


class Channel:
    """The runner's end of the socket: whole messages in, whole messages out (writes from any
    thread, one at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, message: list[Any]) -> None:
        data = pack(message)
        with self._lock:
            self._sock.sendall(data)

    def send_after(self, action: Callable[[], T], message: list[Any]) -> T:
        """Run `action`, then send `message`, with no other message between: a writer on another
        thread (the scheduler's sink) waits until both are done."""
        data = pack(message)
        with self._lock:
            result = action()
            self._sock.sendall(data)
        return result

    def messages(self) -> Iterator[list[Any]]:
        reader = unpacker()
        while chunk := self._sock.recv(1 << 16):
            reader.feed(chunk)
            yield from reader


class RunnerLoop:
    def __init__(self, channel: Channel, engine: BatchEngine | EmbeddingEngine) -> None:
        self.channel = channel
        self.engine = engine
        self.jobs: weakref.WeakValueDictionary[int, EngineJob] = weakref.WeakValueDictionary()
        """Requests the engine still holds, for cancels. Weak: the engine lets go of a job once
        it has ended, which may happen before `submit` has even returned here."""
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="runner-call")
        self.pooling = PoolingQueue(engine, self.answer) if isinstance(engine, EmbeddingEngine) else None
        """Where `embed` and `rerank` calls go on an embedding instance (concurrent ones share batches)."""
        self.calls: dict[str, Callable[..., Any]] = {
            "tokenize": engine.tokenize,
            "units": lambda units, limit: self._generation().tokenize_units(units, limit),
            "count": lambda texts: [engine.count_tokens(t) for t in texts],
            "detokenize": engine.detokenize,
            "embed": self._not_pooling,
            "rerank": self._not_pooling,
            "image_positions": self._image_positions,
            "grammar": lambda grammar: self._generation().check_grammar(grammar),
            "stats": self._stats,
            "health": lambda: self.engine.health() if isinstance(self.engine, BatchEngine) else {"scheduler": True, "stalled": 0.0},
        }

    def _generation(self) -> BatchEngine:
        if not isinstance(self.engine, BatchEngine):
            raise InvalidOptions("this instance was loaded for embeddings, not generation")
        return self.engine

    @staticmethod
    def _not_pooling(*_args: Any) -> Any:
        """`embed` or `rerank` sent to a generation instance (an embedding one queues them)."""
        raise InvalidOptions("this instance was loaded for generation, not embeddings or reranking")

    def _image_positions(self, images: list[list[Any]]) -> list[int]:
        projector = self._generation().projector
        if projector is None:
            raise InvalidOptions("this model cannot see images: it was loaded without a projector", field="images")
        return [projector.positions(DecodedImage(*image)) for image in images]

    def _stats(self) -> dict[str, Any]:
        """What tests and /api/ps read about the engine."""
        engine = self.engine
        stats: dict[str, Any] = {"rss": psutil.Process().memory_info().rss}
        if isinstance(engine, BatchEngine):
            stats.update(decoded=engine.decoded, busy=engine.busy, kv_states=len(engine.kv_cache),
                         kv_bytes=engine.kv_cache.bytes, kv_hits=engine.kv_cache.hits,
                         drafted=engine.output.drafted, draft_accepted=engine.output.draft_accepted)
        return stats

    def _submit(self, req_id: int, req: GenerationRequest) -> None:
        """Into the engine. A request sent with its prompt's text is tokenized here on the main
        thread (the daemon sends at most `SOURCE_CHARS` of it) and announced with `Started`
        once it is in: the scheduler thread is woken first, and the daemon, woken by `Started`,
        may take this core before the next line runs. `Started` still precedes the request's
        first token: the channel stays locked from the submit to `Started`'s send, so a step
        that ends meanwhile (a tiny model's takes a fraction of a millisecond) waits to write
        its events. A request that fails to start may be refused before `Started` arrives,
        which the daemon reads as the refusal it is."""
        engine = self._generation()
        tokens = None if req.source is None else engine.vocabulary.prompt(req.source)
        if tokens is not None:
            check_prompt(tokens, engine.n_ctx)
            req = dataclasses.replace(req, tokens=tokens, source=None)
        if tokens is None:
            self.jobs[req_id] = engine.submit(req, self.sink, req_id)
            return
        started = ["ev", [[req_id, encode_event(Started(len(tokens)))]]]
        self.jobs[req_id] = self.channel.send_after(lambda: engine.submit(req, self.sink, req_id), started)

    def sink(self, items: list[tuple[EngineJob, Any]]) -> None:
        """One engine step's events: one message."""
        self.channel.send(["ev", [[job.tag, encode_event(event)] for job, event in items]])

    def call(self, call_id: int, method: str, args: list[Any]) -> None:
        try:
            value = self.calls[method](*args)
        except Exception as exc:  # a domain error travels as itself, anything else as a crash of this call
            self.answer(call_id, exc, None)
        else:
            self.answer(call_id, None, value)

    def answer(self, call_id: int, error: BaseException | None, value: Any) -> None:
        self.channel.send(["ok", call_id, value] if error is None else ["err", call_id, encode_error(error)])

    def serve(self, messages: Iterator[list[Any]]) -> None:
        for message in messages:
            kind = message[0]
            if kind == "gen":
                _, req_id, data = message
                try:
                    self._submit(req_id, decode_request(data))
                except Exception as exc:
                    self.channel.send(["ev", [[req_id, encode_event(Failed(exc))]]])
            elif kind == "cancel":
                if (job := self.jobs.get(message[1])) is not None:
                    job.cancel.set()
            elif kind == "call":
                _, call_id, method, args = message
                if self.pooling is not None and method in POOLED:
                    self.pooling.put(call_id, method, args)
                elif method in TOKENIZING and _text_size(args) <= INLINE_TEXT:
                    self.call(call_id, method, args)
                else:
                    self.pool.submit(self.call, call_id, method, args)
            elif kind == "exit":
                return


def load(config: RunnerConfig) -> BatchEngine | EmbeddingEngine:
    if config.spec.embedding:
        return EmbeddingEngine(config.spec, config.n_threads)
    return BatchEngine(config.spec, config.n_threads, config.kv_cache_bytes, quiet=False,
                       attention_cliff=config.attention_cliff)


def gpu_free(config: RunnerConfig) -> int:
    """The GPUs' free memory now, when this load offloads (0 otherwise: a CPU-only runner never
    touches a GPU, and asking would make it hold a CUDA context). `devices` is imported only
    then: it brings asyncio (for the daemon's probe), which a CPU runner has no use for."""
    if not config.spec.n_gpu_layers:
        return 0
    from myllm.runtime.devices import llama_devices

    return llama_devices().free


def main(argv: list[str]) -> None:
    # A fatal signal (a segfault inside llama.cpp) prints every thread's Python traceback to
    # stderr, which the daemon logs when the runner dies.
    faulthandler.enable()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=int(argv[2])))
    messages = channel.messages()
    first = next(messages, None)
    if first is None or first[0] != "load":
        os._exit(2)
    config = RunnerConfig.decode(first[1])
    before = psutil.Process().memory_info().rss
    if not config.spec.embedding:  # the embedding engine is llama-cpp-python's `Llama`
        bindings_only()  # before anything imports llama_cpp (the GPU probe below does)
    gpu_before = gpu_free(config)
    try:
        engine = load(config)
    except MyLLMError as exc:
        channel.send(["fail", encode_error(exc)])
        os._exit(0)
    after = psutil.Process().memory_info().rss
    vram_used = max(0, gpu_before - gpu_free(config))
    channel.send(["ready", {"n_ctx": engine.n_ctx, "n_vocab": engine.n_vocab, "rss_before": before, "rss_after": after,
                            "vram_used": vram_used,
                            "attention_cliff": engine.attention_cliff if isinstance(engine, BatchEngine) else None}])
    try:
        RunnerLoop(channel, engine).serve(messages)
    finally:
        # Nothing to free by hand: the process's exit returns the model's memory to the OS, and
        # skipping llama.cpp's destructors makes an unload immediate.
        sys.stdout.flush()
        os._exit(0)
