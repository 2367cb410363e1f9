"""The generation engine: continuous batching, several requests in one llama.cpp context, one
`llama_decode` per step for all of them (`n_parallel=1` is the single-sequence case).

Each active request owns a sequence id (a *slot*). Every step the scheduler thread puts into one
batch the next prompt chunk or the last sampled token of every active slot, decodes once, then
samples each slot from its own row of logits with its own sampler chain. Requests join and leave
between steps. A finished slot keeps its KV, so a request whose prompt extends what a free slot
holds (the next turn of a chat) evaluates only the new tokens; with more conversations than
slots, a slot's KV is copied out to the engine's bounded RAM cache (runtime/engine/kvcache.py) when
another conversation takes the slot, and copied back in when its conversation returns.

The engine knows nothing of processes or event loops: `submit()` takes a *sink*, a function that
receives a whole step's events at once. A runner process (runtime/runner/) writes them to its
channel in one message per step; `OptimizedLLM` puts them on a queue it reads in-process.

This module is the scheduler. Loading llama.cpp's model and context is `loaded_model.py`'s job,
tokens and text `vocabulary.py`'s, what each sequence's decoded rows become `slots.py`'s, and each
request's sampler comes from `sampler_factory.py`.

With layers on a GPU the weights, the KV cache and the compute buffers live in device memory,
which this process must never read or write by pointer. What the engine touches is host memory
that llama.cpp owns and keeps coherent: the `llama_batch` arrays (malloc'd, read by llama.cpp
before `llama_decode` returns), the logits rows (`logits_row`: llama.cpp copies them from the
device into its host output buffer at every decode, and `llama_get_logits_ith` waits for that
copy before returning a pointer into it), and KV states (`kvcache.py`: llama.cpp copies them
between the device and a buffer of ours inside `llama_state_seq_get_data`/`_set_data`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from myllm.errors import InvalidOptions, ModelLoadError, MyLLMError, OutOfMemory, ShuttingDown
from myllm.runtime.engine.adapters import Adapters
from myllm.runtime.engine.draft_model import DraftModels
from myllm.runtime.engine.kvcache import NO_MATCH, KVCache, common_prefix
from myllm.runtime.engine.lifetime import UseGuard
from myllm.runtime.engine.loaded_model import N_BATCH, LoadedModel, output_rows
from myllm.runtime.engine.media import evaluate_images, media_prompt
from myllm.runtime.engine.microbatch import SPLIT_COST, CpuAttention, contiguous, measure_cliff
from myllm.runtime.engine.sampler_factory import SamplerFactory
from myllm.runtime.engine.slots import EngineJob, Outbox, Sink, Slot, SlotOutput, cancelled
from myllm.runtime.engine.speculative import PromptLookup, Speculation
from myllm.runtime.engine.thinking import OutputText
from myllm.runtime.engine.vocabulary import Vocabulary
from myllm.runtime.engine_types import (
    AdapterSet,
    Failed,
    GenerationRequest,
    LoadSpec,
    check_prompt,
)

log = logging.getLogger(__name__)


def decode_error(status: int) -> MyLLMError:
    """The error of a `llama_decode` that returned `status`: -2 is llama.cpp failing to allocate
    the step's compute buffers (out of memory, on the GPU or in RAM), which the daemon answers
    in each API's out-of-memory shape and, with layers on a GPU, by loading the model again
    with fewer of them; anything else is a failed generation."""
    if status == -2:
        return OutOfMemory("llama.cpp ran out of memory while generating (it could not allocate its compute buffers)")
    return ModelLoadError(f"llama.cpp failed while generating (llama_decode returned {status})")


COPY_COST = 1 / 64
"""Copying one token's KV between RAM and a sequence, in evaluations of one token: well under
1/500 on a CPU, about 1/30 through PCIe to a GPU. `place` weighs copies with it."""

class BatchEngine:
    def __init__(self, spec: LoadSpec, n_threads: int | None, kv_cache_bytes: int, quiet: bool = True,
                 attention_cliff: float | None = None) -> None:
        """`quiet` silences what llama.cpp prints to stdout and stderr while loading. A runner
        keeps it: its stderr is the daemon's record of why llama.cpp aborted. `attention_cliff`:
        an earlier load's `measure_cliff` of this model, used instead of measuring again.

        The model and its context are made, used for every decode and freed by one thread, the
        scheduler's, as llama-server and llama-cpp-python's `Llama` do (tokenizing, which reads
        only the vocabulary, runs on callers' threads there too). A GPU backend keeps state per
        thread (CUDA's current device and context): an H100 run of an earlier version, which
        loaded on one thread and decoded on another, died with SIGSEGV on its first request
        with every layer offloaded, while both of those ran. That this was the cause is a
        hypothesis no GPU has confirmed yet; the same code with every layer on a device whose
        memory is in another process (ggml's RPC backend) generates exactly as on the CPU."""
        if not spec.path.is_file():
            raise ModelLoadError(f"the model file of '{spec.name}' is missing (blob {spec.path.name}); pull it again")
        self.spec = spec
        self.n_parallel = spec.n_parallel
        self._kv_cache_bytes = kv_cache_bytes
        self._n_ctx = spec.n_ctx
        self.decoded = 0
        """Tokens decoded so far, all sequences together (for measuring cancellation)."""
        self._slots = [Slot(seq=i) for i in range(spec.n_parallel)]
        self._queue: queue.Queue[EngineJob | None] = queue.Queue()
        self._waiting: list[EngineJob] = []
        self._outbox = Outbox(spec.stream_interval)
        self._post = self._outbox.post  # called for every token: bound once
        self._lock = threading.Lock()
        self._closed = False
        self.beat = time.monotonic()
        """When the scheduler last went round its loop (see `health`)."""
        self._guard = UseGuard(spec.name)
        self._given_cliff = attention_cliff
        self.attention_cliff: float | None = None
        """The CPU's per-row attention cost against the tiled one, as measured (or given) at load;
        None when attention does not run on the CPU with flash attention."""
        loaded = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, args=(n_threads, quiet, loaded, failed),
                                        name=f"batch-{spec.name}", daemon=True)
        self._thread.start()
        loaded.wait()
        if failed:
            self._thread.join()
            raise failed[0]

    def _main(self, n_threads: int | None, quiet: bool, loaded: threading.Event, failed: list[BaseException]) -> None:
        """The scheduler thread: load, serve until closed, free."""
        try:
            self._load(n_threads, quiet)
        except BaseException as exc:  # the constructor raises it
            failed.append(exc)
            return
        finally:
            loaded.set()
        try:
            self._run()
        finally:
            if self._closed:  # close(): free once no thread is tokenizing
                self._guard.close()
                if self.draft_models is not None:
                    self.draft_models.close()
                self._loaded.close()

    def _load(self, n_threads: int | None, quiet: bool) -> None:
        self._loaded = loaded = LoadedModel.load(self.spec, n_threads, quiet)
        try:
            self.draft_models = None if self.spec.draft is None else DraftModels.load(self.spec, loaded.model, n_threads,
                                                                                      quiet)
        except BaseException:
            loaded.close()
            raise
        self.vocabulary = vocabulary = Vocabulary(loaded.model, self._guard, self.n_ctx)
        self.samplers = SamplerFactory(loaded.lib, vocabulary, self._guard, self.spec.grammar_seconds)
        lib, model = loaded.lib, loaded.model.model
        self.kv_cache = KVCache(self._kv_cache_bytes, n_swa=lib.llama_model_n_swa(model))
        def cliff() -> float:  # asked only where attention runs on the CPU
            given = self._given_cliff
            self.attention_cliff = given if given is not None else measure_cliff(lib, loaded.ctx, loaded.batch)
            return self.attention_cliff

        self.attention = CpuAttention.on_cpu(lib, model, self.spec.n_gpu_layers, self.spec.flash_attention,
                                             cliff)  # None on a GPU
        # What the step loop uses for every token, kept on the engine: one attribute each.
        self._lib, self.ctx, self.batch, self.projector = loaded.lib, loaded.ctx, loaded.batch, loaded.projector
        self._vocab, self.n_vocab = vocabulary.pointer, vocabulary.n_vocab
        self.output = SlotOutput(loaded.lib, loaded.ctx.ctx, vocabulary, self._post, self.spec.grammar_seconds)
        self.adapters = Adapters(lib, model, loaded.ctx.ctx)

    # -- what a runner needs besides generation -----------------------------------------------

    @property
    def n_ctx(self) -> int:
        """Context per sequence."""
        return self._n_ctx

    def tokenize(self, text: str) -> list[int]:
        """See `Vocabulary.tokenize`."""
        return self.vocabulary.tokenize(text)

    def tokenize_units(self, units: list[list[tuple[str, bool]]], limit: int) -> list[list[int] | None]:
        """See `Vocabulary.tokenize_units`."""
        return self.vocabulary.tokenize_units(units, limit)

    def count_tokens(self, text: str) -> int:
        """See `Vocabulary.count_tokens`."""
        return self.vocabulary.count_tokens(text)

    def detokenize(self, tokens: list[int]) -> str:
        """See `Vocabulary.detokenize`."""
        return self.vocabulary.detokenize(tokens)

    def check_grammar(self, grammar: str) -> None:
        """See `SamplerFactory.check_grammar`."""
        self.samplers.check_grammar(grammar)

    # -- requests ---------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or self._queue.qsize() > 0 or any(s.job is not None for s in self._slots)

    def submit(self, req: GenerationRequest, sink: Sink, tag: Any = None) -> EngineJob:
        """Queue a request; its events go to `sink` until its `DoneEvent` or `Failed`. Set the
        job's `cancel` to stop it within one step (it then ends with a "cancelled" DoneEvent)."""
        check_prompt(req.tokens, self.n_ctx)
        job = EngineJob(req, sink, tag)
        with self._lock:
            if self._closed:
                raise ShuttingDown("the model is being unloaded")
            self._queue.put(job)
        return job

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
        """Stop the scheduler (queued and running requests fail); its thread then frees
        llama.cpp's objects once no thread is tokenizing. A runner process does not need this
        (its exit frees everything); in-process users do."""
        if self._closed:
            return
        self.abort(ShuttingDown("the model was unloaded"))
        with self._lock:
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the scheduler thread ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Whether the scheduler thread lives, and for how long it has been busy without going
        round its loop (a step that never returns: 0 while idle)."""
        stalled = time.monotonic() - self.beat if self.busy else 0.0
        return {"scheduler": self._thread.is_alive(), "stalled": stalled}

    def _run(self) -> None:
        while True:
            self.beat = time.monotonic()
            idle = not any(s.job is not None for s in self._slots) and not self._waiting
            if idle:
                self._outbox.flush()  # nothing is left to wait for
            try:
                job = self._queue.get(timeout=None if idle and not self._closed else 0)
                while True:
                    if job is not None:
                        with self._lock:
                            self._waiting.append(job)
                    job = self._queue.get_nowait()
            except queue.Empty:
                pass
            self.beat = time.monotonic()  # woken: a wait for work is not a stall
            if self._closed and not any(s.job is not None for s in self._slots):
                self._outbox.flush()
                for job in self._waiting:
                    self._post(job, Failed(job.abort_error or ShuttingDown("the model was unloaded")))
                self._waiting.clear()
                self._outbox.flush()
                return
            self._admit()
            try:
                self._step()
            except Exception as exc:  # a failed decode fails the requests in it, not the daemon
                log.exception("batch step failed")
                error = exc if isinstance(exc, MyLLMError) else ModelLoadError(f"llama.cpp failed while generating: {exc}")
                for slot in self._slots:
                    if slot.job is not None:
                        self.output.finish(slot, None, error)
            self._outbox.flush(due=True)

    def _admit(self) -> None:
        while self._waiting:
            job = self._waiting[0]
            if job.cancel.is_set():
                self._waiting.pop(0)
                self._post(job, Failed(job.abort_error) if job.abort_error else cancelled(job))
                continue
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            self._waiting.pop(0)
            try:
                self._start(job, free)
            except Exception as exc:  # e.g. a grammar llama.cpp refuses: this request fails, not the loop
                log.warning("could not start a request: %s", exc)
                self._post(job, Failed(exc if isinstance(exc, MyLLMError) else InvalidOptions(f"could not start: {exc}")))

    def _start(self, job: EngineJob, free: list[Slot]) -> None:
        req = job.req
        self.adapters.load(req.adapters)
        media = media_prompt(self.projector, req, self.n_ctx)
        tokens = req.tokens if media is None else media.tokens
        busy = {s.seq for s in self._slots if s.job is not None}
        slot, keep = place(self.kv_cache, self._lib, self.ctx.ctx, tokens, free, busy, req.adapters)
        keep = min(keep, len(tokens) - 1)
        padded = keep if self.attention is None else self.attention.start(keep, len(tokens))
        keep = padded if media is None else media.start(keep, padded)
        self.ctx.kv_cache_seq_rm(slot.seq, keep, -1)
        slot.media, slot.adapters = media, req.adapters
        slot.cached = list(tokens[:keep])
        slot.pending = list(tokens[keep:])
        slot.sampler = self.samplers.for_request(req)
        # A model with a draft model speculates unless told not to; prompt lookup only when asked.
        asked = req.options.draft_max
        n_draft = min(self.spec.draft_max if asked is None and self.draft_models else asked or 0, self.spec.draft_max)
        drafter = PromptLookup() if self.draft_models is None else self.draft_models.drafter(slot.seq)
        slot.speculation = Speculation(drafter, n_draft) if n_draft and media is None else None
        slot.job, slot.req = job, req
        slot.output = OutputText(tuple(req.options.stop) + req.extra_stop, req.thinking)
        room = self.n_ctx - len(tokens)
        slot.limit = min(req.options.max_tokens or room, room)
        slot.count = 0
        slot.prompt_tokens, slot.prompt_eval = len(tokens), len(slot.pending)
        slot.started, slot.first_at = time.perf_counter(), None

    def _step(self) -> None:
        for slot in self._slots:
            if slot.job is not None and slot.job.cancel.is_set():
                self.output.finish(slot, "cancelled")
        active = [s for s in self._slots if s.job is not None]
        if not active:
            return
        active = self.adapters.group(active)
        evaluate_images(self.ctx.ctx, active)  # each its own decode, before the step's text
        batch = self.batch.batch
        batch.n_tokens = 0
        budget = N_BATCH
        rows = output_rows(self.spec) - len(active)  # logits rows left for drafts
        # Sampled tokens first (one each, and its draft), then prompt chunks with what is left: on a
        # CPU one chunk a step, which no other splits into pieces too short for a tile (microbatch.py).
        chunked = False
        if self.draft_models is not None:  # every slot's draft in the same draft decodes
            self.draft_models.prepare(active, rows, budget)
        for slot in sorted(active, key=lambda s: len(s.pending) > 1):
            slot.draft = self._draft(slot, min(rows, budget - 1)) if len(slot.pending) == 1 else []
            rows -= len(slot.draft)
            pending = slot.pending if slot.media is None else slot.media.text_ahead(slot.pending, len(slot.cached))
            if len(pending) > 1 and self.attention is not None and not slot.draft:
                if chunked:
                    slot.batch_index, slot.in_batch = None, 0
                    continue
                chunked, take = True, pending[: self.attention.take(len(pending), budget)]
            else:
                take = pending[: max(0, budget)]
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
                slot.batch_index = batch.n_tokens - 1 - len(slot.draft)
                for j in range(slot.batch_index, batch.n_tokens):
                    batch.logits[j] = True
        if batch.n_tokens == 0:
            return
        status = self._lib.llama_decode(self.ctx.ctx, batch)
        if status != 0:
            raise decode_error(status)
        self.decoded += batch.n_tokens
        for slot in active:
            if slot.in_batch:
                slot.cached.extend(slot.pending[: slot.in_batch])
                slot.pending = slot.pending[slot.in_batch :]
            if slot.batch_index is not None:
                try:
                    self._sample(slot)
                except Exception as exc:  # one sequence's sampling failed: that request, not the batch
                    log.exception("sampling failed")
                    if slot.job is not None:
                        error = exc if isinstance(exc, MyLLMError) else ModelLoadError(f"sampling failed: {exc}")
                        self.output.finish(slot, None, error)

    def _draft(self, slot: Slot, room: int) -> list[int]:
        """A decoding slot's draft for this step, appended to its pending token: never more than
        `room` (the step's rows and batch) nor past `max_tokens` or the context (every drafted
        token accepted, and the pick after them, must still be allowed)."""
        if slot.speculation is None:
            return []
        draft = slot.speculation.draft(slot.cached + slot.pending, min(room, slot.limit - slot.count - 1))
        slot.pending += draft
        return draft

    def _sample(self, slot: Slot) -> None:
        """After the decode: the slot's sampled token (slots.py's `SlotOutput`)."""
        self.output.sample(slot)


def place(cache: KVCache, lib: Any, ctx: Any, tokens: list[int], free: list[Slot],
          busy: set[int], adapters: AdapterSet = ()) -> tuple[Slot, int]:
    """The free slot a prompt goes to and how many of its tokens are in that slot's KV when
    it starts: the choice that costs least, counting tokens to evaluate and KV to copy
    (`COPY_COST`). A slot's own KV serves a prompt that shares its prefix; the RAM cache's
    stored prefix can be copied into any slot. Taking a slot that holds another
    conversation costs copying that one out and, when it returns, back in; so the agents
    behind one shared system prompt spread over the slots instead of taking turns in one. A slot
    that leaves the `busy` sequences no longer one consecutive run costs `SPLIT_COST` more.
    KV computed with other LoRA `adapters` than the prompt's serves nothing; the RAM cache holds
    only KV of the base model (engine/adapters.py)."""
    stored = NO_MATCH if adapters else cache.match(tokens)
    n = len(tokens)

    def extra(slot: Slot, keep: int) -> float:
        copies = 0.0 if keep >= len(slot.cached) else 2 * len(slot.cached) * COPY_COST
        return copies + (0.0 if contiguous(busy | {slot.seq}) else SPLIT_COST)

    own = {slot.seq: common_prefix(slot.cached, tokens) if slot.adapters == adapters else 0 for slot in free}
    options = [(n - own[s.seq] + extra(s, own[s.seq]), s.last_used, s.seq, False, s) for s in free]
    if stored.length:
        options += [(n - stored.length + stored.length * COPY_COST + extra(s, 0), s.last_used, s.seq, True, s)
                    for s in free]
    *_, restore, slot = min(options)
    keep = own[slot.seq]
    if (keep < len(slot.cached) or restore) and not slot.adapters:  # another conversation's KV is about to go
        cache.save(lib, ctx, slot.cached, slot.seq)
    if restore and (stored := cache.match(tokens)).length:  # found again: saving may have cut its spans
        if cache.restore(lib, ctx, stored, slot.seq):
            return slot, stored.length
        slot.cached, keep = [], 0  # llama.cpp refused it and the sequence is empty
    return slot, keep
