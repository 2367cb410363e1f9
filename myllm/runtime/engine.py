"""One llama.cpp instance of one registered model, and the operations the APIs need.

The engine is synchronous and not thread-safe: a model's worker thread is its only caller
for generation. Tokenizing only reads the vocabulary and may be called from anywhere.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from myllm.errors import InvalidOptions, ModelLoadError, OutOfMemory, PromptTooLong
from myllm.registry.schema import ModelRow
from myllm.runtime.guard import UseGuard
from myllm.runtime.kvcache import KVCache, common_prefix
from myllm.runtime.options import GenerationOptions
from myllm.runtime.textstream import TextAssembler


CTX_PAD = 256


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


@dataclass(frozen=True)
class LoadSpec:
    """Everything that changes how a model is loaded. Requests with the same spec share one
    instance whatever their sampling options."""

    name: str
    path: Path
    n_ctx: int
    """Context per sequence."""
    n_gpu_layers: int = 0
    embedding: bool = False
    n_parallel: int = 1
    """Sequences generated at once (continuous batching when > 1)."""

    @classmethod
    def for_model(
        cls, row: ModelRow, num_ctx: int, n_gpu_layers: int = 0, embedding: bool = False, n_parallel: int = 1
    ) -> LoadSpec:
        """llama.cpp pads the context to a multiple of 256; asking for exactly that keeps its
        size and llama-cpp-python's token buffer the same."""
        ctx = -(-num_ctx // CTX_PAD) * CTX_PAD
        if row.context_length:
            ctx = min(ctx, row.context_length)
        return cls(row.name, Path(row.blob_path), ctx, n_gpu_layers, embedding, 1 if embedding else n_parallel)


@dataclass(frozen=True)
class Candidate:
    token_id: int
    text: str
    logprob: float

    @property
    def prob(self) -> float:
        return float(np.exp(self.logprob))


@dataclass(frozen=True)
class TokenEvent:
    """A piece of generated text. `text` may be "" when a token only completed part of a
    character or may start a stop string; such tokens still carry their probabilities."""

    text: str
    token_id: int
    logprob: float | None = None
    top: tuple[Candidate, ...] | None = None
    piece: str | None = None
    """The token's own text, present when probabilities were asked for."""


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str
    """`stop` (end of turn or a stop string), `length` (max_tokens or context), `cancelled`."""
    text: str
    prompt_tokens: int
    prompt_eval_tokens: int
    """Prompt tokens actually evaluated; fewer than `prompt_tokens` when a cached prefix was reused."""
    completion_tokens: int
    prompt_ms: float
    generation_ms: float


Event = TokenEvent | DoneEvent


@dataclass
class GenerationRequest:
    tokens: list[int]
    options: GenerationOptions
    extra_stop: tuple[str, ...] = ()
    grammar: str | None = None
    """GBNF the output must follow (see runtime/grammar.py)."""
    cancel: threading.Event = field(default_factory=threading.Event)


def top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """The k largest logits, best first. Partitioning the whole vocabulary costs ~0.5 ms a
    token (a tenth of a decode step here), so the k-th largest of every 64th logit serves as a
    threshold first: at least k logits reach it, and few more than 64 k do."""
    sample = logits[::64]
    if len(sample) > k:
        threshold = np.partition(sample, len(sample) - k)[len(sample) - k]
        near = np.flatnonzero(logits >= threshold) if np.isfinite(threshold) else np.arange(len(logits))
    else:
        near = np.arange(len(logits))
    if len(near) > k:
        near = near[np.argpartition(logits[near], len(near) - k)[len(near) - k :]]
    return near[np.argsort(-logits[near], kind="stable")]


def log_probabilities(
    logits: np.ndarray, token: int, k: int, piece: Callable[[int], str]
) -> tuple[float, tuple[Candidate, ...] | None]:
    """The chosen token's log-probability and the top k candidates of one row of logits
    (log-softmax over the whole row; no sort of the vocabulary)."""
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))
    chosen = float(logits[token]) - log_z
    if k == 0:
        return chosen, None
    return chosen, tuple(Candidate(int(i), piece(int(i)), float(logits[i]) - log_z) for i in top_k_indices(logits, k))


