"""Images through a runner's batch engine (runtime/engine/media.py), the real runner process
driven as the daemon drives it, on the vision fixture (tests/vision_fixture.py): the prompt's
token count and the greedy tokens are libmtmd's own (tests/mtmd_reference.py, the same two
files), with two sequences at once too; a cached prefix with an image is reused by the same
image and never by another; and images that must not reach a model are typed errors, before
the runner or in it, which goes on answering.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from PIL import Image

from myllm.errors import BadImage, InvalidOptions, ModelLoadError, PromptTooLong
from myllm.runtime.engine.media import ImageChunk, MediaPrompt, Projector, placeholders
from myllm.runtime.engine_types import DecodedImage, DoneEvent, GenerationRequest, LoadSpec, PromptImage
from myllm.runtime.request.images import ImageLimits, check_count, decode_image
from myllm.runtime.runner import ModelRunner
from myllm.runtime.runner.protocol import RunnerConfig, RunnerOptions
from myllm.settings import Settings
from tests.mtmd_reference import Reference
from tests.vision_fixture import ProjectorShape, VisionModel, png_image, write_projector

pytestmark = pytest.mark.slow

N_PREDICT = 8
BEFORE = "<|im_start|>user\n"
AFTER = "What is in this image?<|im_end|>\n<|im_start|>assistant\n"
FOLLOW_UP = "It is noise.<|im_end|>\n<|im_start|>user\nAnd the colours?<|im_end|>\n<|im_start|>assistant\n"
SETTINGS = Settings()
LIMITS = ImageLimits(SETTINGS.max_image_bytes, SETTINGS.max_image_pixels, SETTINGS.max_images)


def greedy(max_tokens: int = N_PREDICT) -> RunnerOptions:
    return RunnerOptions(temperature=0.0, top_p=1.0, top_k=40, min_p=0.0, repeat_penalty=1.0, presence_penalty=0.0,
                         frequency_penalty=0.0, seed=None, stop=(), max_tokens=max_tokens, logprobs=None,
                         draft_max=None)


@pytest.fixture(scope="module")
def reference(vision: VisionModel) -> Iterator[Reference]:
    ref = Reference(vision.text, vision.projector, n_ctx=512)
    yield ref
    ref.close()


@asynccontextmanager
async def runner(vision: VisionModel, n_parallel: int = 2, n_ctx: int = 512, projector: bool = True,
                 kv_cache_bytes: int = 64 << 20) -> AsyncIterator[ModelRunner]:
    spec = LoadSpec("vision", vision.text, n_ctx, n_parallel=n_parallel,
                    projector=vision.projector if projector else None)
    started = await ModelRunner.start(RunnerConfig(spec, 2, kv_cache_bytes), 8)
    try:
        yield started
    finally:
        await started.close()


async def request(model: ModelRunner, images: list[bytes], after: str = AFTER,
                  max_tokens: int = N_PREDICT) -> GenerationRequest:
    """The fixture's chat prompt with `images` where libmtmd's marker is in `prompt_text`: the
    text on either side tokenized apart (the template's markup parsed), as the daemon does."""
    before, rest = await model.tokenize_units([[(BEFORE, True)], [(after, True)]], model.n_ctx)
    assert before is not None and rest is not None
    decoded = [DecodedImage(*decode_image(image, LIMITS)) for image in images]
    return GenerationRequest(before + rest, greedy(max_tokens), images=tuple(PromptImage(len(before), d) for d in decoded))


def prompt_text(ref: Reference, images: int, after: str = AFTER) -> str:
    return BEFORE + ref.marker * images + after


async def generate(model: ModelRunner, req: GenerationRequest) -> tuple[list[int], DoneEvent]:
    tokens = []
    async for event in model.generate(req):
        if isinstance(event, DoneEvent):
            return tokens, event
        tokens.append(event.token_id)
    raise AssertionError("no DoneEvent")


def expected(ref: Reference, images: list[bytes], after: str = AFTER) -> tuple[list[int], int]:
    """libmtmd's greedy tokens (without the end-of-turn token, which the engine does not send)
    and prompt token count."""
    ev = ref.run(prompt_text(ref, len(images), after), images, N_PREDICT)
    tokens = [t for t in ev.generated if not ref.lib.llama_vocab_is_eog(ref.vocab, t)]
    return tokens, ev.n_tokens


def tokens_before_the_first_embedding(ref: Reference, image: bytes, after: str) -> int:
    """The prompt's text before its first image chunk: the user's and what libmtmd puts around it."""
    status, chunks = ref.tokenize(prompt_text(ref, 1, after), [image])
    try:
        assert status == 0
        return ref.mtmd.mtmd_input_chunk_get_n_tokens(ref.mtmd.mtmd_input_chunks_get(chunks, 0))
    finally:
        ref.mtmd.mtmd_input_chunks_free(chunks)


async def test_an_image_prompt_is_libmtmds_prompt_and_answer(vision: VisionModel, reference: Reference) -> None:
    cases = [[png_image(16, 16)], [png_image(64, 32, seed=3)], [png_image(16, 16), png_image(8, 40, seed=4)]]
    async with runner(vision) as model:
        for images in cases:
            tokens, done = await generate(model, await request(model, images))
            want, n_tokens = expected(reference, images)
            assert (tokens, done.prompt_tokens) == (want, n_tokens)
            assert done.prompt_tokens > len((await request(model, [])).tokens) + 4 * len(images)  # images count


async def test_two_sequences_with_images_at_once(vision: VisionModel, reference: Reference) -> None:
    first, second = [png_image(16, 16, seed=5)], [png_image(32, 16, seed=6)]
    async with runner(vision, n_parallel=2) as model:
        (a, done_a), (b, done_b) = await asyncio.gather(
            generate(model, await request(model, first)), generate(model, await request(model, second)))
        assert (await model.stats())["decoded"] > 0
    assert (a, done_a.prompt_tokens) == expected(reference, first)
    assert (b, done_b.prompt_tokens) == expected(reference, second)
    assert a != b


async def test_a_cached_image_is_reused_by_the_same_image_only(vision: VisionModel, reference: Reference) -> None:
    """One slot: the follow-up turn with the same image evaluates only its new text; another
    image evaluates everything from that image's first embedding on (the text before it is
    reused), and the first conversation then comes back from the RAM KV cache, image and all."""
    image, other = png_image(16, 16, seed=7), png_image(16, 16, seed=8)
    follow_up = AFTER + FOLLOW_UP
    async with runner(vision, n_parallel=1) as model:
        _, first = await generate(model, await request(model, [image]))
        assert first.prompt_eval_tokens == first.prompt_tokens

        tokens, again = await generate(model, await request(model, [image], follow_up))
        assert (tokens, again.prompt_tokens) == expected(reference, [image], follow_up)
        assert 0 < again.prompt_eval_tokens <= again.prompt_tokens - first.prompt_tokens

        tokens, changed = await generate(model, await request(model, [other], follow_up))
        assert (tokens, changed.prompt_tokens) == expected(reference, [other], follow_up)
        reused = changed.prompt_tokens - changed.prompt_eval_tokens
        assert 0 < reused <= tokens_before_the_first_embedding(reference, other, follow_up)

        hits = (await model.stats())["kv_hits"]
        tokens, back = await generate(model, await request(model, [image], follow_up))
        assert (tokens, back.prompt_tokens) == expected(reference, [image], follow_up)
        assert back.prompt_eval_tokens == 1  # all but the last token, which must be evaluated for its logits
        assert (await model.stats())["kv_hits"] == hits + 1


async def test_an_image_counted_once_is_not_sent_to_the_runner_again(vision: VisionModel) -> None:
    """`image_positions` asks the runner only about images it has not counted (a conversation
    resends its images every turn): the counts stay libmtmd's, in the order asked."""
    image, other, third = (png_image(w, 16, seed=20 + i) for i, w in enumerate((16, 64, 256)))
    decoded = {data: DecodedImage(*decode_image(data, LIMITS)) for data in (image, other, third)}
    async with runner(vision) as model:
        sent: list[list[str]] = []
        call = model.call

        async def spying(method: str, *args: object) -> object:
            if method == "image_positions":
                sent.append([item[0] for item in args[0]])  # type: ignore[index]
            return await call(method, *args)

        model.call = spying  # type: ignore[method-assign]
        first = await model.image_positions([decoded[image], decoded[other], decoded[image]])
        again = await model.image_positions([decoded[other], decoded[image]])
        more = await model.image_positions([decoded[third], decoded[image]])
        counts = await call("image_positions", [[d.digest, d.width, d.height, d.rgb] for d in decoded.values()])
    assert sent == [[decoded[image].digest, decoded[other].digest], [decoded[third].digest]]
    assert (first, again, more) == ([counts[0], counts[1], counts[0]], [counts[1], counts[0]], [counts[2], counts[0]])
    assert counts[0] not in (counts[1], counts[2])  # so a mix-up would show


def test_reuse_never_ends_inside_an_image_chunk() -> None:
    """`MediaPrompt.start`: a reuse that would end inside an image chunk starts at the chunk,
    and an earlier start chosen for the CPU's attention tiles is taken only outside one."""
    projector = Projector.__new__(Projector)
    projector.mtmd = None  # type: ignore[assignment]  # nothing owned: nothing to free
    media = MediaPrompt(projector, [1, 2, *placeholders("d", 0, 4), 3, *placeholders("d", 1, 4), 4],
                        [ImageChunk(2, 6, 0), ImageChunk(7, 11, 0)], [])
    assert [media.boundary(k) for k in range(13)] == [0, 1, 2, 2, 2, 2, 6, 7, 7, 7, 7, 11, 12]
    assert media.start(9, 9) == 7 and media.start(12, 8) == 12 and media.start(12, 6) == 6
    assert media.text_ahead(media.tokens[6:], 6) == [3] and media.text_ahead(media.tokens[11:], 11) == [4]


def test_placeholders_are_no_token_and_differ_per_image_and_chunk() -> None:
    a, b, a1 = placeholders("a" * 64, 0, 64), placeholders("b" * 64, 0, 64), placeholders("a" * 64, 1, 64)
    assert all(t < 0 for t in a + b + a1) and len(set(a)) == 64
    assert a == placeholders("a" * 64, 0, 64) and a[0] != b[0] and a[0] != a1[0]


# -- images that must not reach a model ------------------------------------------------------------


def encoded(image: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=kind)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels: what a decompression bomb's header says."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_each_allowed_format_decodes_to_rgb_with_the_files_digest() -> None:
    picture = Image.new("RGBA", (5, 3), (10, 200, 30, 128))
    frames = [Image.new("RGB", (5, 3), colour) for colour in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    for data in (encoded(picture, "PNG"), encoded(picture.convert("RGB"), "JPEG"), encoded(picture, "WEBP"),
                 gif.getvalue()):
        pixels = decode_image(data, LIMITS)
        assert (pixels.width, pixels.height, len(pixels.rgb)) == (5, 3, 45)
        assert len(pixels.digest) == 64
    assert decode_image(gif.getvalue(), LIMITS).rgb[:3] == bytes((255, 0, 0))  # the first frame


@pytest.mark.parametrize(("data", "limits", "reason"), [
    (b"this is text, not a picture", LIMITS, "not_an_image"),
    (png_image(16, 16)[:60], LIMITS, "not_an_image"),  # truncated after its header
    (encoded(Image.new("RGB", (4, 4)), "BMP"), LIMITS, "unsupported_format"),
    (encoded(Image.new("RGB", (4, 4)), "TIFF"), LIMITS, "unsupported_format"),
    (png_header_only(5000, 5000), LIMITS, "too_many_pixels"),  # over ours, under Pillow's own cap
    (png_header_only(60000, 60000), LIMITS, "too_many_pixels"),  # over Pillow's too
    (png_image(16, 16), ImageLimits(LIMITS.max_bytes, 255, 8), "too_many_pixels"),
    (png_image(16, 16), ImageLimits(100, LIMITS.max_pixels, 8), "too_many_bytes"),
])
def test_a_bad_image_is_a_typed_error_naming_why(data: bytes, limits: ImageLimits, reason: str) -> None:
    with pytest.raises(BadImage) as caught:
        decode_image(data, limits)
    assert caught.value.reason == reason and caught.value.status == 400 and caught.value.field == "images"


def test_too_many_images_is_refused_before_any_is_decoded() -> None:
    check_count(LIMITS.max_images, LIMITS)
    with pytest.raises(BadImage) as caught:
        check_count(LIMITS.max_images + 1, LIMITS)
    assert caught.value.reason == "too_many_images"


async def test_what_reaches_a_runner_wrongly_is_a_typed_error_and_it_goes_on(
        vision: VisionModel, reference: Reference) -> None:
    image = [png_image(16, 16)]
    async with runner(vision, n_ctx=256) as model, runner(vision, projector=False) as blind:
        pid = model.pid
        good = await request(model, image)
        short = DecodedImage(good.images[0].image.digest, 16, 16, good.images[0].image.rgb[:-1])
        for bad, error in (
            (GenerationRequest(good.tokens, good.options, images=(PromptImage(0, short),)), BadImage),
            (GenerationRequest(good.tokens, good.options, images=(PromptImage(len(good.tokens) + 1, good.images[0].image),)),
             InvalidOptions),
            (GenerationRequest(good.tokens, good.options, images=(PromptImage(-1, good.images[0].image),)),
             InvalidOptions),
            (GenerationRequest(good.tokens, good.options, images=good.images * 8), PromptTooLong),
        ):
            with pytest.raises(error) as caught:
                await generate(model, bad)
            if error is PromptTooLong:
                assert caught.value.prompt_tokens > 256 > len(good.tokens)  # the images' tokens count
        with pytest.raises(InvalidOptions, match="cannot see images"):
            await generate(blind, await request(blind, image))
        tokens, done = await generate(model, good)
        assert (tokens, done.prompt_tokens) == expected(reference, image)
        assert model.alive and model.pid == pid


async def test_a_projector_that_does_not_fit_the_model_is_a_load_error(vision: VisionModel, tmp_path: Path) -> None:
    """libmtmd refuses a projector into another embedding width, and a file that is no
    projector (the text model itself): the runner reports a clean load failure, no crash."""
    other_width = write_projector(tmp_path / "other.gguf", ProjectorShape(text_width=64))
    for projector in (other_width, vision.text):
        spec = LoadSpec("vision", vision.text, 256, projector=projector)
        with pytest.raises(ModelLoadError, match=f"could not load the projector of 'vision' \\({projector.name}\\)"):
            await ModelRunner.start(RunnerConfig(spec, 2, 0), 4)
