"""The vision fixture (tests/vision_fixture.py) works in llama-cpp-python's libmtmd: the
projector loads against the text model, an image becomes tiles of embeddings in the KV cache of
the sequence asked for, and what the model writes depends on the image. Driven through the
bindings alone (tests/mtmd_reference.py); bench/vision_check.py compares the same with
llama-server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mtmd_reference import Reference
from tests.vision_fixture import ADDED_TOKENS, PROJECTOR_FILE, TEXT_FILE, VisionModel, png_image, write_vision_model

N_PREDICT = 8


@pytest.fixture(scope="module")
def reference(vision: VisionModel) -> Iterator[Reference]:
    ref = Reference(vision.text, vision.projector, n_ctx=512, n_seq=2)
    yield ref
    ref.close()


def prompt(ref: Reference, images: int = 1) -> str:
    return f"<|im_start|>user\n{ref.marker * images}What is in this image?<|im_end|>\n<|im_start|>assistant\n"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_fixture_is_the_same_bytes_every_time(vision: VisionModel, tmp_path: Path) -> None:
    again = write_vision_model(tmp_path)
    assert (digest(again.text), digest(again.projector)) == (digest(vision.text), digest(vision.projector))
    assert (vision.text.name, vision.projector.name) == (TEXT_FILE, PROJECTOR_FILE)


def test_the_projector_is_an_idefics3_clip_file_into_smollm2s_width(vision: VisionModel) -> None:
    from gguf import GGUFReader

    projector = GGUFReader(vision.projector)
    assert projector.fields["general.architecture"].contents() == "clip"
    assert projector.fields["clip.projector_type"].contents() == "idefics3"
    fc = next(t for t in projector.tensors if t.name == "mm.model.fc.weight")
    text = GGUFReader(vision.text)
    assert int(fc.shape[1]) == text.fields["llama.embedding_length"].contents() == 576
    tokens = text.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[-len(ADDED_TOKENS):] == list(ADDED_TOKENS)
    assert len(tokens) == text.fields["llama.vocab_size"].contents()
    assert vision.projector.stat().st_size < 1 << 20


def test_a_square_image_is_a_two_by_two_grid_and_an_overview(reference: Reference, vision: VisionModel) -> None:
    per_tile = vision.shape.tokens_per_tile
    ev = reference.run(prompt(reference), [png_image(16, 16)], N_PREDICT)
    assert ev.chunk_kinds == ["text", "image"] * 5 + ["text"]
    assert [(i.n_tokens, i.n_pos) for i in ev.images] == [(per_tile, per_tile)] * 5
    assert ev.n_tokens == ev.n_pos == len(ev.text_tokens) + 5 * per_tile
    text = reference.detokenize(ev.text_tokens)
    assert "What is in this image?" in text
    assert len({i.id for i in ev.images}) == 1 and len(ev.images[0].id) == 64  # the file's sha256
    assert ev.generated


def test_the_grid_follows_the_aspect_ratio(reference: Reference) -> None:
    wide = reference.run(prompt(reference), [png_image(64, 32)], 1)
    tall = reference.run(prompt(reference), [png_image(8, 40)], 1)
    assert len(wide.images) == len(tall.images) == 3  # two tiles and the overview


def test_what_the_model_writes_depends_on_the_image(reference: Reference) -> None:
    first = reference.run(prompt(reference), [png_image(16, 16, seed=1)], N_PREDICT)
    again = reference.run(prompt(reference), [png_image(16, 16, seed=1)], N_PREDICT)
    other = reference.run(prompt(reference), [png_image(16, 16, seed=2)], N_PREDICT)
    assert first.generated == again.generated
    assert first.text_tokens == other.text_tokens
    assert first.generated != other.generated


def test_an_image_goes_into_the_sequence_asked_for(reference: Reference) -> None:
    """mtmd_helper_eval_chunk_single / _decode_image_chunk take a seq_id: a batch engine can put
    an image in any of its sequences."""
    image = png_image(16, 16)
    in_0 = reference.run(prompt(reference), [image], N_PREDICT, seq=0)
    in_1 = reference.run(prompt(reference), [image], N_PREDICT, seq=1)
    assert in_0.generated == in_1.generated


def test_two_images_in_one_prompt(reference: Reference) -> None:
    one = reference.run(prompt(reference), [png_image(16, 16)], 1)
    two = reference.run(prompt(reference, 2), [png_image(16, 16), png_image(64, 32)], 1)
    assert len(two.images) == 5 + 3
    assert two.n_tokens > one.n_tokens


def test_bad_input_is_a_status_not_a_crash(reference: Reference) -> None:
    """Bytes stb_image cannot decode give no bitmap (this libmtmd, built with MTMD_VIDEO, first
    hands them to ffprobe as a possible video); markers and images that do not pair up make
    mtmd_tokenize return 2 (its header says 1: the count is checked in a constructor that throws,
    caught as a preprocessing error, tools/mtmd/mtmd.cpp `mtmd_tokenize`)."""
    assert reference.bitmap(b"not an image at all") is None
    assert reference.bitmap(png_image(16, 16)[:40]) is None  # a truncated PNG
    for markers, images in ((2, 1), (1, 2)):
        status, chunks = reference.tokenize(prompt(reference, markers), [png_image(16, 16)] * images)
        reference.mtmd.mtmd_input_chunks_free(chunks)
        assert status == 2
