"""The embedding engine: a model loaded for pooled vectors or a cross-encoder's scores, in a runner
of its own."""

from __future__ import annotations

import numpy as np

from myllm.errors import InvalidOptions, ModelLoadError, OutOfMemory, PromptTooLong
from myllm.runtime.engine.lifetime import UseGuard
from myllm.runtime.engine.llama_setup import avoid_broken_weight_buffers, default_threads
from myllm.runtime.engine_types import (
    CHARS_PER_TOKEN_BOUND,
    POOLING_RANK,
    LoadSpec,
    bounded_tokens,
    check_token_ids,
)


class EmbeddingEngine:
    """A model loaded for embeddings: vectors pooled as `spec.pooling` says and L2-normalised (as
    llama-server's `/v1/embeddings` gives them), or, loaded with rank pooling, a reranker's score
    per query-document pair. Many inputs share each llama.cpp batch, one sequence each
    (generation is the batch engine's job, runtime/engine/batching.py)."""

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
                pooling_type=spec.pooling,
                # `Llama` takes on or off, not llama.cpp's "auto": auto means on for a CPU (where
                # llama-server's auto turns it on too; a third faster on a small encoder), off
                # with GPU layers, whose backend may not have it for every model.
                flash_attn=spec.flash_attention == "on" or spec.flash_attention == "auto" and spec.n_gpu_layers == 0,
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
        self.ranks = spec.pooling == POOLING_RANK
        model = self.llm.model
        self._width = llama_cpp.llama_model_n_cls_out(model) if self.ranks else self.llm.n_embd()
        template = llama_cpp.llama_model_chat_template(model, b"rerank")
        self._rerank_template = template.decode("utf-8") if template else None
        vocab = llama_cpp.llama_model_get_vocab(model)
        eos = llama_cpp.llama_vocab_eos(vocab)
        self._pair_marks = (
            llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None,
            (eos if eos >= 0 else llama_cpp.llama_vocab_sep(vocab)) if llama_cpp.llama_vocab_get_add_eos(vocab) else None,
            llama_cpp.llama_vocab_sep(vocab) if llama_cpp.llama_vocab_get_add_sep(vocab) else None,
        )
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
        """One vector per input (a text or token ids), all in one call; the token count."""
        seqs = self.embed_sequences(inputs, truncate)
        return self.evaluate(seqs), sum(map(len, seqs))  # type: ignore[return-value]

    def rerank(self, query: str, documents: list[str], truncate: bool = False) -> tuple[list[float], int]:
        """A relevance score per document and the token count (see `rerank_sequences`)."""
        seqs = self.rerank_sequences(query, documents, truncate)
        return self.evaluate(seqs), sum(map(len, seqs))  # type: ignore[return-value]

    def embed_sequences(self, inputs: list[str | list[int]], truncate: bool = False) -> list[list[int]]:
        """The sequences `evaluate` embeds for `inputs` (texts or token ids). An input longer
        than the batch is refused, or with `truncate` cut to what fits."""
        if self.ranks:
            raise InvalidOptions(f"'{self.spec.name}' is loaded to rank documents, not to embed", field="model")
        texts = [i if isinstance(i, str) else self.detokenize(i) for i in inputs]
        with self._guard.use():
            return [self._tokens(text, i, truncate) for i, text in enumerate(texts)]

    def rerank_sequences(self, query: str, documents: list[str], truncate: bool = False) -> list[list[int]]:
        """The sequences `evaluate` scores, one query-document pair each, laid out as llama-server
        lays them: the model's `rerank` template with `{query}` and `{document}` filled in, or else
        `[BOS] query [EOS] [SEP] document [EOS]`, each mark where the vocabulary adds it. A pair
        longer than the batch is refused, or with `truncate` its document is cut to fit."""
        if not self.ranks:
            raise InvalidOptions(f"'{self.spec.name}' is not a reranking model", field="model")
        with self._guard.use():
            return [self._pair(query, doc, i, truncate) for i, doc in enumerate(documents)]

    def evaluate(self, seqs: list[list[int]]) -> list[list[float]] | list[float]:
        """Each sequence's result, however many callers' sequences `seqs` gathers: an
        L2-normalised vector, or for a reranker the classifier's raw score (as llama-server's
        `/v1/rerank` gives it)."""
        with self._guard.use():
            pooled = self._pooled(seqs)
        if self.ranks:
            return [float(v[0]) for v in pooled]
        return [_normalized(v) for v in pooled]

    def _tokens(self, text: str, index: int, truncate: bool) -> list[int]:
        limit = int(self.llm.n_batch)
        encode = self._tokenizer(add_special=True)
        tokens = bounded_tokens(encode, text, limit)
        if tokens is None and truncate:  # far too long: what can be kept is in its head
            tokens = encode(text[: limit * CHARS_PER_TOKEN_BOUND])
        if tokens is None or len(tokens) > limit and not truncate:
            raise PromptTooLong(limit if tokens is None else len(tokens), limit, at_least=tokens is None)
        if not tokens:  # nothing to pool over: llama.cpp would fail the whole batch
            raise InvalidOptions(f"input[{index}] is empty", field="input")
        return tokens[:limit]

    def _pair(self, query: str, document: str, index: int, truncate: bool) -> list[int]:
        limit = int(self.llm.n_batch)
        if self._rerank_template is not None:
            prompt = self._rerank_template.replace("{query}", query).replace("{document}", document)
            tokens = bounded_tokens(self._tokenizer(add_special=False, parse_special=True), prompt, limit)
            if tokens is None or len(tokens) > limit:  # a template's tail cannot be cut off
                raise PromptTooLong(limit if tokens is None else len(tokens), limit, at_least=tokens is None)
            return tokens
        bos, eos, sep = self._pair_marks
        plain = self._tokenizer(add_special=False)
        head = [*([bos] if bos is not None else []), *plain(query), *([eos] if eos is not None else []),
                *([sep] if sep is not None else [])]
        tail = [eos] if eos is not None else []
        room = limit - len(head) - len(tail)
        doc = bounded_tokens(plain, document, max(room, 0))
        if doc is None and truncate:
            doc = plain(document[: max(room, 1) * CHARS_PER_TOKEN_BOUND])
        if room < 1 or doc is None or len(doc) > room and not truncate:
            raise InvalidOptions(f"documents[{index}] with the query is more than the {limit} tokens a pair may "
                                 "hold; shorten it or send truncate: true", field=f"documents[{index}]")
        return [*head, *doc[:room], *tail]

    def _tokenizer(self, add_special: bool, parse_special: bool = False):  # type: ignore[no-untyped-def]
        return lambda text: list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))

    def _pooled(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """Each sequence's pooled output, sequences packed into batches of up to `n_batch`
        tokens and the context's sequence count."""
        import llama_cpp

        llm, limit = self.llm, int(self.llm.n_batch)
        most = int(llm.context_params.n_seq_max)
        out: list[np.ndarray] = []
        batch: list[list[int]] = []
        try:
            for tokens in [*seqs, None]:
                if batch and (tokens is None or sum(map(len, batch)) + len(tokens) > limit or len(batch) >= most):
                    llm._batch.reset()
                    for seq_id, item in enumerate(batch):
                        llm._batch.add_sequence(item, seq_id, True)  # pooling reads every token
                    llm._ctx.kv_cache_clear()
                    llm._ctx.decode(llm._batch)
                    for seq_id in range(len(batch)):
                        pooled = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, seq_id)
                        out.append(np.ctypeslib.as_array(pooled, shape=(self._width,)).copy())
                    batch = []
                if tokens is not None:
                    batch.append(tokens)
        except RuntimeError as exc:
            # llama-cpp-python leaves its batch unusable after a failed decode; freeing it
            # later aborts the process, so this instance is retired without freeing it.
            self._poisoned = True
            raise ModelLoadError(f"llama.cpp failed to embed with '{self.spec.name}': {exc}") from exc
        finally:
            llm._batch.reset()
        return out

    def close(self) -> None:
        """Free the model once no thread is using it; later calls raise `ModelNotLoaded`."""
        self._guard.close()
        if not self._poisoned:
            self.llm.close()


def _normalized(vector: np.ndarray) -> list[float]:
    """`vector` scaled to unit length (llama-server's `embd_normalize` 2); a zero vector as is."""
    norm = float(np.sqrt(np.dot(vector.astype(np.float64), vector)))
    return (vector / norm if norm > 0 else vector).tolist()
