"""Images in the batch engine: the projector (libmtmd, llama.cpp's multimodal library) loaded
beside the text model, and a request's images turned into the engine's prompt, a list of ids.

libmtmd makes each image a run of chunks: text its projector puts around the image (Idefics3's
`<fake_token_around_image><row_1_col_1>`, Gemma 3's `<start_of_image>`) and image chunks, each
a grid of embeddings that one `llama_decode` puts into a sequence's KV (`decode`: its own decode,
holding only that sequence's embeddings, with non-causal attention where the projector wants
it). In the prompt the engine schedules, an image chunk's positions hold *placeholders*: one id
per position, negative (no vocabulary id is), drawn from the image's digest. Everything that
compares prompts (a slot's cached tokens, the RAM KV cache's prefix tree, `place`) compares them
as ids, so a prefix holding an image is reused by a later prompt with the same image there, and
a different image differs at its first placeholder. `MediaPrompt.boundary` keeps a reuse from
ending inside an image chunk, which could not be evaluated in part.

Models whose images take fewer positions than embeddings (M-RoPE: the Qwen-VL family) are
refused: the engine's prompts are one position per id.
"""

from __future__ import annotations

import ctypes
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from myllm.errors import BadImage, InvalidOptions, ModelLoadError
from myllm.runtime.engine_types import DecodedImage, GenerationRequest, LoadSpec, check_prompt

if TYPE_CHECKING:
    from llama_cpp import _internals

LOG_WARN, LOG_ERROR = 2, 3
"""ggml's log levels that libmtmd's messages keep (`quiet_logs`)."""

PLACEHOLDER_SPAN = 1 << 62
"""Placeholders are -1 down to -PLACEHOLDER_SPAN: two images' runs overlap with odds of their
lengths over this."""


def placeholders(digest: str, chunk: int, n: int) -> list[int]:
    """The ids standing for the `n` positions of an image's `chunk`-th image chunk. `hashlib`
    is imported here, by vision models only: it loads OpenSSL, 3.6 MiB of every runner's memory."""
    import hashlib

    base = int.from_bytes(hashlib.blake2b(f"{digest}:{chunk}".encode(), digest_size=8).digest())
    return [-1 - (base + j) % PLACEHOLDER_SPAN for j in range(n)]


@dataclass(frozen=True)
class ImageChunk:
    """An image chunk's place in a prompt: positions `start` to `end` (excluded)."""

    start: int
    end: int
    chunk: int
    """libmtmd's `mtmd_input_chunk *`, owned by its `MediaPrompt`."""


class MediaPrompt:
    """A request's whole prompt as the engine evaluates it: `tokens` (text ids and
    placeholders) and where its image chunks are. Holds libmtmd's chunks until it is dropped."""

    def __init__(self, projector: Projector, tokens: list[int], chunks: list[ImageChunk], owned: list[int]) -> None:
        self.projector = projector
        self.tokens = tokens
        self.chunks = chunks
        self._free = weakref.finalize(self, _free_all, projector.mtmd, owned)

    def start(self, keep: int, padded: int) -> int:
        """Where a sequence holding the first `keep` of these tokens starts evaluating them:
        `padded` (an earlier start, `CpuAttention.start`) unless that is inside an image chunk,
        which would then be encoded again; never inside one, which cannot be evaluated in part."""
        return padded if self.boundary(padded) == padded else self.boundary(keep)

    def boundary(self, keep: int) -> int:
        """`keep` moved back to the start of the image chunk it is inside, if it is."""
        return next((c.start for c in self.chunks if c.start < keep < c.end), keep)

    def text_ahead(self, pending: list[int], at: int) -> list[int]:
        """Of `pending` (the prompt from position `at` on), the text before the next image."""
        nxt = next((c.start for c in self.chunks if c.start >= at), None)
        return pending if nxt is None else pending[: nxt - at]

    def decode(self, ctx: int, at: int, seq: int) -> int:
        """Encode the image chunk at position `at` and decode it into sequence `seq`'s KV; its length."""
        chunk = next(c for c in self.chunks if c.start == at)
        mtmd = self.projector.mtmd
        new_n_past = ctypes.c_int32(at)
        status = mtmd.mtmd_helper_eval_chunk_single(self.projector.ctx, ctx, chunk.chunk, at, seq,
                                                    self.projector.n_batch, False, ctypes.byref(new_n_past))
        if status != 0:
            raise ModelLoadError(f"llama.cpp failed to evaluate an image (libmtmd returned {status})")
        return chunk.end - chunk.start


def _free_all(mtmd: ModuleType, owned: list[int]) -> None:
    for chunks in owned:
        mtmd.mtmd_input_chunks_free(chunks)


def _warnings_only(level: int, text: bytes | None, _: ctypes.c_void_p) -> None:
    if level in (LOG_WARN, LOG_ERROR) and text:
        sys.stderr.write(text.decode("utf-8", "replace"))


def quiet_logs(mtmd: ModuleType) -> None:
    """libmtmd's warnings and errors only: its information lines (a few for every image
    evaluated, naming the text around it) would push llama.cpp's last words out of what the
    daemon keeps of a runner's stderr."""
    global _log_callback
    if _log_callback is None:
        _log_callback = mtmd.llama_cpp.llama_log_callback(_warnings_only)  # kept: C holds its address
        mtmd.mtmd_log_set(_log_callback, None)
        mtmd.mtmd_helper_log_set(_log_callback, None)


_log_callback: object = None


