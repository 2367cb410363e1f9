"""Encoder GGUFs evaluated directly through llama-cpp-python's bindings, with no myllm code in
the way: one text (or one query-document pair) per decode, pooled as the model says, as
llama-server's `--embedding` and `--rerank` evaluate them (tools/server: `tokenize_input_prompts`
for an embedding's input, `format_prompt_rerank` for a pair, `send_embedding` /
`send_rerank` for the pooled output). The reference tests hold myllm's vectors and scores to;
bench/retrieval.py shows it and myllm equal to llama-server itself.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

N_CTX = 512


class Reference:
    """A model loaded once with `pooling` (llama.cpp's `llama_pooling_type`: 1 mean, 2 CLS,
    4 rank); `embedding` and `score` evaluate from scratch each time."""

    def __init__(self, path: Path, pooling: int, n_threads: int = 2) -> None:
        import llama_cpp

        from myllm.runtime.engine.llama_setup import avoid_broken_weight_buffers

        avoid_broken_weight_buffers()  # AMX CPUs: what llama-server's --no-repack does
        self.lib = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = N_CTX
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.embeddings = True
        cparams.pooling_type = pooling
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("could not create a context")
        self.width = llama_cpp.llama_model_n_cls_out(self.model) if pooling == 4 else llama_cpp.llama_model_n_embd(self.model)

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode()
        room = len(data) + 8
        out = (self.lib.llama_token * room)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), out, room, add_special, parse_special)
        if n < 0:
            raise ValueError("tokenize: buffer too small")
        return list(out[:n])

    def pair(self, query: str, document: str) -> list[int]:
        """A query-document pair's tokens as llama-server's `format_prompt_rerank` lays them out
        for a model without a `rerank` template: [BOS] query [EOS] [SEP] document [EOS], each
        mark where the vocabulary adds it (EOS falling back to SEP)."""
        lib, vocab = self.lib, self.vocab
        eos = lib.llama_vocab_eos(vocab)
        eos = eos if eos >= 0 else lib.llama_vocab_sep(vocab)
        add_eos = [eos] if lib.llama_vocab_get_add_eos(vocab) else []
        return [*([lib.llama_vocab_bos(vocab)] if lib.llama_vocab_get_add_bos(vocab) else []),
                *self.tokenize(query, False, False), *add_eos,
                *([lib.llama_vocab_sep(vocab)] if lib.llama_vocab_get_add_sep(vocab) else []),
                *self.tokenize(document, False, False), *add_eos]

    def pooled(self, tokens: list[int]) -> list[float]:
        """The pooled output of one sequence of `tokens` (every token an output, as llama-server
        asks for embeddings and ranks)."""
        lib = self.lib
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
                batch.seq_id[i][0] = 0
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            pooled = lib.llama_get_embeddings_seq(self.ctx, 0)
            return list(ctypes.cast(pooled, ctypes.POINTER(ctypes.c_float))[: self.width])
        finally:
            lib.llama_batch_free(batch)

    def embedding(self, text: str) -> tuple[list[float], int]:
        """`text`'s vector, L2-normalised (llama-server's default `embd_normalize`), and its tokens."""
        tokens = self.tokenize(text, True, True)
        vector = self.pooled(tokens)
        norm = math.sqrt(sum(x * x for x in vector))
        return [x / norm for x in vector], len(tokens)

    def score(self, query: str, document: str) -> tuple[float, int]:
        """The pair's relevance score (the classifier's first output, as llama-server's
        `/v1/rerank` gives it) and its tokens."""
        tokens = self.pair(query, document)
        return self.pooled(tokens)[0], len(tokens)
