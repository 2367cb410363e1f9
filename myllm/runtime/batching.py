"""Continuous batching: several requests share one llama.cpp context, one `llama_decode` per
step for all of them.

Each active request owns a sequence id (a *slot*). Every step the scheduler thread puts into one
batch the next prompt chunk or the last sampled token of every active slot, decodes once, then
samples each slot from its own row of logits with its own sampler chain. Requests join and leave
between steps. A finished slot keeps its KV, so a request whose prompt extends what a free slot
holds (the next turn of a chat) evaluates only the new tokens; with more conversations than
slots, a slot's KV is copied out to the engine's bounded RAM cache (runtime/kvcache.py) when
another conversation takes the slot, and copied back in when its conversation returns.

The engine is also its own worker: `submit_generation()` returns the same async event stream as
`ModelWorker` does, so callers do not know whether a model is batched.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from myllm.errors import ModelLoadError, OutOfMemory, PromptTooLong, ShuttingDown
from myllm.runtime.engine import (
    Candidate,
    DoneEvent,
    GenerationRequest,
    LoadSpec,
    TokenEvent,
    default_threads,
    log_probabilities,
)
from myllm.runtime.guard import UseGuard
from myllm.runtime.kvcache import KVCache, common_prefix
from myllm.runtime.sampling import GreedySampler
from myllm.runtime.textstream import TextAssembler
from myllm.runtime.worker import _END, Job, JobStream, _Failure, check_admission

log = logging.getLogger(__name__)
N_BATCH = 512
PENALTY_WINDOW = 64


@dataclass
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)
    """Tokens whose KV this sequence holds."""
    job: Job[Any] | None = None
    req: GenerationRequest | None = None
    pending: list[int] = field(default_factory=list)
    """Prompt tokens still to evaluate; then the one sampled token to feed back."""
    sampler: Any = None
    assembler: TextAssembler | None = None
    limit: int = 0
    count: int = 0
    prompt_tokens: int = 0
    prompt_eval: int = 0
    started: float = 0.0
    first_at: float | None = None
    batch_index: int | None = None
    in_batch: int = 0
    last_used: float = 0.0


def _deliver(items: list[tuple[Job[Any], Any]]) -> None:
    for job, item in items:
        job.events.put_nowait(item)


class BatchEngine:
    def __init__(self, spec: LoadSpec, n_threads: int | None, kv_cache_bytes: int, n_parallel: int, max_queue: int) -> None:
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._utils import suppress_stdout_stderr

        self.spec = spec
        self._lib = llama_cpp
        self.n_parallel = n_parallel
        self.max_queue = max_queue
        self.kv_cache = KVCache(kv_cache_bytes)
        if not spec.path.is_file():
            raise ModelLoadError(f"model file for '{spec.name}' is missing: {spec.path}")
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = spec.n_gpu_layers
        try:
            with suppress_stdout_stderr(disable=False):
                self.model = internals.LlamaModel(path_model=str(spec.path), params=model_params, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load '{spec.name}': {exc}") from exc
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = spec.n_ctx * n_parallel
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = n_parallel
        params.n_threads = params.n_threads_batch = n_threads or default_threads()
        params.kv_unified = False  # each sequence its own n_ctx cells: faster when prompts differ
        params.swa_full = True  # keep sliding-window models' KV whole, so prefixes can be reused
        try:
            with suppress_stdout_stderr(disable=False):
                self.ctx = internals.LlamaContext(model=self.model, params=params, verbose=False)
        except ValueError as exc:
            self.model.close()
            raise OutOfMemory(f"llama.cpp could not allocate a context for '{spec.name}': {exc}") from exc
        self.batch = internals.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1, verbose=False)
        self._vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        bos = self.model.token_bos()
        self.bos_text = self._piece(bos) if bos >= 0 else ""
        self._n_ctx = spec.n_ctx
        self.decoded = 0
        """Tokens decoded so far, all sequences together (for measuring cancellation)."""
        self._slots = [_Slot(seq=i) for i in range(n_parallel)]
        self._queue: queue.Queue[Job[Any] | None] = queue.Queue()
        self._waiting: list[Job[Any]] = []
        self._outbox: list[tuple[Job[Any], Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._guard = UseGuard(spec.name)
        self._thread = threading.Thread(target=self._run, name=f"batch-{spec.name}", daemon=True)
        self._thread.start()

    # -- what the service needs ---------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def worker(self) -> BatchEngine:
        return self

    def _bytes(self, token: int) -> bytes:
        return self.model.detokenize([token], special=True)

    def _piece(self, token: int) -> str:
        return self._bytes(token).decode("utf-8", "replace")

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        with self._guard.use():
            return list(self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def tokenize(self, text: str) -> list[int]:
        return self._tokenize(text, add_bos=not (self.bos_text and text.startswith(self.bos_text)))

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text, add_bos=False))

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.n_ctx:
            raise PromptTooLong(n_prompt, self.n_ctx)

    # -- the worker side --------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._waiting) + self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self.queued > 0 or any(s.job is not None for s in self._slots)

    def submit_generation(self, req: GenerationRequest) -> JobStream[Any]:
        with self._lock:
            free = sum(1 for slot in self._slots if slot.job is None)
            # Waiting: not yet admitted, beyond the free slots.
            check_admission(self._closed, max(0, self.queued - free), self.max_queue)
            job: Job[Any] = Job(None, asyncio.get_running_loop(), payload=req)
            self._queue.put(job)
        return JobStream(job)

    def abort(self, error: BaseException) -> None:
        """Fail every running and waiting request with `error` (within one step)."""
        with self._lock:
            jobs = [s.job for s in self._slots if s.job is not None] + list(self._waiting)
            while True:
                try:
                    extra = self._queue.get_nowait()
                except queue.Empty:
                    break
                if extra is not None:
                    jobs.append(extra)
                    self._waiting.append(extra)
        for job in jobs:
            job.abort_error = error
            job.cancel.set()
        self._queue.put(None)  # wake the scheduler

    def close(self, timeout: float | None = None) -> None:
        """Stop the scheduler (queued and running requests fail), then free llama.cpp's
        objects once no thread is tokenizing."""
        if self._closed:
            return
        self.abort(ShuttingDown("the model was unloaded"))
        with self._lock:
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        self._guard.close()
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):
            self.batch.close()
            self.ctx.close()
            self.model.close()

    # -- the scheduler thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not any(s.job is not None for s in self._slots) and not self._waiting
            try:
                job = self._queue.get(timeout=None if idle and not self._closed else 0)
                while True:
                    if job is not None:
                        with self._lock:
                            self._waiting.append(job)
                    job = self._queue.get_nowait()
            except queue.Empty:
                pass
            if self._closed and not any(s.job is not None for s in self._slots):
                self._flush()
                for job in self._waiting:
                    job.push(_Failure(job.abort_error or ShuttingDown("the model was unloaded")))
                self._waiting.clear()
                return
            self._admit()
            try:
                self._step()
            except Exception as exc:  # a failed decode fails the requests in it, not the daemon
                log.exception("batch step failed")
                for slot in self._slots:
                    if slot.job is not None:
                        self._finish(slot, None, ModelLoadError(f"llama.cpp failed while generating: {exc}"))
            self._flush()

    def _post(self, job: Job[Any], item: Any) -> None:
        """Queue an event for its caller; `_flush` hands a whole step's events to the event
        loop in one wake-up instead of one per token per sequence."""
        self._outbox.append((job, item))

    def _flush(self) -> None:
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job[Any], Any]]] = {}
        for job, item in items:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                for job, _ in batch:
                    job.cancel.set()

    def _admit(self) -> None:
        while self._waiting:
            job = self._waiting[0]
            if job.cancel.is_set():
                self._waiting.pop(0)
                job.push(_Failure(job.abort_error) if job.abort_error else _END)
                continue
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            self._waiting.pop(0)
            self._start(job, free)

    def _start(self, job: Job[Any], free: list[_Slot]) -> None:
        req: GenerationRequest = job.payload
        tokens = req.tokens
        slot = max(free, key=lambda s: (common_prefix(s.cached, tokens), -s.last_used))
        keep = common_prefix(slot.cached, tokens)
        if keep < len(slot.cached):  # this request overwrites another conversation's KV: keep a copy
            self.kv_cache.save(self._lib, self.ctx.ctx, slot.cached, slot.seq)
        state, cached = self.kv_cache.best(tokens)
        if state is not None and cached > keep + self.kv_cache.min_tokens:
            if self.kv_cache.restore(self._lib, self.ctx.ctx, state, slot.seq):
                slot.cached, keep = list(state.tokens), cached
        keep = min(keep, len(tokens) - 1)
        self.ctx.kv_cache_seq_rm(slot.seq, keep, -1)
        slot.cached = list(tokens[:keep])
        slot.pending = list(tokens[keep:])
        slot.job, slot.req = job, req
        slot.sampler = self._sampler(req)
        slot.assembler = TextAssembler(tuple(req.options.stop) + req.extra_stop)
        room = self.n_ctx - len(tokens)
        slot.limit = min(req.options.max_tokens or room, room)
        slot.count = 0
        slot.prompt_tokens, slot.prompt_eval = len(tokens), len(slot.pending)
        slot.started, slot.first_at = time.perf_counter(), None

    def _sampler(self, req: GenerationRequest) -> Any:
        import random

        from llama_cpp import LlamaGrammar
        from llama_cpp import _internals as internals

        o = req.options
        if o.temperature == 0 and not req.grammar:
            return GreedySampler(PENALTY_WINDOW, o.repeat_penalty, o.frequency_penalty, o.presence_penalty)
        sampler = internals.LlamaSampler()
        sampler.add_penalties(self.n_vocab, PENALTY_WINDOW, o.repeat_penalty, o.frequency_penalty, o.presence_penalty)
        if req.grammar:
            sampler.add_grammar(self.model, LlamaGrammar.from_string(req.grammar, verbose=False))
        if o.temperature == 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(o.top_k)
            sampler.add_top_p(o.top_p, 1)
            sampler.add_min_p(o.min_p, 1)
            sampler.add_temp(o.temperature)
            sampler.add_dist(o.seed if o.seed is not None else random.randrange(2**32))
        return sampler

    def _step(self) -> None:
        for slot in self._slots:
            if slot.job is not None and slot.job.cancel.is_set():
                self._finish(slot, "cancelled")
        active = [s for s in self._slots if s.job is not None]
        if not active:
            return
        batch = self.batch.batch
        batch.n_tokens = 0
        budget = N_BATCH
        # Sampled tokens first (one each), then prompt chunks with what is left.
        for slot in sorted(active, key=lambda s: len(s.pending) > 1):
            take = slot.pending[: max(0, budget)]
            slot.batch_index, slot.in_batch = None, len(take)
            for i, token in enumerate(take):
                j = batch.n_tokens
                batch.token[j] = token
                batch.pos[j] = len(slot.cached) + i
                batch.seq_id[j][0] = slot.seq
                batch.n_seq_id[j] = 1
                batch.logits[j] = False
                batch.n_tokens += 1
            budget -= len(take)
            if take and len(take) == len(slot.pending):
                batch.logits[batch.n_tokens - 1] = True
                slot.batch_index = batch.n_tokens - 1
        if batch.n_tokens == 0:
            return
        self.ctx.decode(self.batch)
        self.decoded += batch.n_tokens
        for slot in active:
            if slot.in_batch:
                slot.cached.extend(slot.pending[: slot.in_batch])
                slot.pending = slot.pending[slot.in_batch :]
            if slot.batch_index is not None:
                self._sample(slot)

    def _sample(self, slot: _Slot) -> None:
        req, job, assembler = slot.req, slot.job, slot.assembler
        assert req is not None and job is not None and assembler is not None and slot.batch_index is not None
        if slot.first_at is None:
            slot.first_at = time.perf_counter()
        greedy = isinstance(slot.sampler, GreedySampler)
        logits = self._logits(slot.batch_index) if req.options.logprobs is not None or greedy else None
        if greedy:
            token = slot.sampler.sample(logits)
        else:
            token = slot.sampler.sample(self.ctx, slot.batch_index)  # llama_sampler_sample also accepts it
        logprob, top = self._score(logits, token, req.options.logprobs)
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        slot.count += 1
        raw = self._bytes(token)
        piece = raw.decode("utf-8", "replace") if logprob is not None else None
        text = assembler.feed(raw)
        self._post(job, TokenEvent(text, token, logprob, top, piece))
        if assembler.stopped:
            self._finish(slot, "stop")
        elif slot.count >= slot.limit:
            self._finish(slot, "length")
        else:
            slot.pending = [token]

    def _logits(self, index: int) -> np.ndarray:
        """This slot's row of logits only: a view, valid until the next decode (sampling
        copies the row into its own candidates, leaving it as it is)."""
        ptr = self._lib.llama_get_logits_ith(self.ctx.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _score(
        self, logits: np.ndarray | None, token: int, k: int | None
    ) -> tuple[float | None, tuple[Candidate, ...] | None]:
        if logits is None or k is None:
            return None, None
        return log_probabilities(logits, token, k, self._piece)

    def _finish(self, slot: _Slot, reason: str | None, error: BaseException | None = None) -> None:
        job, assembler = slot.job, slot.assembler
        assert job is not None and assembler is not None
        if error is None and job.abort_error is None:
            if reason != "cancelled" and (tail := assembler.finish()):
                self._post(job, TokenEvent(tail, -1))
            done_at = time.perf_counter()
            first = slot.first_at or done_at
            self._post(job, DoneEvent(
                finish_reason=reason or "stop", text=assembler.text, prompt_tokens=slot.prompt_tokens,
                prompt_eval_tokens=slot.prompt_eval, completion_tokens=slot.count,
                prompt_ms=(first - slot.started) * 1000, generation_ms=(done_at - first) * 1000,
            ))
            self._post(job, _END)
        else:
            self._post(job, _Failure(job.abort_error or error or ShuttingDown("stopped")))
        # The KV holds exactly `cached` (the last sampled token was never decoded): the slot keeps
        # it for the conversation's next turn, and `_start` copies it out if another takes the slot.
        slot.pending = []
        slot.job = slot.req = slot.sampler = slot.assembler = None
        slot.last_used = time.monotonic()
