"""A batch engine's sequences and what they produce: a request's job and where its events go
(`EngineJob`, `Outbox`), a sequence's state (`Slot`), and `SlotOutput`, which turns a slot's row
of logits into its output: samples the token, posts it, ends the request (a stop string,
`max_tokens`, the end of generation) and writes a thinking section's closing markup when its
budget is spent. The scheduler (batching.py) fills and decodes the batch; this is what happens
to each sequence after the decode."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from myllm.errors import InvalidOptions, ShuttingDown
from myllm.runtime.engine.logprobs import log_probabilities
from myllm.runtime.engine.media import MediaPrompt
from myllm.runtime.engine.sampling import ChainSampler, GreedySampler
from myllm.runtime.engine.speculative import Speculation
from myllm.runtime.engine.thinking import OutputText
from myllm.runtime.engine.vocabulary import Vocabulary
from myllm.runtime.engine_types import AdapterSet, DoneEvent, Failed, GenerationRequest, TokenEvent

log = logging.getLogger(__name__)

Sink = Callable[[list[tuple["EngineJob", Any]]], None]
"""Receives one step's events: (job, TokenEvent | DoneEvent | Failed) pairs, in order."""


@dataclass(eq=False)
class EngineJob:
    req: GenerationRequest
    sink: Sink
    tag: Any = None
    """What the sink knows the request by (a runner's request id)."""
    cancel: threading.Event = field(default_factory=threading.Event)
    abort_error: BaseException | None = None
    """Set when the engine stops the request (unload, shutdown), not its caller."""
    streaming: bool = False
    """A token of its text has been posted (what a client times its first token by)."""


class Outbox:
    """Events queued during steps; `flush` hands each sink all of its events at once (a runner
    writes one message per flush, not one per token per sequence). With an `interval`, a flush
    after a step (`due=True`) waits until that long since the last one unless a request's first
    token or its end is among the events: when steps take a fraction of a millisecond (a small
    model, a GPU), tokens go out a few steps at a time, so the daemon is woken, and takes a
    core from the computation, a few times less often (vLLM's and SGLang's stream interval)."""

    def __init__(self, interval: float = 0.0) -> None:
        self._events: list[tuple[EngineJob, Any]] = []
        self._interval = interval
        self._urgent = False
        self._last = 0.0

    def post(self, job: EngineJob, event: Any) -> None:
        self._events.append((job, event))
        if not isinstance(event, TokenEvent) or not job.streaming:
            self._urgent = True
            job.streaming = isinstance(event, TokenEvent) and bool(event.text)

    def flush(self, due: bool = False) -> None:
        if not self._events:
            return
        now = time.monotonic()
        if due and not self._urgent and now - self._last < self._interval:
            return
        self._urgent, self._last = False, now
        events, self._events = self._events, []
        by_sink: dict[int, tuple[Sink, list[tuple[EngineJob, Any]]]] = {}
        for job, event in events:
            by_sink.setdefault(id(job.sink), (job.sink, []))[1].append((job, event))
        for sink, batch in by_sink.values():
            try:
                sink(batch)
            except Exception:  # a sink that cannot deliver stops its own requests, not the engine
                log.exception("could not deliver events")
                for job, _ in batch:
                    job.cancel.set()


@dataclass
class Slot:
    seq: int
    cached: list[int] = field(default_factory=list)
    """Tokens whose KV this sequence holds."""
    job: EngineJob | None = None
    req: GenerationRequest | None = None
    pending: list[int] = field(default_factory=list)
    """Prompt tokens still to evaluate; then the one sampled token to feed back."""
    media: MediaPrompt | None = None
    """The prompt's images (runtime/engine/media.py), until the request ends."""
    sampler: GreedySampler | ChainSampler | None = None
    """Its own: a `ChainSampler` holds llama.cpp samplers, freed when the request ends."""
    output: OutputText | None = None
    limit: int = 0
    count: int = 0
    prompt_tokens: int = 0
    prompt_eval: int = 0
    started: float = 0.0
    first_at: float | None = None
    speculation: Speculation | None = None
    """The request's drafting (speculative.py); None when it does not speculate."""
    draft: list[int] = field(default_factory=list)
    """Tokens drafted this step, evaluated after the last sampled one."""
    batch_index: int | None = None
    """The slot's first row of logits in this step's batch (one more per draft token)."""
    in_batch: int = 0
    last_used: float = 0.0
    adapters: AdapterSet = ()
    """The LoRA adapters the KV in `cached` was computed with (engine/adapters.py)."""


