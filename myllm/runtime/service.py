"""The runtime's public face: chat, generate, embed and token probabilities over the model
manager. Every API adapter calls these and nothing below them.

Errors the caller can still answer with a status code (unknown model, invalid options,
prompt too long, overload, out of memory) are raised before a stream is returned; what goes
wrong later is raised from the stream's iteration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from myllm.errors import InvalidOptions, MyLLMError, PromptTooLong, WrongModelKind
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.runtime.devices import Devices
from myllm.runtime.engine_types import (
    SOURCE_CHARS,
    AdapterSet,
    Candidate,
    DecodedImage,
    DoneEvent,
    Event,
    GenerationRequest,
    PromptImage,
    PromptSource,
    Thinking,
    TokenEvent,
    check_prompt,
)
from myllm.runtime.instance import EventStream, Runner, RunnerStats
from myllm.runtime.placement.leases import KeepAlive, Lease
from myllm.runtime.placement.manager import ModelManager
from myllm.runtime.placement.report import LoadedInfo
from myllm.runtime.request.grammar import format_grammar
from myllm.runtime.request.image_fetch import ImageFetcher
from myllm.runtime.request.images import Image, ImageLimits, Markers, check_count, decode_image
from myllm.runtime.request.options import GenerationOptions, sampling_defaults
from myllm.runtime.request.prompt import ChatPrompt, PreparePool, TextPrompt
from myllm.runtime.request.schema_size import SchemaLimits
from myllm.runtime.request.template import Think, thinking_markup
from myllm.runtime.request.tools import Call, CallFilter, Choice, ToolUse, check_choice, json_depth, parse_tools
from myllm.settings import Settings

ROLES = ("system", "user", "assistant", "tool")
PREPARE_WORKERS = 2
"""Threads rendering chat templates and converting JSON schemas: quick unless a template is slow,
and then more threads would only mean more of them stuck."""
EMBED_SLICE = 32
"""Inputs sent to the runner in one call. An embedding request is embedded slice by slice, so a
long one never holds the model (nor the daemon's loop, decoding one huge answer) for long: other
requests' slices and calls go in between."""


class GenerationStream(AsyncIterator[Event]):
    """`TokenEvent`s then one `DoneEvent`. Holds the model lease until the stream ends or is
    closed; closing early cancels generation within one token."""

    def __init__(self, events: EventStream, lease: Lease[Runner], prompt_tokens: int) -> None:
        self._events = events
        self._lease = lease
        self.model = lease.row.name
        self.device = lease.device
        """Where the model computes ("cpu", "cuda")."""
        self.prompt_tokens = prompt_tokens
        self.done: DoneEvent | None = None
        self.counts: list[int] = []
        """Token counts of the texts the caller asked to have counted."""
        self.dropped = 0
        """Messages left out of the prompt to fit the context."""
        self.prompt_text = ""
        """The prompt as the model saw it (after the chat template)."""
        self.calls: CallFilter | None = None
        """Set when the reply may hold tool calls: text that may be one is held back."""
        self.tool_calls: list[Call] = []
        """The calls read from the reply, once it is done."""
        self._content = ""
        self._pending: DoneEvent | None = None
        self.on_done: Callable[[str, DoneEvent], None] = lambda model, done: None
        """Told once of the generation's end (the runtime's events)."""

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Event:
        if self._pending is not None:  # the tool filter's last text went out first
            done, self._pending = self._pending, None
            return self._finished(done)
        if self.done is not None:
            await self.aclose()
            raise StopAsyncIteration
        try:
            event = await self._events.__anext__()
        except BaseException:
            await self.aclose()
            raise
        if self.calls is not None:
            return self._filtered(event, self.calls)
        return self._finished(event) if isinstance(event, DoneEvent) else event

    def _finished(self, done: DoneEvent) -> DoneEvent:
        """The end, kept and told (once) to `on_done`."""
        self.done = done
        self.on_done(self.model, done)
        return done

    def _filtered(self, event: Event, calls: CallFilter) -> Event:
        """Text without the calls in it; the calls in `tool_calls` at the end."""
        if isinstance(event, TokenEvent):
            text = calls.feed(event.text)
            self._content += text
            return dataclasses.replace(event, text=text)
        cut_off = event.finish_reason == "length"
        tail, self.tool_calls = calls.finish(cut_off)
        self._content += tail
        # A reply the limit cut off says so ("length"), its complete calls beside it.
        reason = "tool_calls" if self.tool_calls and not cut_off else event.finish_reason
        done = dataclasses.replace(event, text=self._content, finish_reason=reason)
        if not tail:
            return self._finished(done)
        self._pending = done
        return TokenEvent(tail, -1)

    async def aclose(self) -> None:
        await self._events.aclose()
        self._lease.release()

    async def collect(self) -> DoneEvent:
        """Run to the end; the `DoneEvent` carries the whole text and the counts."""
        async for _ in self:
            pass
        assert self.done is not None
        return self.done

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass(frozen=True)
class Embeddings:
    model: str
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class Ranking:
    """A rerank's answer: `(index, score)` for every document asked for, the most relevant
    first (equal scores keep the documents' order)."""

    model: str
    ranked: list[tuple[int, float]]
    prompt_tokens: int


def require_kind(row: ModelRow, kind: str, use: str) -> None:
    """`WrongModelKind` unless `row` is a `kind` model. Embeddings are the exception: any model
    but a reranker gives them (a chat model mean-pooled, as before kinds were known)."""
    if row.kind != kind and not (kind == "embedding" and row.kind != "reranking"):
        raise WrongModelKind(row.name, row.kind, use)


def check_documents(query: str, documents: list[str], top_n: int | None, settings: Settings) -> None:
    """A rerank's inputs within MYLLM_MAX_RERANK_DOCUMENTS and MYLLM_MAX_DOCUMENT_BYTES, before
    anything is tokenized; `top_n`, if given, at least 1."""
    if top_n is not None and top_n < 1:
        raise InvalidOptions("top_n must be at least 1", field="top_n")
    if not documents:
        raise InvalidOptions("documents must not be empty", field="documents")
    if len(documents) > settings.max_rerank_documents:
        raise InvalidOptions(f"{len(documents)} documents, more than the {settings.max_rerank_documents} a request may "
                             "send (MYLLM_MAX_RERANK_DOCUMENTS)", field="documents")
    most = settings.max_document_bytes
    for field, text in [("query", query), *((f"documents[{i}]", d) for i, d in enumerate(documents))]:
        check_text(text, field)
        if len(text) * 4 > most and len(text.encode()) > most:  # no UTF-8 character takes more than 4 bytes
            raise InvalidOptions(f"{field} is more than the {most} bytes a document may have "
                                 "(MYLLM_MAX_DOCUMENT_BYTES)", field=field)


def shortened(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """Each vector's first `dimensions` values, normalised again: what Ollama's and OpenAI's
    `dimensions` mean (for models trained to nest their embeddings, as Matryoshka ones are).
    None keeps them whole; more than the model gives, or fewer than 1, is refused."""
    if dimensions is None or dimensions == len(vectors[0]):
        return vectors
    if not 1 <= dimensions <= len(vectors[0]):
        raise InvalidOptions(f"dimensions must be 1 to {len(vectors[0])}, the size of this model's embeddings "
                             f"(got {dimensions})", field="dimensions")
    heads = [v[:dimensions] for v in vectors]
    return [[x / norm for x in head] for head in heads for norm in [math.hypot(*head) or 1.0]]


T = TypeVar("T")


def adapter_set(row: ModelRow, opts: GenerationOptions, path_of: Callable[[str], Path]) -> AdapterSet:
    """The LoRA adapters a request runs with: the model's (its ADAPTER lines, each at scale 1)
    with the request's `lora` scales laid over them by id; an id the model lacks is refused."""
    adapters = row.adapters or []
    scales = [1.0] * len(adapters)
    for choice in opts.lora or ():
        if choice.id >= len(adapters):
            raise InvalidOptions(f"lora id {choice.id} is not one of the model's adapters "
                                 f"({len(adapters)}: ids 0 to {len(adapters) - 1})" if adapters else
                                 f"lora id {choice.id}: model '{row.name}' has no LoRA adapters", field="lora")
        scales[choice.id] = choice.scale
    return tuple((str(path_of(a["digest"])), scale) for a, scale in zip(adapters, scales, strict=True) if scale)


async def submit(runner: Runner, prompt: _Prompt, opts: GenerationOptions, grammar: str | None,
                 thinking: Callable[[], Thinking | None], count: list[str] | None,
                 images: list[DecodedImage], adapters: AdapterSet = ()) -> tuple[EventStream, int, list[int]]:
    """The request in the runner: its events, its prompt's positions and the token counts of
    `count` (each a status code when refused, never a stream's error). A prompt of little text
    goes with the request for the runner to tokenize (one message, not a tokenizing round trip
    first; `PromptSource`); one the runner finds too long for its budget is then trimmed here,
    when it may be. Counting runs beside either."""
    reserve = min(opts.max_tokens or 256, runner.n_ctx // 4)

    async def counted(first: Awaitable[T]) -> tuple[T, list[int]]:
        if not count:  # no task to start: the call goes out at once
            return await first, []
        done, counts = await asyncio.gather(first, runner.count_tokens(count))  # one round trip each, at once
        return done, counts

    sourced = await prompt.source(runner.n_ctx, reserve, SOURCE_CHARS)
    if sourced is not None:
        source, stop = sourced
        events = runner.generate(GenerationRequest([], opts, stop, grammar, thinking(), source=PromptSource(*source),
                                                   adapters=adapters))
        try:
            length, counts = await counted(events.started())
            return events, length, counts
        except PromptTooLong:
            if not prompt.trimmable:
                raise
        except BaseException:
            await events.aclose()
            raise
    (tokens, stop), counts = await counted(prompt.tokens(runner, reserve))
    check_prompt(tokens, runner.n_ctx)
    placed = tuple(PromptImage(at, images[n]) for at, n in prompt.images) if images else ()
    length = await prompt_length(runner, tokens, [image.image for image in placed])
    request = GenerationRequest(tokens, opts, stop, grammar, thinking(), placed, adapters=adapters)
    return runner.generate(request), length, counts


async def prompt_length(runner: Runner, tokens: list[int], images: list[DecodedImage]) -> int:
    """A prompt's positions: its tokens and the positions its images take on this model (the
    runner's projector slices them, without encoding), so a stream's `prompt_tokens` is exact
    from its start and an image that takes the prompt past the context is refused here, with a
    status code, rather than in the stream."""
    length = len(tokens) + (sum(await runner.image_positions(images)) if images else 0)
    if length >= runner.n_ctx:
        raise PromptTooLong(length, runner.n_ctx)
    return length


def check_text(text: str, field: str) -> None:
    """NUL characters end C strings inside llama.cpp and tokenizers, and a lone surrogate (which
    JSON can carry as an escape) is no text at all: refuse both clearly."""
    if "\x00" in text:
        raise InvalidOptions(f"{field} contains a NUL character", field=field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidOptions(f"{field} contains a lone surrogate ({text[exc.start]!r}), which is not text", field=field) from None


def check_json_text(value: Any, field: str) -> None:
    """Every string in a JSON value (tool definitions, a call's arguments) is text."""
    if isinstance(value, str):
        check_text(value, field)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json_text(key, field)
            check_json_text(item, f"{field}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json_text(item, f"{field}[{i}]")


def check_json_depth(text: str, max_depth: int, field: str) -> None:
    """`InvalidOptions` when `text` is JSON nesting deeper than `max_depth`; text that is not
    JSON passes (it is used as text)."""
    try:
        depth = json_depth(json.loads(text))
    except RecursionError:  # deeper than the parser's own stack
        depth = max_depth + 1
    except ValueError:
        return
    if depth > max_depth:
        raise InvalidOptions(f"{field} nests deeper than {max_depth} levels (MYLLM_MAX_JSON_DEPTH)", field=field)


def check_messages(messages: list[dict[str, Any]], limit: int, max_depth: int) -> list[dict[str, Any]]:
    """role and content, and what a tool conversation adds: an assistant message's
    `tool_calls` ([{"type": "function", "function": {"name", "arguments"}}], as chat templates
    read them) and a tool message's `name`. The template renders them; parsing calls out of a
    reply is the tool-call layer's job. Arguments sent as JSON text (OpenAI's way) nest at most
    `max_depth` deep once parsed, as the request body itself must (the template renders them
    with recursive code). At most `limit` messages (MYLLM_MAX_MESSAGES): each one is rendered,
    tokenized, counted and stored, so their number is what a request costs."""
    if not messages:
        raise InvalidOptions("messages must not be empty", field="messages")
    if len(messages) > limit:
        raise InvalidOptions(f"{len(messages)} messages, more than the {limit} a request may send (MYLLM_MAX_MESSAGES)",
                             field="messages")
    clean = []
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise InvalidOptions(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {role!r})", field="messages")
        if not isinstance(content, str):
            raise InvalidOptions(f"messages[{i}].content must be a string", field="messages")
        check_text(content, f"messages[{i}].content")
        message: dict[str, Any] = {"role": role, "content": content}
        for extra in ("tool_calls", "name"):
            if msg.get(extra):
                check_json_text(msg[extra], f"messages[{i}].{extra}")
                message[extra] = msg[extra]
        for j, call in enumerate(message.get("tool_calls") or []):
            fn = call.get("function", call) if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                check_json_depth(fn["arguments"], max_depth, f"messages[{i}].tool_calls[{j}].function.arguments")
        clean.append(message)
    return clean


def tool_use(tools: list[dict[str, Any]] | None, choice: Choice, parallel: bool, most: int) -> ToolUse:
    """The request's tools and choice, checked (a 400 naming the field); `most` calls a reply
    may make when `parallel`."""
    check_json_text(tools or [], "tools")
    use = ToolUse(parse_tools(tools or []), choice, parallel, most)
    check_choice(choice, use.tools)
    return use


def with_model_defaults(row: ModelRow, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model's system prompt (unless the request has one) and its seed messages
    (Modelfile MESSAGE) come before the request's own messages."""
    head = [m for m in messages if m["role"] == "system"] or (
        [{"role": "system", "content": row.system}] if row.system else []
    )
    return head + list(row.messages or []) + [m for m in messages if m["role"] != "system"]


_Prompt = TextPrompt | ChatPrompt


class Runtime:
    def __init__(self, registry: Registry, settings: Settings, manager: ModelManager[Runner] | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.manager: ModelManager[Runner] = manager or ModelManager(registry, settings)
        self.prepare = PreparePool(PREPARE_WORKERS, settings.max_queue, settings.template_timeout)
        """Where chat templates are rendered, JSON schemas become grammars and images are decoded
        (runtime/request/prompt.py)."""
        self.image_limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_images)
        self.image_fetcher = ImageFetcher(settings.image_urls, settings.image_url_timeout, settings.max_image_bytes)
        self.schema_limits = SchemaLimits(settings.max_grammar, settings.max_schema_depth, settings.max_schema_nodes)

    async def start(self) -> None:
        self.manager.start()

    async def close(self) -> None:
        self.prepare.close()
        await self.manager.close()

    # -- which models are loaded (the API's load/unload/ps routes) ----------------------------

    async def load(self, name: str, keep_alive: KeepAlive = None, *, caller: str | None = None) -> LoadedInfo:
        """Load `name` now (as a request would) and report it. `caller`, here and on every call
        that may load a model: the key whose loads count against MYLLM_RELOADS_PER_KEY (None: not limited)."""
        return await self.manager.load(name, keep_alive=keep_alive, caller=caller)

    async def unload(self, name: str) -> int:
        """Unload every instance of `name` at once; requests running on it end with an error."""
        return await self.manager.unload(name, abort=True)

    def loaded(self) -> list[LoadedInfo]:
        return self.manager.loaded()

    def is_loaded(self, name: str) -> bool:
        return self.manager.is_loaded(name)

    async def runner_stats(self, name: str) -> RunnerStats:
        """A loaded model's runner's own figures (resident memory, saved KV), for metrics."""
        return await self.manager.runner_stats(name)

    def memory_budget(self) -> int:
        return self.manager.budget

    async def devices(self) -> Devices:
        """The GPUs llama.cpp can use (none on a CPU build), as found at start."""
        return await self.manager.devices()

    def gpu_memory_used(self) -> int:
        return self.manager.gpu_memory_used()

    def problems(self) -> list[str]:
        """What is degraded now (readiness): runners restarted after a failed health check, a
        full prompt-preparation queue."""
        found = self.manager.problems()
        if self.prepare.full:
            found.append(f"prompt preparation is full: {self.prepare.pending} prompts are being rendered or waiting")
        return found

    def abort_all(self, error: MyLLMError) -> None:
        """End every running and queued request now with `error` (shutdown's grace is over)."""
        self.manager.abort_all(error)

    async def model(self, name: str | ModelRow) -> ModelRow:
        """The registry row of `name` (a row passes through: callers that looked it up
        already, to answer 404 early, need not look it up twice)."""
        return name if isinstance(name, ModelRow) else await self.registry.lookup(name)

    def options_for(self, row: ModelRow, options: GenerationOptions | None) -> GenerationOptions:
        """The request's options over the model's stored defaults (Modelfile PARAMETERs): what
        the request set wins, field by field."""
        return (options or GenerationOptions()).over(sampling_defaults(row.parameters))

    async def chat(
        self,
        model: str | ModelRow,
        messages: list[dict[str, Any]],
        options: GenerationOptions | None = None,
        *,
        keep_alive: KeepAlive = None,
        trim: bool = False,
        count: list[str] | None = None,
        prefill: str = "",
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Choice = "auto",
        parallel_tool_calls: bool = True,
        think: Think = None,
        caller: str | None = None,
    ) -> GenerationStream:
        """With `trim`, when the conversation does not fit the context (leaving room for the
        reply), the oldest messages after the system message drop out of the prompt.
        `count`: texts whose token counts the stream reports in `counts` (for storing them).
        `prefill`: text the assistant's reply starts with (the stream's text continues it).
        `tools` (OpenAI's function tools), `tool_choice` and `parallel_tool_calls`: see
        runtime/request/tools.py; the stream then holds calls back from its text and reports them in
        `tool_calls`, its `DoneEvent` finishing with `tool_calls`. `think`: see `template.Think`;
        a thinking model's events carry its thinking apart (`thinking`), within the options'
        `thinking_budget`. A message's `content` may hold images (`images.Content`): they go
        where they are among its text, for a model with a projector."""
        row = await self.model(model)
        require_kind(row, "chat", "chat")
        use = tool_use(tools, tool_choice, parallel_tool_calls, self.settings.max_tool_calls)
        opts = self.options_for(row, options)
        if use.active:
            opts = opts.model_copy(update={"format": use.format(opts.format)})
        markers = Markers()
        messages, files = markers.place(messages)
        images = await self._decode(row, files, "messages")
        prompt = self._chat_prompt(row, messages, use, trim, prefill, think, markers if images else None)
        stream = await self._start(row, prompt, opts, keep_alive=keep_alive, count=count, caller=caller,
                                   schema_field="tools" if use.forced else "format", images=images)
        if use.active:
            stream.calls = CallFilter(use.tools, use.forced)
        return stream

    async def count_chat(
        self,
        model: str | ModelRow,
        messages: list[dict[str, Any]],
        *,
        prefill: str = "",
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Choice = "auto",
        think: Think = None,
        caller: str | None = None,
    ) -> int:
        """The tokens of the prompt `chat` would give the model for the same arguments, without
        generating. The tokenizer lives in the runner, so this loads the model as `chat` would
        (the same instance: the model's own `num_ctx`). A prompt longer than the context is
        `PromptTooLong`, as `chat` would answer. Images count by the positions the model's
        projector gives them (sliced, not encoded)."""
        row = await self.model(model)
        require_kind(row, "chat", "chat")
        markers = Markers()
        messages, files = markers.place(messages)
        images = await self._decode(row, files, "messages")
        prompt = self._chat_prompt(row, messages, tool_use(tools, tool_choice, True, self.settings.max_tool_calls), False,
                                   prefill, think, markers if images else None)
        defaults = self.options_for(row, None)
        lease = await self.manager.acquire(row, num_ctx=defaults.num_ctx, num_gpu=defaults.num_gpu, caller=caller)
        try:
            tokens, _ = await prompt.tokens(lease.runner, 0)
            return await prompt_length(lease.runner, tokens, images)
        finally:
            lease.release()

    def recent(self, earlier: list[dict[str, Any]], sent: int) -> list[dict[str, Any]]:
        """A stored conversation's `earlier` messages that fit beside `sent` new ones within
        MYLLM_MAX_MESSAGES: its first message if it is the system message, and the newest
        others. A long session or response chain goes on, its oldest turns left out of the
        prompt (as trimming to the context leaves them out), while a request that itself sends
        too many is refused by `chat`."""
        room = max(self.settings.max_messages - sent, 0)
        if len(earlier) <= room:
            return earlier
        head = earlier[:1] if room and earlier[0]["role"] == "system" else []
        return head + earlier[len(earlier) - (room - len(head)):]

    def _chat_prompt(self, row: ModelRow, messages: list[dict[str, Any]], use: ToolUse, trim: bool, prefill: str,
                     think: Think = None, markers: Markers | None = None) -> ChatPrompt:
        """The checked messages after the model's defaults, with the tools as its template
        needs them: what `chat` renders and `count_chat` counts."""
        msgs, template_tools = use.prompt(
            with_model_defaults(row, check_messages(messages, self.settings.max_messages, self.settings.max_json_depth)),
            row.template)
        return ChatPrompt(row, msgs, self.prepare, trim, prefill, template_tools, think, markers)

    async def _decode(self, row: ModelRow, files: list[Image], field: str) -> list[DecodedImage]:
        """A request's images as pixels: those given by URL fetched first, on the event loop
        (MYLLM_IMAGE_URLS), then all decoded on the preparation pool (never on the event loop),
        each checked against the image settings (`BadImage`, a 400); images sent to a model
        without a projector are refused as Ollama refuses them."""
        if not files:
            return []
        if not row.vision:
            raise InvalidOptions(f'"{row.name}" does not support images', field=field)
        check_count(len(files), self.image_limits)
        limits = self.image_limits
        data = await self.image_fetcher.fetch_all(files)
        decoded = await self.prepare.run(lambda deadline: [decode_image(one, limits) for one in data])
        return [DecodedImage(*pixels) for pixels in decoded]

    async def generate(
        self,
        model: str | ModelRow,
        prompt: str,
        options: GenerationOptions | None = None,
        *,
        system: str | None = None,
        raw: bool = False,
        keep_alive: KeepAlive = None,
        history: list[tuple[str, str]] | None = None,
        count: list[str] | None = None,
        think: Think = None,
        images: list[bytes] | None = None,
        caller: str | None = None,
    ) -> GenerationStream:
        """Completion of `prompt`. A model with a chat template gets the prompt as one user
        turn (after `system`, else the model's own system prompt) unless `raw`; a model
        without one (a base model) continues the text as given. `history` holds earlier
        (prompt, response) pairs of a generate session, which come first. `images` go before
        the prompt's text in its turn (where Ollama puts them), for a model with a projector."""
        check_text(prompt, "prompt")
        if system is not None:
            check_text(system, "system")
        row = await self.model(model)
        require_kind(row, "chat", "generate")
        markers = Markers()
        [turn], files = markers.place([{"role": "user", "content": [*(images or []), prompt]}])
        decoded = await self._decode(row, files, "images")
        if decoded and (raw or not row.template):
            raise InvalidOptions("images need the model's chat template: send them without raw", field="images")
        opts = self.options_for(row, options)
        system = system if system is not None else row.system
        pairs = history or []
        keep = max(self.settings.max_messages - 2, 0) // 2  # pairs beside the system message and the prompt
        pairs = pairs[len(pairs) - keep:] if len(pairs) > keep else pairs
        if raw or not row.template:
            earlier = "".join(p + r for p, r in pairs)
            text = earlier + prompt
            if system and not raw:
                text = f"{system}\n\n{text}"
            return await self._start(row, TextPrompt(text), opts, keep_alive=keep_alive, count=count, caller=caller)
        msgs = with_model_defaults(row, [{"role": "system", "content": system}] if system else [])
        for p, r in pairs:
            msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        msgs.append(turn)
        chat = ChatPrompt(row, msgs, self.prepare, trim=bool(pairs), think=think, markers=markers if decoded else None)
        return await self._start(row, chat, opts, keep_alive=keep_alive, count=count, caller=caller, images=decoded)

    async def _start(
        self,
        row: ModelRow,
        prompt: _Prompt,
        opts: GenerationOptions,
        *,
        keep_alive: KeepAlive,
        count: list[str] | None,
        schema_field: str = "format",
        caller: str | None,
        images: list[DecodedImage] | None = None,
    ) -> GenerationStream:
        """`schema_field`: where the output's JSON schema, if any, came from (for errors).
        `images`: the request's, numbered as the prompt's markers number them."""
        grammar = None
        adapters = adapter_set(row, opts, self.registry.blobs.path)
        if opts.format is not None:  # measured and converted off the loop, refused before any load
            grammar = await self.prepare.run(lambda deadline: format_grammar(opts, self.schema_limits, schema_field))
        lease = await self.manager.acquire(row, keep_alive=keep_alive, num_ctx=opts.num_ctx, num_gpu=opts.num_gpu,
                                           caller=caller)
        try:
            runner = lease.runner
            if opts.max_tokens is not None and opts.max_tokens > runner.n_ctx:
                raise InvalidOptions(
                    f"max_tokens {opts.max_tokens} is more than the model's context of {runner.n_ctx} tokens",
                    field="max_tokens",
                )
            if grammar is not None:
                await runner.check_grammar(grammar)
            markup = thinking_markup(row.template)

            def thinking() -> Thinking | None:  # once the prompt knows whether its output starts thinking
                return None if prompt.thinking_open is None or markup is None else Thinking(
                    markup.open, markup.close, markup.answer, markup.headers, prompt.thinking_open,
                    opts.thinking_budget or self.settings.thinking_budget)

            events, length, counts = await submit(runner, prompt, opts, grammar, thinking, count, images or [], adapters)
        except BaseException:
            lease.release()
            raise
        stream = GenerationStream(events, lease, length)
        stream.on_done = self.manager.events.generation_done
        stream.counts = counts
        stream.dropped = prompt.dropped
        stream.prompt_text = prompt.text
        return stream

    async def embed(
        self, model: str | ModelRow, texts: list[str | list[int]], keep_alive: KeepAlive = None, *, truncate: bool = False,
        dimensions: int | None = None, caller: str | None = None,
    ) -> Embeddings:
        """One vector per input. An input longer than the model's batch is refused, or with
        `truncate` cut to its first tokens that fit; `dimensions` shortens each (`shortened`)."""
        if not texts:
            raise InvalidOptions("input must not be empty", field="input")
        limit = self.settings.max_embed_inputs
        if len(texts) > limit:
            raise InvalidOptions(f"{len(texts)} inputs, more than the {limit} a request may send (MYLLM_MAX_EMBED_INPUTS)",
                                 field="input")
        for i, text in enumerate(texts):
            if isinstance(text, str):
                check_text(text, f"input[{i}]")
        row = await self.model(model)
        require_kind(row, "embedding", "embeddings")
        lease = await self.manager.acquire(row, keep_alive=keep_alive, embedding=True, caller=caller)
        vectors: list[list[float]] = []
        count = 0
        try:
            for start in range(0, len(texts), EMBED_SLICE):
                some, n = await lease.runner.embed(texts[start:start + EMBED_SLICE], truncate)
                vectors += some
                count += n
        finally:
            lease.release()
        return Embeddings(lease.row.name, shortened(vectors, dimensions), count)

    async def rerank(
        self, model: str | ModelRow, query: str, documents: list[str], keep_alive: KeepAlive = None, *,
        truncate: bool = False, top_n: int | None = None, caller: str | None = None,
    ) -> Ranking:
        """Score each document's relevance to `query` with a reranking model (a cross-encoder:
        the pair is evaluated together), documents in slices so other requests go on between;
        the best `top_n` (all when None)."""
        row = await self.model(model)
        require_kind(row, "reranking", "reranking")
        check_documents(query, documents, top_n, self.settings)
        lease = await self.manager.acquire(row, keep_alive=keep_alive, embedding=True, caller=caller)
        scores: list[float] = []
        count = 0
        try:
            for start in range(0, len(documents), EMBED_SLICE):
                some, n = await lease.runner.rerank(query, documents[start:start + EMBED_SLICE], truncate)
                scores += some
                count += n
        finally:
            lease.release()
        return Ranking(row.name, sorted(enumerate(scores), key=lambda pair: -pair[1])[:top_n], count)

    async def next_token_probabilities(
        self, model: str, prompt: str, top_k: int, options: GenerationOptions | None = None, *, raw: bool = True,
        caller: str | None = None,
    ) -> GenerationStream:
        """Generation where each token carries the top-k candidates of its position: `top_k`
        is the options' `logprobs` (checked by `GenerationOptions`), over the rest of `options`."""
        wanted = GenerationOptions.parse({"logprobs": top_k}).over(options or GenerationOptions())
        return await self.generate(model, prompt, wanted, raw=raw, caller=caller)


__all__ = ["Candidate", "Devices", "DoneEvent", "Embeddings", "GenerationOptions", "GenerationStream", "LoadedInfo", "Ranking",
           "Runtime", "TokenEvent"]
