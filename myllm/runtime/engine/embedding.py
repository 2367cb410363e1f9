"""The embedding engine: a model loaded for pooled vectors, in a runner of its own."""

from __future__ import annotations

from myllm.errors import InvalidOptions, ModelLoadError, OutOfMemory, PromptTooLong
from myllm.runtime.engine.lifetime import UseGuard
from myllm.runtime.engine.llama_setup import avoid_broken_weight_buffers, default_threads
from myllm.runtime.engine_types import CHARS_PER_TOKEN_BOUND, LoadSpec, bounded_tokens, check_token_ids


class EmbeddingEngine:
    """A model loaded for embeddings: mean-pooled, L2-normalised vectors (generation is the
    batch engine's job, runtime/engine/batching.py)."""

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
