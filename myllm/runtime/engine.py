"""What the engines share: how a model is loaded (`LoadSpec`), what a request is and what it
produces (events), token probabilities; and the embedding engine.

Generation runs in the batch engine (runtime/batching.py), inside a runner process per loaded
model (runtime/runner/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from myllm.errors import InvalidOptions, ModelLoadError, OutOfMemory, PromptTooLong
from myllm.registry.schema import ModelRow
from myllm.runtime.guard import UseGuard
from myllm.runtime.options import GenerationOptions


CTX_PAD = 256
"""llama.cpp pads a context to a multiple of this."""


def context_size(num_ctx: int) -> int:
    """The context a model is loaded with for `num_ctx`: rounded up to the next of 256, 512,
    768, 1024, 1536, 2048, 3072, 4096, 6144... (a power of two, or one and a half times one,
    each a multiple of llama.cpp's padding). Requests asking for nearby sizes share one
    instance, so a key cycling `num_ctx` one padding step at a time cannot load a runner per
    value (two sizes per doubling remain), at the cost of at most half again the KV asked for."""
    if num_ctx <= CTX_PAD:
        return CTX_PAD
    power = 1 << (num_ctx - 1).bit_length()
    between = power * 3 // 4
    return between if num_ctx <= between and between % CTX_PAD == 0 else power


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def _cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (Sapphire Rapids and later), from the kernel's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:  # not Linux: no such file, and no AMX build of ggml to worry about
        return False


def avoid_broken_weight_buffers() -> None:
    """Make llama.cpp keep weights in plain CPU buffers on CPUs with AMX.

    A llama.cpp built for the machine it runs on (the default, -march=native) puts quantized
    weights in its AMX buffer type on such CPUs, and the vendored llama.cpp's AMX matrix product
    segfaults on any prompt of more than a few tokens (`ggml_backend_amx_mul_mat`, seen with
    llama-cpp-python 0.3.36's own `Llama` too). `use_extra_bufts = False` (llama-server's
    `--no-repack`) avoids it. `Llama` builds its parameters from llama.cpp's defaults, so the
    defaults themselves are changed, once per process, for every engine.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    if getattr(lib.llama_model_default_params, "myllm_plain_buffers", False) or not _cpu_has_amx():
        return
    original = lib.llama_model_default_params

    def plain_buffers() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    plain_buffers.myllm_plain_buffers = True  # type: ignore[attr-defined]
    lib.llama_model_default_params = llama_cpp.llama_model_default_params = plain_buffers


@dataclass(frozen=True)
class LoadSpec:
    """Everything that changes how a model is loaded. Requests with the same spec share one
    instance whatever their sampling options."""

    name: str
    path: Path
    n_ctx: int
    """Context per sequence."""
    n_gpu_layers: int = 0
    """Layers llama.cpp puts on the GPU (negative: all of them, llama.cpp's convention). In the
    manager's load key it is what was asked for; the runner gets the planner's number."""
    embedding: bool = False
    n_parallel: int = 1
    """Sequences generated at once (continuous batching when > 1)."""

    def unpathed(self, error: object) -> str:
        """An error's text without the blob's absolute path (clients are not told where
        MYLLM_HOME is): the blob's own name stands for it."""
        return str(error).replace(str(self.path), self.path.name)

    @classmethod
    def for_model(
        cls, row: ModelRow, path: Path, num_ctx: int, n_gpu_layers: int = 0, embedding: bool = False,
        n_parallel: int = 1,
    ) -> LoadSpec:
        """`path`: the model's blob on this machine. The context is `context_size(num_ctx)` (a multiple of llama.cpp's
        padding, so its size and llama-cpp-python's token buffer are the same), at most what the model was trained for."""
        ctx = context_size(num_ctx)
        if row.context_length:
            ctx = min(ctx, row.context_length)
        return cls(row.name, path, ctx, n_gpu_layers, embedding, 1 if embedding else n_parallel)


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
    stop_sequence: str | None = None
    """The stop string that ended the text when one did (a request's `stop` or the template's
    end-of-turn text): Anthropic's API reports which of the caller's sequences it was."""


Event = TokenEvent | DoneEvent


@dataclass
class GenerationRequest:
    tokens: list[int]
    options: GenerationOptions
    extra_stop: tuple[str, ...] = ()
    grammar: str | None = None
    """GBNF the output must follow (see runtime/grammar.py)."""


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


def check_prompt(tokens: list[int], n_ctx: int) -> None:
    """A prompt must have a token and leave room for one more in a sequence's context."""
    if not tokens:
        raise InvalidOptions("the prompt is empty", field="prompt")
    if len(tokens) >= n_ctx:
        raise PromptTooLong(len(tokens), n_ctx)


CHARS_PER_TOKEN_BOUND = 16
"""More characters per token than any real text averages (English runs at about four)."""


def bounded_tokens(tokenize: Callable[[str], list[int]], text: str, limit: int) -> list[int] | None:
    """The tokens of `text`, or None when it is far longer than `limit` tokens could be and
    the head of it alone has more (a 4 MB prompt takes 30 s and ~900 MB to tokenize; its head
    answers at once). A list longer than `limit` is over too, by that many."""
    head = max(limit, 1) * CHARS_PER_TOKEN_BOUND
    if len(text) > head and len(tokenize(text[:head])) > limit:
        return None
    return tokenize(text)


def check_token_ids(tokens: list[int], n_vocab: int) -> None:
    """Token ids a client sent must be in the vocabulary: llama.cpp aborts on any other."""
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidOptions(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})", field="input")