class SlotOutput:
    """What a slot's decoded row becomes: one instance per engine, used by its scheduler thread."""

    def __init__(self, lib: Any, ctx: Any, vocabulary: Vocabulary, post: Callable[[EngineJob, Any], None],
                 grammar_seconds: float) -> None:
        """`ctx`: the llama.cpp context whose logits rows are read; `post`: the engine's outbox;
        `grammar_seconds`: the CPU time a request's grammar may take for one token before the
        request is stopped (its format may open a costly part only late: an `enum` deep in an
        object)."""
        self._lib, self._ctx = lib, ctx
        self._vocab, self.n_vocab = vocabulary.pointer, vocabulary.n_vocab
        self._token_bytes = vocabulary.token_bytes
        self.vocabulary = vocabulary
        self._post = post
        self._grammar_seconds = grammar_seconds
        self._memory = lib.llama_get_memory(ctx)
        self.drafted = 0
        """Tokens speculative decoding drafted, every request so far (the runner's figures, `/api/ps`)."""
        self.draft_accepted = 0

    def sample(self, slot: Slot) -> None:
        """The slot's next token from its row; with a draft (speculative.py), its rows in order
        while the sampler picks the drafted tokens: row i follows draft token i - 1, so it
        counts only when that token was the sampler's pick, and the first pick that differs
        from the draft (or the pick after the whole draft) is the next token. The rejected
        rows' KV is removed, so `cached` holds exactly what the KV holds."""
        assert slot.batch_index is not None
        if slot.first_at is None:
            slot.first_at = time.perf_counter()
        draft, speculation = slot.draft, slot.speculation
        accepted = 0
        for i in range(len(draft) + 1):
            token = self._next(slot, slot.batch_index + i)
            if token is None or i == len(draft) or token != draft[i]:
                break
            accepted += 1
            if speculation is not None:
                speculation.accepted += 1  # counted as it happens: the request may end on the next row
        if draft:
            keep = len(slot.cached) - len(draft) + accepted
            if keep < len(slot.cached):
                self._lib.llama_memory_seq_rm(self._memory, slot.seq, keep, -1)
                del slot.cached[keep:]
            if speculation is not None:
                speculation.resize(len(draft), accepted)

    def _next(self, slot: Slot, index: int) -> int | None:
        """Sample the batch row `index` and emit its token: the token when the request goes on
        with it next, None when the request ended or the engine writes tokens after it (a
        thinking section's closing markup)."""
        req, job, output = slot.req, slot.job, slot.output
        assert req is not None and job is not None and output is not None and slot.sampler is not None
        logits = logits_row(self._lib, self._ctx, index, self.n_vocab)
        started = time.thread_time() if req.grammar else 0.0  # CPU time (a syscall): grammars only
        token = slot.sampler.sample(logits)  # also accepted into the sampler's state
        if req.grammar and time.thread_time() - started > self._grammar_seconds:
            self.finish(slot, None, InvalidOptions(
                f"the output format's grammar took more than {self._grammar_seconds:g} s for one token, which stalls "
                "every request on this model; use a smaller schema", field="format"))
            return None
        k = req.options.logprobs
        logprob, top = (None, None) if k is None else log_probabilities(logits, token, k, self.vocabulary.piece)
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            self.finish(slot, "stop")
            return None
        slot.count += 1
        raw = self._token_bytes(token)
        piece = raw.decode("utf-8", "replace") if logprob is not None else None
        text, thinking = output.feed(raw)
        self._post(job, TokenEvent(text, token, logprob, top, piece, thinking))
        if output.stopped:
            self.finish(slot, "stop")
        elif slot.count >= slot.limit:
            self.finish(slot, "length")
        elif output.over_budget():
            self._close_thinking(slot, token)
        else:
            slot.pending = [token]
            return token
        return None

    def _close_thinking(self, slot: Slot, token: int) -> None:
        """The thinking budget is spent after `token`: the section's closing markup
        (`Thinking.closing`: `</think>` and a blank line, say) is the output's next tokens, sent and
        accepted like sampled ones, and the model answers after them; where `max_tokens` leaves no
        room for them the output ends there."""
        assert slot.req and slot.req.thinking and slot.output and slot.job and slot.sampler
        tokens = self.vocabulary.markup(slot.req.thinking.closing)
        if len(tokens) >= slot.limit - slot.count:
            self.finish(slot, "length")
            return
        for forced in tokens:
            slot.sampler.accept(forced)
            text, thinking = slot.output.feed(self._token_bytes(forced))
            self._post(slot.job, TokenEvent(text, forced, thinking=thinking))
        slot.count += len(tokens)
        slot.pending = [token, *tokens]

    def finish(self, slot: Slot, reason: str | None, error: BaseException | None = None) -> None:
        job, output = slot.job, slot.output
        assert job is not None and output is not None
        if error is None and job.abort_error is None:
            if reason != "cancelled" and any(tail := output.finish()):
                self._post(job, TokenEvent(tail[0], -1, thinking=tail[1]))
            done_at = time.perf_counter()
            first = slot.first_at or done_at
            self._post(job, DoneEvent(
                finish_reason=reason or "stop", text=output.text, prompt_tokens=slot.prompt_tokens,
                prompt_eval_tokens=slot.prompt_eval, completion_tokens=slot.count,
                prompt_ms=(first - slot.started) * 1000, generation_ms=(done_at - first) * 1000,
                stop_sequence=output.stop_sequence, thinking=output.thinking, thinking_tokens=output.thinking_tokens,
                draft_tokens=spec.drafted if (spec := slot.speculation) else 0,
                draft_accepted=spec.accepted if spec else 0,
            ))
        else:
            self._post(job, Failed(job.abort_error or error or ShuttingDown("stopped")))
        # The KV holds exactly `cached` (the last sampled token was never decoded): the slot keeps
        # it for the conversation's next turn, and `_start` copies it out if another takes the slot.
        slot.pending = []
        if slot.speculation is not None:
            self.drafted += slot.speculation.drafted
            self.draft_accepted += slot.speculation.accepted
        if isinstance(slot.sampler, ChainSampler):
            slot.sampler.close()
        slot.job = slot.req = slot.sampler = slot.output = slot.media = slot.speculation = None  # the KV holds the images now
        slot.last_used = time.monotonic()


def logits_row(lib: Any, ctx: Any, index: int, n_vocab: int) -> np.ndarray:
    """A sequence's row of logits only: a view into llama.cpp's host output buffer, valid
    until the next decode, which may reallocate that buffer (so it is used within this
    step and never kept; sampling copies the row into its own candidates). It is host
    memory with any backend: `llama_get_logits_ith` first waits for the device's copy into
    it. `index` must be a batch position whose `logits` flag was set, or llama.cpp answers
    NULL, which numpy refuses (ValueError) rather than reading."""
    return np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(n_vocab,))


def cancelled(job: EngineJob) -> DoneEvent:
    """The end of a request cancelled before it started."""
    n = len(job.req.tokens)
    return DoneEvent("cancelled", "", n, 0, 0, 0.0, 0.0)
