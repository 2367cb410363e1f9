"""From a request to the prompt's tokens: chat templates rendered on a small pool of their own,
conversations trimmed to the context in one pass, message text tokenized as text.

Rendering runs Jinja templates, which are programs: it gets its own few threads (so a slow
template never fills the thread pool every other route uses), a bounded queue (past it, 503),
a deadline, and a cancel flag that is set when the request goes away or the daemon stops.
A small conversation whose template has rendered quickly before is rendered on the event loop
itself, within `INLINE_SECONDS`: most renderings take a tenth of a millisecond, less than the
hop to a pool thread and back costs on a busy machine, and that hop lies on every chat
request's way to its first token. A template that once runs past that budget on the loop
renders on the pool from then on.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from myllm.errors import InvalidOptions, Overloaded
from myllm.pools import settle
from myllm.registry.chat_templates import Deadline, RenderCancelled
from myllm.registry.schema import ModelRow
from myllm.runtime.engine_types import joined_units
from myllm.runtime.instance import Tokenizer
from myllm.runtime.request.images import Markers
from myllm.runtime.request.template import Part, RenderedPrompt, Think, fallback_for, render_chat, splits_thinking

T = TypeVar("T")
INLINE_SECONDS = 0.002
"""How long a rendering may hold the event loop before it moves to a pool thread."""
INLINE_CHARS = 16_384
"""Conversations with more text than this (messages and tools) always render on the pool: their
rendering's steps grow with the text, and the budget is only checked between steps."""
_Job = tuple[Callable[[Deadline], Any], threading.Event, "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class _OverBudget(RenderCancelled):
    """The rendering tried on the event loop ran past `INLINE_SECONDS` (a `RenderCancelled`, so
    the sandbox lets it through as it is)."""


class _InlineDeadline(Deadline):
    def check(self) -> None:
        if time.monotonic() > self.ends:
            raise _OverBudget()


class PreparePool:
    """A few daemon threads that render prompts. Daemon threads, because a thread cannot be
    killed and a rendering that ignores its deadline must not hold up the daemon's exit."""

    def __init__(self, workers: int, max_waiting: int, timeout: float) -> None:
        self.workers = workers
        self.max_waiting = max_waiting
        self.timeout = timeout
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: set[threading.Event] = set()
        """The cancel flags of the jobs queued or running."""
        self._quick: set[str] = set()
        """Templates that rendered within the inline budget on a pool thread: tried on the loop."""
        self._slow: set[str] = set()
        """Templates that ran past the inline budget on the loop once: they render on the pool."""
        self._threads = [
            threading.Thread(target=self._work, name=f"prompt-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return self.pending >= self.workers + self.max_waiting

    async def run(self, fn: Callable[[Deadline], T]) -> T:
        """`fn(deadline)` on a pool thread. Cancelling the caller cancels the work at its next
        deadline check."""
        cancelled = threading.Event()
        with self._lock:
            if self.full:
                raise Overloaded(f"{len(self._pending)} prompts are being prepared; try again shortly")
            self._pending.add(cancelled)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, cancelled, future, loop))
        try:
            return await future
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def render(self, fn: Callable[[Deadline], T], template: str, size: int) -> T:
        """`fn(deadline)`, a rendering of `template` over `size` characters of input: on the
        event loop when the input is small and the template has rendered on a pool thread
        within `INLINE_SECONDS` before (so it is compiled, and quick) and has never run past
        that budget on the loop; on a pool thread (`run`) otherwise, and whenever the pool is
        full (a 503, as before)."""
        if size <= INLINE_CHARS and template in self._quick and not self.full:
            try:
                return fn(_InlineDeadline(INLINE_SECONDS))
            except _OverBudget:
                self._quick.discard(template)
                self._slow.add(template)

        def timed(deadline: Deadline) -> tuple[T, float]:
            started = time.perf_counter()
            return fn(deadline), time.perf_counter() - started

        result, took = await self.run(timed)
        if took <= INLINE_SECONDS and template not in self._slow:
            self._quick.add(template)
        return result

    def close(self) -> None:
        """Cancel everything queued or running and let the threads end."""
        with self._lock:
            for flag in self._pending:
                flag.set()
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, cancelled, future, loop = job
            try:
                result: Any = fn(Deadline(self.timeout, cancelled))
            except BaseException as exc:  # noqa: BLE001 (handed to the caller, whatever it is)
                loop.call_soon_threadsafe(settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(settle, future, result, None)
            finally:
                with self._lock:
                    self._pending.discard(cancelled)


def _size(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """Characters of input a rendering goes through: the messages' contents, and anything else
    (tool calls, tool definitions) as its JSON-ish text length, counted only when present."""
    size = 0
    for message in messages:
        size += len(str(message.get("content") or ""))
        if len(message) > 2:  # role and content, plus tool calls or a name
            size += len(repr(message))
    return size + (len(repr(tools)) if tools else 0)


class Source(NamedTuple):
    """What `PromptSource` carries (runtime/engine_types.py), built by the runtime."""

    units: list[list[Part]] | None
    raw: str | None
    budget: int


_Prepared = tuple[RenderedPrompt, list[list[int] | None], list[list[tuple[int, int]]]]
"""A rendering, its units' tokens and its units' images (empty without images)."""


def _fits(units: list[list[int] | None], budget: int) -> bool:
    return all(unit is not None for unit in units) and sum(len(u) for u in units if u is not None) <= budget


class TextPrompt:
    """A raw prompt: special tokens in it are parsed (the caller wrote the model's markup)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.dropped = 0
        self.thinking_open: bool | None = None
        """Raw text is never split: the caller wrote the model's markup itself."""
        self.images: tuple[tuple[int, int], ...] = ()

    trimmable = False

    async def tokens(self, runner: Tokenizer, reserve: int) -> tuple[list[int], tuple[str, ...]]:
        return await runner.tokenize(self.text), ()

    async def source(self, n_ctx: int, reserve: int, max_chars: int) -> tuple[Source, tuple[str, ...]] | None:
        """The text for the runner to tokenize with the request (runtime/engine_types.py
        `PromptSource`), or None when it is longer than `max_chars`."""
        return None if len(self.text) > max_chars else (Source(None, self.text, n_ctx), ())


class ChatPrompt:
    """Messages rendered with the model's chat template, trimmed to fit when asked to;
    `prefill` starts the assistant's turn (as text, like any message)."""

    def __init__(
        self, row: ModelRow, messages: list[dict[str, Any]], pool: PreparePool, trim: bool, prefill: str = "",
        tools: list[dict[str, Any]] | None = None, think: Think = None, markers: Markers | None = None,
    ) -> None:
        self.row = row
        self.markers = markers
        """Set when the messages' contents hold images (runtime/request/images.py)."""
        self.images: tuple[tuple[int, int], ...] = ()
        """Once tokenized: (the token the image goes before, the image's number) per image, in order."""
        self.messages = messages
        self.tools = tools
        self.think = think
        self.thinking_open: bool | None = None
        """Once tokenized, for a model asked to think: whether its output starts inside the
        reasoning section; None when its output is all answer."""
        self.pool = pool
        self.trim = trim
        self.prefill = prefill
        self.dropped = 0
        self.text = ""

    @property
    def trimmable(self) -> bool:
        """Whether messages may drop out to fit: asked for, and some besides the system message
        and the last one."""
        return self.trim and len(self.messages) - (1 if self.messages[0]["role"] == "system" else 0) > 1

    async def source(self, n_ctx: int, reserve: int, max_chars: int) -> tuple[Source, tuple[str, ...]] | None:
        """The rendered conversation for the runner to tokenize with the request
        (runtime/engine_types.py `PromptSource`) and its stop strings; None when it must be
        tokenized first: it holds images, or more than `max_chars` of text. Its budget leaves
        `reserve` for the reply when messages may drop out: a conversation over it is refused,
        and `tokens` then trims it."""
        if self.markers is not None or _size(self.messages, self.tools) > max_chars:
            return None
        rendered, units = await self._render(self.messages)
        self._describe(rendered)
        return Source(units, None, n_ctx - reserve if self.trimmable else n_ctx), rendered.stop

    async def _render(self, msgs: list[dict[str, Any]]) -> tuple[RenderedPrompt, list[list[Part]]]:
        """One rendering: the prompt and its units of text (the prefill in the last)."""
        row, details = self.row, self.row.details or {}
        rendered = await self.pool.render(lambda deadline: render_chat(
            msgs, row.template, row.family, details.get("bos_token"), details.get("eos_token"), deadline=deadline,
            tools=self.tools, think=self.think,
        ), row.template or fallback_for(row.family).template, _size(msgs, self.tools))
        units = [list(unit) for unit in rendered.units]
        if self.prefill:
            units[-1].append((self.prefill, False))
        return rendered, units

    async def _prepare(self, runner: Tokenizer, msgs: list[dict[str, Any]]) -> _Prepared:
        """One rendering and one tokenizing call: each unit's tokens (None for the early units
        that cannot fit beside the later ones), and each unit's images (see `_with_images`)."""
        rendered, units = await self._render(msgs)
        if self.markers is None:
            return rendered, await runner.tokenize_units(units, runner.n_ctx), []
        return rendered, *await self._with_images(runner, units, msgs, self.markers)

    async def _with_images(self, runner: Tokenizer, units: list[list[Part]], msgs: list[dict[str, Any]],
                           markers: Markers) -> tuple[list[list[int] | None], list[list[tuple[int, int]]]]:
        """Units with images in them: each unit cut at its images into pieces tokenized apart
        (as libmtmd tokenizes the text between its media markers; BOS on the first piece only),
        then joined again; and per unit its images, (offset in the unit, image number). Every
        image of the messages rendered must be in the prompt exactly once."""
        pieces: list[list[Part]] = []
        owner: list[int] = []
        placed: list[list[tuple[int, int]]] = [[] for _ in units]
        after: list[list[int]] = []  # the image that follows each piece, if one does
        for i, unit in enumerate(units):
            current: list[Part] = []
            for text, special in unit:
                for bit in markers.split(text):
                    if isinstance(bit, str):
                        current.append((bit, special))
                        continue
                    pieces.append(current)
                    owner.append(i)
                    after.append([bit])
                    current = []
            pieces.append(current)
            owner.append(i)
            after.append([])
        found = sorted(n for images in after for n in images)
        wanted = sorted(n for msg in msgs for n in markers.count(str(msg.get("content") or "")))
        if found != wanted:
            raise InvalidOptions(f"the chat template put {len(found)} of the {len(wanted)} images in the prompt "
                                 "(it drops or repeats message contents)", field="messages")
        tokenized = await runner.tokenize_units(pieces, runner.n_ctx)
        joined: list[list[int] | None] = [[] for _ in units]
        for tokens, i, images in zip(tokenized, owner, after):
            unit = joined[i]
            if tokens is None or unit is None:
                joined[i] = None
                continue
            unit += tokens
            placed[i] += [(len(unit), n) for n in images]
        return joined, placed

    async def tokens(self, runner: Tokenizer, reserve: int) -> tuple[list[int], tuple[str, ...]]:
        """Rendered and tokenized once when the conversation fits. When it does not and `trim`
        is set, the oldest messages after the system message drop out: how many is computed
        from each message's token count (each message tokenized once), checked with one more
        rendering, and searched by halving only when the template is irregular enough for the
        estimate to miss."""
        rendered, units, placed = await self._prepare(runner, self.messages)
        budget = runner.n_ctx - reserve
        first = 1 if self.messages[0]["role"] == "system" else 0
        droppable = len(self.messages) - first - 1
        if not self.trimmable or _fits(units, budget):
            return self._done(rendered, units, placed, runner.n_ctx)

        async def attempt(k: int) -> _Prepared:
            return await self._prepare(runner, self.messages[:first] + self.messages[first + k :])

        k = self._estimate(units, first, droppable, budget)
        rendered, units, placed = await attempt(k)
        if not _fits(units, budget) and k < droppable:
            low, high, found = k + 1, droppable, None
            while low <= high:
                mid = (low + high) // 2
                tried = await attempt(mid)
                if _fits(tried[1], budget):
                    found, high = (mid, tried), mid - 1
                else:
                    low = mid + 1
            k, (rendered, units, placed) = found or (droppable, await attempt(droppable))
        self.dropped = k
        return self._done(rendered, units, placed, runner.n_ctx)

    def _describe(self, rendered: RenderedPrompt) -> None:
        """The prompt's text as the model sees it, and whether its output starts thinking."""
        self.text = rendered.text + self.prefill
        if self.markers is not None:
            self.text = self.markers.shown(self.text)
        if splits_thinking(self.row.template, self.think):
            self.thinking_open = rendered.thinking_open and not self.prefill

    def _done(self, rendered: RenderedPrompt, units: list[list[int] | None], placed: list[list[tuple[int, int]]],
              n_ctx: int) -> tuple[list[int], tuple[str, ...]]:
        self._describe(rendered)
        if self.markers is not None:
            offsets = [0]
            for unit in units:
                offsets.append(offsets[-1] + len(unit or ()))
            self.images = tuple((offsets[i] + at, n) for i, images in enumerate(placed) for at, n in images)
        return joined_units(units, n_ctx), rendered.stop

    @staticmethod
    def _estimate(units: list[list[int] | None], first: int, droppable: int, budget: int) -> int:
        """The fewest oldest messages (after the system message) whose units, left out, leave
        the rest within `budget`: a unit that was not even tokenized must go."""
        kept_head = units[:first]
        head = sum(len(u) for u in kept_head if u is not None) if all(u is not None for u in kept_head) else None
        # suffix[k]: tokens of the units from message first+k to the end; None if one was not tokenized.
        suffix: list[int | None] = [0] * (droppable + 2)
        total: int | None = 0
        for i in range(len(units) - 1, first - 1, -1):
            unit = units[i]
            total = None if total is None or unit is None else total + len(unit)
            if i - first <= droppable:
                suffix[i - first] = total
        for k in range(droppable + 1):
            rest = suffix[k]
            if head is not None and rest is not None and head + rest <= budget:
                return k
        return droppable