class LlamaEngine:
    def __init__(self, spec: LoadSpec, n_threads: int | None = None, kv_cache_bytes: int = 0) -> None:
        import llama_cpp

        self.spec = spec
        self.kv_cache = KVCache(kv_cache_bytes)
        if not spec.path.is_file():
            raise ModelLoadError(f"model file for '{spec.name}' is missing: {spec.path}")
        extra: dict[str, object] = {}
        if spec.embedding:
            batch = min(spec.n_ctx, 2048)
            extra = dict(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_batch=batch, n_ubatch=batch)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(spec.path),
                n_ctx=spec.n_ctx,
                n_threads=n_threads or default_threads(),
                n_gpu_layers=spec.n_gpu_layers,
                # The batch engine's context takes llama.cpp's default (auto: on where the backend
                # has it, as on CPU); this one must attend the same way, or answers with one
                # sequence differ from answers with several.
                flash_attn=True,
                verbose=False,
                **extra,
            )
        except MemoryError as exc:
            raise OutOfMemory(f"not enough memory to load '{spec.name}'") from exc
        except (ValueError, RuntimeError, OSError) as exc:
            if "context" in str(exc):
                # The weights loaded but the KV cache and buffers could not be allocated.
                raise OutOfMemory(f"llama.cpp could not allocate a context for '{spec.name}': {exc}") from exc
            raise ModelLoadError(f"llama.cpp could not load '{spec.name}': {exc}") from exc
        self._lib = llama_cpp
        self._n_ctx = min(int(self.llm.n_ctx()), len(self.llm.input_ids))
        self.decoded = 0
        """Tokens generated so far (for measuring cancellation)."""
        self._poisoned = False
        self._guard = UseGuard(spec.name)
        self._vocab = self.llm._model.vocab
        self.n_vocab = self.llm.n_vocab()
        self.bos_text = self._piece(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def tokenize(self, text: str) -> list[int]:
        """Special tokens in the text are parsed (chat templates write them as text); a BOS is
        added when the model wants one and the text does not already start with it."""
        add_bos = not (self.bos_text and text.startswith(self.bos_text))
        with self._guard.use():
            return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def count_tokens(self, text: str) -> int:
        """Tokens of a piece of text on its own (no BOS), e.g. one stored message."""
        with self._guard.use():
            return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _cached_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens are already in the context's KV; the last prompt token is
        always re-evaluated, because sampling needs its logits. A saved state that shares a
        longer prefix (a conversation coming back) is restored first, and what the context held
        is saved before this prompt overwrites it."""
        held = self.llm.input_ids[: self.llm.n_tokens].tolist()
        n = common_prefix(held, tokens)
        if n < len(held):
            self.kv_cache.save(self._lib, self.llm.ctx, held, 0)
        state, m = self.kv_cache.best(tokens)
        if state is not None and m > n + self.kv_cache.min_tokens and self.kv_cache.restore(self._lib, self.llm.ctx, state, 0):
            self.llm.input_ids[: len(state.tokens)] = state.tokens
            self.llm.n_tokens = len(state.tokens)
            self.llm._requires_eval = True  # no live logits for the restored tokens
            n = m
        return min(n, len(tokens) - 1)

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.n_ctx:
            raise PromptTooLong(n_prompt, self.n_ctx)

    def generate(self, req: GenerationRequest) -> Iterator[Event]:
        """Yields `TokenEvent`s, then one `DoneEvent`. Stops within one token of
        `req.cancel` being set."""
        with self._guard.use():
            yield from self._generate(req)

    def _generate(self, req: GenerationRequest) -> Iterator[Event]:
        tokens, opts = req.tokens, req.options
        if not tokens:
            raise InvalidOptions("the prompt is empty", field="prompt")
        self.check_fits(len(tokens))
        room = self.n_ctx - len(tokens)
        limit = min(opts.max_tokens or room, room)
        reused = self._cached_prefix(tokens)
        self.llm.set_seed(opts.seed if opts.seed is not None else random.randrange(2**32))
        assembler = TextAssembler(tuple(opts.stop) + req.extra_stop)
        started = time.perf_counter()
        first_at: float | None = None
        finish = "length"
        count = 0
        grammar = None
        if req.grammar:
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_string(req.grammar, verbose=False)
        stream = self.llm.generate(
            tokens,
            grammar=grammar,
            top_k=opts.top_k,
            top_p=opts.top_p,
            min_p=opts.min_p,
            temp=opts.temperature,
            repeat_penalty=opts.repeat_penalty,
            presence_penalty=opts.presence_penalty,
            frequency_penalty=opts.frequency_penalty,
        )
        try:
            for token in stream:
                if first_at is None:
                    first_at = time.perf_counter()
                if req.cancel.is_set():
                    finish = "cancelled"
                    break
                if self._lib.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                count += 1
                self.decoded += 1
                logprob, top = self._probabilities(token, req.options.logprobs)
                raw = self.llm.detokenize([token], special=True)
                piece = raw.decode("utf-8", "replace") if logprob is not None else None
                text = assembler.feed(raw)
                if assembler.stopped:
                    if text:
                        yield TokenEvent(text, token, logprob, top, piece)
                    finish = "stop"
                    break
                yield TokenEvent(text, token, logprob, top, piece)
                if count >= limit:
                    break
        finally:
            stream.close()
        if tail := assembler.finish():
            yield TokenEvent(tail, -1)
        done_at = time.perf_counter()
        first_at = first_at or done_at
        yield DoneEvent(
            finish_reason=finish,
            text=assembler.text,
            prompt_tokens=len(tokens),
            prompt_eval_tokens=len(tokens) - reused,
            completion_tokens=count,
            prompt_ms=(first_at - started) * 1000,
            generation_ms=(done_at - first_at) * 1000,
        )

    def _probabilities(self, token: int, k: int | None) -> tuple[float | None, tuple[Candidate, ...] | None]:
        """From the last position's logits only (one row). `logits_all` would compute every
        row and slow decode several-fold."""
        if k is None:
            return None, None
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))  # a view: valid until the next decode
        return log_probabilities(logits, token, k, self._piece)

    def detokenize(self, tokens: list[int]) -> str:
        """Text of token ids; ids outside the vocabulary are an error (llama.cpp would abort)."""
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise InvalidOptions(f"token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})", field="input")
        with self._guard.use():
            return self.llm.detokenize(tokens).decode("utf-8", "replace")

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """One mean-pooled, L2-normalised vector per input (a text or token ids), all in one call."""
        if not self.spec.embedding:
            raise ModelLoadError(f"'{self.spec.name}' was not loaded for embeddings")
        texts = [i if isinstance(i, str) else self.detokenize(i) for i in inputs]
        with self._guard.use():
            return self._embed(texts)

    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        limit = int(self.llm.n_batch)
        for i, text in enumerate(texts):
            n = len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if n == 0:  # nothing to pool over: llama.cpp would fail the whole batch
                raise InvalidOptions(f"input[{i}] is empty", field="input")
            if n > limit:
                raise PromptTooLong(n, limit)
        try:
            vectors, count = self.llm.embed(texts, normalize=True, truncate=False, return_count=True)
        except RuntimeError as exc:
            # llama-cpp-python leaves its batch unusable after a failed decode; freeing it
            # later aborts the process, so this instance is retired without freeing it.
            self._poisoned = True
            raise ModelLoadError(f"llama.cpp failed to embed with '{self.spec.name}': {exc}") from exc
        return [list(map(float, v)) for v in vectors], int(count)

    def close(self) -> None:
        """Free the model once no thread is using it; later calls raise `ModelNotLoaded`."""
        self._guard.close()
        if not self._poisoned:
            self.llm.close()
