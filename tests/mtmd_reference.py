"""libmtmd driven directly through llama-cpp-python's bindings (`llama_cpp.mtmd_cpp`), with no
myllm code in the way: a prompt with an image evaluated and continued greedily, as
llama-cpp-python's own `MTMDChatHandler` does (llama_chat_format.py) and llama-server does
(tools/server). The reference the vision fixture is proven with, and that myllm's own vision
path can be checked against.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from pathlib import Path

N_BATCH = 512


@dataclass
class ImageChunk:
    n_tokens: int  # embeddings the image adds to the KV cache
    n_pos: int  # positions it takes (the same but for M-RoPE models)
    nx: int  # the tile's size in embeddings
    ny: int
    id: str  # the bitmap's id: the sha256 of the file's bytes (mtmd_helper_bitmap_init_from_buf)


@dataclass
class Evaluation:
    n_tokens: int  # the whole prompt, text and images (mtmd_helper_get_n_tokens)
    n_pos: int
    text_tokens: list[int]  # the text chunks' tokens, in order
    images: list[ImageChunk]
    chunk_kinds: list[str]  # "text" / "image" per chunk, in order
    encode_seconds: list[float]  # per image chunk: mtmd_encode_chunk alone
    generated: list[int] = field(default_factory=list)


class Reference:
    """A text model and its projector loaded once; `run` evaluates a prompt from scratch in
    sequence `seq` (its KV cleared first) and continues it greedily."""

    def __init__(self, text: Path, projector: Path, n_ctx: int = 2048, n_threads: int = 2,
                 n_seq: int = 1) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        from myllm.runtime.engine.llama_setup import avoid_broken_weight_buffers

        avoid_broken_weight_buffers()  # AMX CPUs: what llama-server's --no-repack does
        self.lib, self.mtmd = llama_cpp, mtmd
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(text).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"could not load {text}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_batch = cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("could not create a context")
        vparams = mtmd.mtmd_context_params_default()
        vparams.use_gpu = False
        vparams.n_threads = n_threads
        vparams.print_timings = False
        self.mctx = mtmd.mtmd_init_from_file(str(projector).encode(), self.model, vparams)
        if not self.mctx:
            raise RuntimeError(f"libmtmd could not load the projector {projector}")
        self.marker = mtmd.mtmd_default_marker().decode()

    def close(self) -> None:
        self.mtmd.mtmd_free(self.mctx)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def bitmap(self, image: bytes) -> ctypes.c_void_p | None:
        """libmtmd's bitmap of an image file's bytes (stb_image decodes it), None if it cannot."""
        buf = (ctypes.c_uint8 * len(image)).from_buffer_copy(image)
        return self.mtmd.mtmd_helper_bitmap_init_from_buf(self.mctx, buf, len(image), False)

    def tokenize(self, prompt: str, images: list[bytes]) -> tuple[int, ctypes.c_void_p]:
        """(mtmd_tokenize's status, the chunks): the prompt's markers replaced by `images`."""
        mtmd = self.mtmd
        bitmaps = [self.bitmap(image) for image in images]
        try:
            if any(b is None for b in bitmaps):
                raise ValueError("an image libmtmd cannot decode")
            text = mtmd.mtmd_input_text()
            raw = prompt.encode()
            text.text, text.text_len = raw, len(raw)
            text.add_special, text.parse_special = True, True
            chunks = mtmd.mtmd_input_chunks_init()
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            status = mtmd.mtmd_tokenize(self.mctx, chunks, ctypes.byref(text), array, len(bitmaps))
            return status, chunks
        finally:
            for b in bitmaps:
                if b is not None:
                    mtmd.mtmd_bitmap_free(b)

    def run(self, prompt: str, images: list[bytes], n_predict: int, seq: int = 0) -> Evaluation:
        lib, mtmd = self.lib, self.mtmd
        status, chunks = self.tokenize(prompt, images)
        try:
            if status != 0:
                raise ValueError(f"mtmd_tokenize returned {status}")
            out = Evaluation(n_tokens=mtmd.mtmd_helper_get_n_tokens(chunks), n_pos=mtmd.mtmd_helper_get_n_pos(chunks),
                             text_tokens=[], images=[], chunk_kinds=[], encode_seconds=[])
            lib.llama_memory_seq_rm(lib.llama_get_memory(self.ctx), seq, -1, -1)
            n_past = 0
            n_chunks = mtmd.mtmd_input_chunks_size(chunks)
            for i in range(n_chunks):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                last = i == n_chunks - 1
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    out.text_tokens += [ptr[j] for j in range(n.value)]
                    out.chunk_kinds.append("text")
                else:
                    tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
                    out.images.append(ImageChunk(
                        mtmd.mtmd_input_chunk_get_n_tokens(chunk), mtmd.mtmd_input_chunk_get_n_pos(chunk),
                        mtmd.mtmd_image_tokens_get_nx(tokens), mtmd.mtmd_image_tokens_get_ny(tokens),
                        (mtmd.mtmd_input_chunk_get_id(chunk) or b"").decode()))
                    out.chunk_kinds.append("image")
                    started = time.perf_counter()
                    if mtmd.mtmd_encode_chunk(self.mctx, chunk) != 0:
                        raise RuntimeError("mtmd_encode_chunk failed")
                    out.encode_seconds.append(time.perf_counter() - started)
                    new_n_past = lib.llama_pos(n_past)
                    if mtmd.mtmd_helper_decode_image_chunk(self.mctx, self.ctx, chunk, mtmd.mtmd_get_output_embd(self.mctx),
                                                           n_past, seq, N_BATCH, ctypes.byref(new_n_past),
                                                           mtmd.mtmd_helper_post_decode_callback(), None):
                        raise RuntimeError(f"mtmd_helper_decode_image_chunk failed on chunk {i}")
                    n_past = new_n_past.value
                    continue
                new_n_past = lib.llama_pos(n_past)
                if mtmd.mtmd_helper_eval_chunk_single(self.mctx, self.ctx, chunk, n_past, seq, N_BATCH, last,
                                                      ctypes.byref(new_n_past)) != 0:
                    raise RuntimeError(f"mtmd_helper_eval_chunk_single failed on chunk {i}")
                n_past = new_n_past.value
            out.generated = self._greedy(n_past, n_predict, seq)
            return out
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _greedy(self, n_past: int, n_predict: int, seq: int) -> list[int]:
        """Greedy tokens after the prompt, up to and with an end-of-generation token (llama-server
        returns that one too)."""
        import numpy as np

        lib = self.lib
        n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        batch = lib.llama_batch_init(1, 0, 1)
        out: list[int] = []
        try:
            for _ in range(n_predict):
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(n_vocab,))
                token = int(np.argmax(logits))
                out.append(token)
                if lib.llama_vocab_is_eog(self.vocab, token):
                    break
                batch.n_tokens = 1
                batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, n_past, 1, True
                batch.seq_id[0][0] = seq
                if lib.llama_decode(self.ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                n_past += 1
        finally:
            lib.llama_batch_free(batch)
        return out

    def detokenize(self, tokens: list[int]) -> str:
        out = b""
        buf = ctypes.create_string_buffer(256)
        for token in tokens:
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            out += buf.raw[:n]
        return out.decode(errors="replace")
