"""The daemon's side of a runner process: start it, talk to it, notice when it dies.

`ModelRunner.start()` spawns `python -m myllm.runtime.runner`, hands it one end of a Unix
socket pair and waits for its "ready". One reader task receives everything the runner sends and
routes it: events to each request's `RequestStream`, answers to the awaiting call. When the
channel closes without the daemon having asked for it, the runner crashed: every request and
call in flight fails with `ModelCrashed` (naming the signal and llama.cpp's last words from the
runner's stderr), and `on_exit` tells the manager to forget the instance.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import psutil

from myllm.errors import ModelCrashed, MyLLMError, OutOfMemory, Overloaded, ShuttingDown
from myllm.runtime.engine_types import (
    DecodedImage,
    DoneEvent,
    GenerationRequest,
    LoadSpec,
    Started,
    TokenEvent,
    check_token_ids,
)
from myllm.runtime.instance import ExitHandler, RunnerStats
from myllm.runtime.runner.protocol import (
    RunnerConfig,
    decode_error,
    decode_event,
    encode_request,
    pack,
    unpacker,
)

log = logging.getLogger(__name__)
IMAGE_POSITIONS_KEPT = 1024
"""Images whose prompt positions a runner's client remembers, by digest (`image_positions`)."""
STDERR_LINES = 200
"""The last lines kept from a runner's stderr, for the error and the log when it dies: llama.cpp's
last words (a GGML_ASSERT), and the Python traceback of every thread that `faulthandler` writes
when the process gets a fatal signal (a segfault)."""
FATAL = "Fatal Python error:"
"""How `faulthandler`'s report begins."""
_DIRECTORIES = re.compile(r"(?<![\w.~:/-])(?:/[^\s/:'\"()]+)+/(?=[^\s/:'\"()])")
"""The folders of an absolute path (what precedes its last part): llama.cpp's `GGML_ASSERT`
line names its source file as the build saw it (`/tmp/pip-install-…/vendor/llama.cpp/…`)."""