class Projector:
    """libmtmd's context for one loaded model: made, used and freed by the engine's scheduler
    thread, as the model is."""

    def __init__(self, mtmd: ModuleType, ctx: int, n_batch: int) -> None:
        self.mtmd = mtmd
        self.ctx = ctx
        self.n_batch = n_batch

    @classmethod
    def load(cls, spec: LoadSpec, model: _internals.LlamaModel, n_threads: int, n_batch: int) -> Projector:
        """The projector file of `spec`, for `model` (libmtmd checks that its output is the text
        model's embedding width), on the GPU when the model has layers there."""
        import llama_cpp.mtmd_cpp as mtmd

        assert spec.projector is not None
        quiet_logs(mtmd)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = spec.n_gpu_layers != 0
        params.n_threads = n_threads
        params.print_timings = False
        ctx = mtmd.mtmd_init_from_file(str(spec.projector).encode(), model.model, params)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not load the projector of '{spec.name}' ({spec.projector.name}): "
                                 "not a projector file, or one made for another model")
        if not mtmd.mtmd_support_vision(ctx):
            mtmd.mtmd_free(ctx)
            raise ModelLoadError(f"the projector of '{spec.name}' ({spec.projector.name}) takes no images")
        return cls(mtmd, ctx, n_batch)

    def close(self) -> None:
        self.mtmd.mtmd_free(self.ctx)

    def prompt(self, req: GenerationRequest, n_ctx: int) -> MediaPrompt:
        """`req`'s tokens with its images in their places, checked against the context (images
        count by their embeddings)."""
        tokens, chunks, owned = [], [], []
        media = MediaPrompt(self, tokens, chunks, owned)  # frees what `owned` gathers, whatever happens
        last = 0
        for item in req.images:
            if not last <= item.at <= len(req.tokens):
                raise InvalidOptions("images must be in prompt order, within it", field="images")
            tokens += req.tokens[last:item.at]
            last = item.at
            owned.append(self._tokenize(item.image))
            mtmd, image_chunks, first = self.mtmd, owned[-1], len(chunks)
            for i in range(mtmd.mtmd_input_chunks_size(image_chunks)):
                chunk = mtmd.mtmd_input_chunks_get(image_chunks, i)
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    size = ctypes.c_size_t()
                    ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(size))
                    tokens += ids[: size.value]
                    continue
                if mtmd.mtmd_input_chunk_get_n_pos(chunk) != n:
                    raise InvalidOptions("images on this model are not supported yet: its projector places an image's "
                                         "embeddings on fewer positions than it has (M-RoPE)", field="images")
                chunks.append(ImageChunk(len(tokens), len(tokens) + n, chunk))
                tokens += placeholders(item.image.digest, len(chunks) - first, n)  # the same wherever the image is
        tokens += req.tokens[last:]
        check_prompt(tokens, n_ctx)
        if tokens[-1] < 0:  # no logits to sample from after an image chunk: the slot would never answer
            raise InvalidOptions("a prompt must end with text after its last image", field="images")
        return media

    def positions(self, image: DecodedImage) -> int:
        """The prompt positions `image` takes (its image chunks and the text its projector puts
        around them), without encoding it: libmtmd's tokenize step only preprocesses and slices."""
        chunks = self._tokenize(image)
        try:
            mtmd = self.mtmd
            return sum(mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i))
                       for i in range(mtmd.mtmd_input_chunks_size(chunks)))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _tokenize(self, image: DecodedImage) -> int:
        """libmtmd's chunks for one image (`mtmd_input_chunks *`): its text and image chunks."""
        mtmd = self.mtmd
        if image.width < 1 or image.height < 1 or len(image.rgb) != image.width * image.height * 3:
            raise BadImage(f"an image of {len(image.rgb)} bytes is not {image.width}x{image.height} RGB pixels",
                           "not_an_image")
        pixels = ctypes.cast(ctypes.c_char_p(image.rgb), ctypes.POINTER(ctypes.c_uint8))  # read, never written
        bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, pixels)  # copies the pixels
        if not bitmap:
            raise ModelLoadError("libmtmd could not hold an image")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            mtmd.mtmd_bitmap_set_id(bitmap, image.digest.encode())
            part = mtmd.mtmd_input_part(None, bitmap)
            parts = (ctypes.POINTER(mtmd.mtmd_input_part) * 1)(ctypes.pointer(part))
            status = mtmd.mtmd_tokenize_from_parts(self.ctx, chunks, parts, 1, False)
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise InvalidOptions(f"the model's projector could not take an image (libmtmd returned {status})",
                                 field="images")
        return chunks


class MediaSlot(Protocol):
    """What `evaluate_images` reads and moves on of a batch engine's slot."""

    seq: int
    cached: list[int]
    """Ids whose KV the sequence holds (its next position is their count)."""
    pending: list[int]
    """Ids still to evaluate."""
    media: MediaPrompt | None


def evaluate_images(ctx: int, slots: Iterable[MediaSlot]) -> None:
    """For each slot whose next pending id is an image chunk's first placeholder: that chunk,
    encoded and decoded into the slot's sequence (one chunk a step, so the other sequences go on
    between an image's chunks), and moved from pending to cached."""
    for slot in slots:
        if slot.media is not None and slot.pending and slot.pending[0] < 0:
            n = slot.media.decode(ctx, len(slot.cached), slot.seq)
            slot.cached, slot.pending = slot.cached + slot.pending[:n], slot.pending[n:]


def media_prompt(projector: Projector | None, req: GenerationRequest, n_ctx: int) -> MediaPrompt | None:
    """The engine's prompt for a request with images (None without: its tokens are the prompt)."""
    if not req.images:
        return None
    if projector is None:
        raise InvalidOptions("this model cannot see images: it was loaded without a projector", field="images")
    return projector.prompt(req, n_ctx)