class EmbeddingEngine:
    """A model loaded for embeddings: mean-pooled, L2-normalised vectors (generation is the
    batch engine's job, runtime/batching.py)."""

    def __init__(self, spec: LoadSpec, n_threads: int | None = None) -> None:
        import llama_cpp

        avoid_broken_weight_buffers()
        self.spec = spec
        if not spec.path.is_file():
            raise ModelLoadError(f"the model file of '{spec.name}' is missing (blob {spec.path.name}); pull it again")
        batch = min(spec.n_ctx, 2048)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(spec.path),
                n_ctx=spec.n_ctx,
                n_threads=n_threads or default_threads(),
                n_gpu_layers=spec.n_gpu_layers,
                # No layer on the GPU: no product of CPU weights sent there either. (`Llama` takes
                # no device list, so unlike the batch engine this context may still hold a GPU's
                # backend on a GPU build.)
                op_offload=spec.n_gpu_layers != 0,
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                n_batch=batch,
                n_ubatch=batch,
                verbose=False,
            )
        except MemoryError as exc:
            raise OutOfMemory(f"not enough memory to load '{spec.name}'") from exc
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load '{spec.name}' for embeddings: {spec.unpathed(exc)}") from exc
        self._n_ctx = min(int(self.llm.n_ctx()), len(self.llm.input_ids))
        self.n_vocab = self.llm.n_vocab()
        self._poisoned = False
        self._guard = UseGuard(spec.name)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def tokenize(self, text: str) -> list[int]:
        with self._guard.use():
            return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def count_tokens(self, text: str) -> int:
        with self._guard.use():
            return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def detokenize(self, tokens: list[int]) -> str:
        check_token_ids(tokens, self.n_vocab)
        with self._guard.use():
            return self.llm.detokenize(tokens).decode("utf-8", "replace")

    def embed(self, inputs: list[str | list[int]], truncate: bool = False) -> tuple[list[list[float]], int]:
        """One vector per input (a text or token ids), all in one call; the token count. An
        input longer than the batch is refused, or with `truncate` cut to what fits."""
        texts = [i if isinstance(i, str) else self.detokenize(i) for i in inputs]
        with self._guard.use():
            return self._embed(texts, truncate)

    def _embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        limit = int(self.llm.n_batch)
        for i, text in enumerate(texts):
            tokens = bounded_tokens(self.tokenize, text, limit)
            if tokens is None and truncate:  # far too long: what can be kept is in its head
                texts[i] = text[: limit * CHARS_PER_TOKEN_BOUND]
            elif tokens is None or len(tokens) > limit and not truncate:
                raise PromptTooLong(limit if tokens is None else len(tokens), limit, at_least=tokens is None)
            elif not tokens:  # nothing to pool over: llama.cpp would fail the whole batch
                raise InvalidOptions(f"input[{i}] is empty", field="input")
        try:
            vectors, count = self.llm.embed(texts, normalize=True, truncate=truncate, return_count=True)
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