def without_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part (a blob's `sha256-…`, a source
    file's `ggml.c:1234`): clients are told neither where MYLLM_HOME is nor how llama.cpp was built."""
    return _DIRECTORIES.sub("", text)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class RequestStream(AsyncIterator[TokenEvent | DoneEvent]):
    """One request's events: `TokenEvent`s then one `DoneEvent`, or an error raised from the
    iteration. Closing it early cancels the request in the runner (within one step)."""

    def __init__(self, runner: ModelRunner, req_id: int) -> None:
        self._runner = runner
        self._id = req_id
        self._queue: asyncio.Queue[TokenEvent | DoneEvent | Started | BaseException] = asyncio.Queue()
        self._done = False

    def _put(self, item: TokenEvent | DoneEvent | Started | BaseException) -> None:
        self._queue.put_nowait(item)

    async def _next(self) -> TokenEvent | DoneEvent | Started:
        """The next item; an error is raised (and ends the stream), a cancelled wait cancels
        the request."""
        try:
            item = await self._queue.get()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    async def started(self) -> int:
        """For a request sent with a `PromptSource`: its prompt's tokens once it went in, or the
        error that kept it out (too long, empty)."""
        item = await self._next()
        if not isinstance(item, Started):
            raise ModelCrashed(f"the runner answered a request with {type(item).__name__} before it went in")
        return item.prompt_tokens

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent | DoneEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._next()
        if isinstance(item, Started):  # nobody asked: the next event is the first of the output
            return await self.__anext__()
        if isinstance(item, DoneEvent):
            self._done = True
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._runner._cancel(self._id)


class ModelRunner:
    """A model loaded in its own process: the daemon's `Runner` (runtime/instance.py). Requests
    go in with `generate()`; `tokenize`, `count_tokens`, `embed` and `stats` are calls with one
    answer."""

    def __init__(self, config: RunnerConfig, max_queue: int) -> None:
        self.config = config
        self.spec = config.spec
        self.max_queue = max_queue
        self.proc: asyncio.subprocess.Process | None = None
        self.n_ctx = 0
        self.n_vocab = 0
        self.rss_before = 0
        self.rss_after = 0
        self.vram_used = 0
        """GPU memory the load took: the device's free memory before it less after it (0 on the CPU)."""
        self.attention_cliff: float | None = None
        self._image_positions: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.on_exit: ExitHandler | None = None
        self.on_out_of_memory: ExitHandler | None = None
        """Told (once) when a request fails because llama.cpp ran out of memory while generating."""
        self._out_of_memory = False
        self._writer: asyncio.StreamWriter | None = None
        self._streams: dict[int, RequestStream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._closing = False
        self._killed: str | None = None
        """Why the daemon killed this runner (a failed health check), if it did."""
        self._exited = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.exit_error: MyLLMError | None = None

    # -- life ------------------------------------------------------------------------------

    @classmethod
    async def start(cls, config: RunnerConfig, max_queue: int) -> ModelRunner:
        """A loaded runner, or the load's error: the runner's own (`ModelLoadError`,
        `OutOfMemory`), or `ModelCrashed` when llama.cpp took the process down while loading."""
        runner = cls(config, max_queue)
        await runner._spawn()
        return runner

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "myllm.runtime.runner", self.spec.name, str(theirs.fileno()), str(self.config.nice),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                # An abort prints its message and exits at once, without ggml's gdb backtrace.
                env={**os.environ, "GGML_NO_BACKTRACE": "1"},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._tasks.append(asyncio.create_task(self._read_stderr(), name=f"runner-stderr-{self.spec.name}"))
        self._send(["load", self.config.encode()])
        messages = self._messages(reader)
        first = await anext(messages, None)
        if first is not None and first[0] == "ready":
            info = first[1]
            self.n_ctx, self.n_vocab = info["n_ctx"], info["n_vocab"]
            self.rss_before, self.rss_after = info["rss_before"], info["rss_after"]
            self.vram_used = info["vram_used"]
            self.attention_cliff = info["attention_cliff"]
            await asyncio.sleep(0)  # let the stderr reader catch up, then forget the load's chatter:
            self._stderr.clear()  # what a crash later leaves there is the runner's last words
            self._tasks.append(asyncio.create_task(self._read(messages), name=f"runner-{self.spec.name}"))
            return
        await self._reap()
        if first is not None and first[0] == "fail":
            raise decode_error(first[1])
        raise ModelCrashed(f"llama.cpp crashed while loading '{self.spec.name}' ({self._last_words()})" + rpc_hint(self.spec))

    async def _messages(self, reader: asyncio.StreamReader) -> AsyncIterator[list[Any]]:
        unpack = unpacker()
        while chunk := await reader.read(1 << 16):
            unpack.feed(chunk)
            for message in unpack:
                yield message

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr.append(line)
                log.debug("runner %s: %s", self.spec.name, line)

    def _last_words(self) -> str:
        """How the process ended, and what llama.cpp printed last (e.g. a GGML_ASSERT): the last
        line before `faulthandler`'s report when there is one, else the report's first line."""
        code = self.proc.returncode if self.proc else None
        lines = [line for line in self._stderr if line.strip()]
        fatal = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(FATAL)), None)
        if fatal is not None:
            said = lines[fatal - 1] if fatal > 0 else lines[fatal]
        else:
            said = lines[-1] if lines else ""
        said = without_paths(said)
        return describe_exit(code) + (f": {said}" if said else "")

    async def _reap(self) -> None:
        """Wait for the process to end and its stderr to be read (both are quick once the
        channel has closed; a runner stuck anyway is killed)."""
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        for task in self._tasks:
            if task is not asyncio.current_task():
                try:
                    await asyncio.wait_for(task, timeout=1)
                except (TimeoutError, asyncio.CancelledError):
                    pass
        self._exited.set()

    async def _read(self, messages: AsyncIterator[list[Any]]) -> None:
        try:
            async for message in messages:
                self._dispatch(message)
        except Exception:  # a garbled channel is as fatal as a closed one
            log.exception("runner %s: bad message", self.spec.name)
        if self._writer is not None:
            self._writer.close()
        await self._reap()
        if self._closing:
            error: MyLLMError = ShuttingDown(f"model '{self.spec.name}' was unloaded")
        elif self._killed:
            error = ModelCrashed(f"the runner of model '{self.spec.name}' was restarted: it {self._killed}")
            log.error("%s", error.message)
        else:
            error = ModelCrashed(f"the runner of model '{self.spec.name}' stopped ({self._last_words()})"
                                 + rpc_hint(self.spec))
            lines = list(self._stderr)  # one argument a line: the text log escapes what each holds, not the breaks
            log.error("%s; its last output:" + "\n%s" * len(lines), error.message, *lines)
        self.exit_error = error
        self._fail_all(error)
        if not self._closing and self.on_exit is not None:
            self.on_exit(self, error)

    def _dispatch(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "ev":
            for req_id, data in message[1]:
                stream = self._streams.get(req_id)
                if stream is None:  # already failed or closed on this side
                    continue
                event = decode_event(data)
                if not isinstance(event, (TokenEvent, Started)):
                    del self._streams[req_id]
                stream._put(event)
                if isinstance(event, OutOfMemory) and not self._out_of_memory and self.on_out_of_memory is not None:
                    self._out_of_memory = True
                    self.on_out_of_memory(self, event)
        elif kind in ("ok", "err"):
            fut = self._calls.pop(message[1], None)
            if fut is not None and not fut.done():
                if kind == "ok":
                    fut.set_result(message[2])
                else:
                    fut.set_exception(decode_error(message[2]))

    def _fail_all(self, error: MyLLMError) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._put(error)
        calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(error)

    @property
    def alive(self) -> bool:
        return not self._exited.is_set() and self.exit_error is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def rss(self) -> int:
        """The runner's resident memory now (0 once it has exited)."""
        try:
            return int(psutil.Process(self.pid).memory_info().rss) if self.alive and self.pid else 0
        except psutil.Error:
            return 0

    async def health(self, timeout: float, stall_limit: float) -> str | None:
        """What is wrong with this runner, or None: it did not answer within `timeout` (stopped,
        or stuck holding its interpreter), its scheduler thread is gone, or a step of it has run
        for more than `stall_limit` seconds."""
        try:
            report = await asyncio.wait_for(self.call("health"), timeout)
        except TimeoutError:
            return f"did not answer its health check within {timeout:g} s"
        except MyLLMError:  # it exited meanwhile: its exit is handled on its own
            return None
        if not report["scheduler"]:
            return "lost its scheduler thread"
        if report["stalled"] > stall_limit:
            return f"made no progress for {report['stalled']:.0f} s"
        return None

    def kill(self, reason: str) -> None:
        """End the runner now; what runs on it fails with `ModelCrashed` naming `reason`, and its
        exit is reported like a crash's (the manager forgets the instance)."""
        if self.proc is None or not self.alive or self._closing:
            return
        self._killed = reason
        self.proc.kill()

    async def close(self, timeout: float = 5.0) -> None:
        """Ask the runner to exit (what runs in it fails with `ShuttingDown`) and wait; a
        runner that does not exit in `timeout` is killed."""
        if self._closing or self.proc is None:
            return
        self._closing = True
        self._fail_all(ShuttingDown(f"model '{self.spec.name}' was unloaded"))
        try:
            self._send(["exit"])
        except (ConnectionError, RuntimeError):
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
        await self._exited.wait()

    # -- requests --------------------------------------------------------------------------

    def _send(self, message: list[Any]) -> None:
        if self._writer is None or self._writer.is_closing():
            raise self.exit_error or ShuttingDown(f"model '{self.spec.name}' is not running")
        self._writer.write(pack(message))

    @property
    def queued(self) -> int:
        return max(0, len(self._streams) - self.spec.n_parallel)

    @property
    def generating(self) -> int:
        """Sequences generating now (at most the model's slots)."""
        return min(len(self._streams), self.spec.n_parallel)

    @property
    def busy(self) -> bool:
        return bool(self._streams) or bool(self._calls)

    def generate(self, req: GenerationRequest) -> RequestStream:
        """Admission (unloading, queue full) is decided here, so a refusal is a status code
        before any stream starts; the runner queues what it is given."""
        if self._closing or not self.alive:
            raise self.exit_error or ShuttingDown("the model is being unloaded")
        if self.queued >= self.max_queue:
            raise Overloaded(f"{self.queued} requests are already waiting for this model; retry later")
        req_id = next(self._ids)
        self._send(["gen", req_id, encode_request(req)])
        stream = RequestStream(self, req_id)
        self._streams[req_id] = stream
        return stream

    def _cancel(self, req_id: int) -> None:
        if self._streams.pop(req_id, None) is not None:
            try:
                self._send(["cancel", req_id])
            except MyLLMError:
                pass

    def abort(self, error: MyLLMError) -> None:
        """Fail every request now with `error` and cancel them in the runner."""
        for req_id in list(self._streams):
            stream = self._streams.pop(req_id)
            stream._put(error)
            try:
                self._send(["cancel", req_id])
            except MyLLMError:
                pass

    async def call(self, method: str, *args: Any) -> Any:
        if not self.alive:
            raise self.exit_error or ShuttingDown(f"model '{self.spec.name}' is not running")
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        try:
            self._send(["call", call_id, method, list(args)])
            return await fut
        finally:
            self._calls.pop(call_id, None)

    async def tokenize(self, text: str) -> list[int]:
        return await self.call("tokenize", text)

    async def tokenize_units(self, units: list[list[tuple[str, bool]]], limit: int) -> list[list[int] | None]:
        """See `BatchEngine.tokenize_units`."""
        return await self.call("units", units, limit)

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return await self.call("count", texts) if texts else []

    async def embed(self, inputs: list[str | list[int]], truncate: bool = False) -> tuple[list[list[float]], int]:
        for item in inputs:  # checked here too: an id beyond 64 bits cannot even cross the channel
            if not isinstance(item, str):
                check_token_ids(item, self.n_vocab)
        vectors, count = await self.call("embed", inputs, truncate)
        return vectors, count

    async def image_positions(self, images: list[DecodedImage]) -> list[int]:
        """The prompt positions each image takes on this model (`Projector.positions`). Only
        images this runner has not counted yet are sent: a conversation resends its images every
        turn, each megabytes of pixels to copy over the channel and to slice again for the same
        answer (one runner has one projector, and a digest is its file's)."""
        known = self._image_positions
        new = list({image.digest: image for image in images if image.digest not in known}.values())
        if new:
            counts = await self.call("image_positions", [[i.digest, i.width, i.height, i.rgb] for i in new])
            known.update(zip((image.digest for image in new), counts, strict=True))
        positions = [known[image.digest] for image in images]
        for image in images:
            known.move_to_end(image.digest)
        while len(known) > IMAGE_POSITIONS_KEPT:
            known.popitem(last=False)
        return positions

    async def rerank(self, query: str, documents: list[str], truncate: bool = False) -> tuple[list[float], int]:
        """A reranking instance's score per document, and the tokens evaluated."""
        scores, count = await self.call("rerank", query, documents, truncate)
        return scores, count

    async def check_grammar(self, grammar: str) -> None:
        """`InvalidOptions` unless llama.cpp compiles `grammar` (in the runner, so a grammar that
        hurts llama.cpp costs at most this model)."""
        await self.call("grammar", grammar)

    async def stats(self) -> RunnerStats:
        return await self.call("stats")


def rpc_hint(spec: LoadSpec) -> str:
    """What a crash of a model spread over RPC workers most likely was: llama.cpp aborts the
    runner when a worker stops answering (the model then reloads without the workers whose
    ports no longer answer: placement/rpc_workers.py)."""
    if not spec.rpc_servers:
        return ""
    return (f"; its layers were on RPC workers {', '.join(spec.rpc_servers)}: one that stops answering ends the "
            "model, which loads again without it")
