"""A tiny vision model for tests and bench, built the way SmolVLM is: SmolLM2 as the text
decoder and an Idefics3 projector (a SigLIP encoder, a pixel shuffle and one linear map into the
text model's embedding width), written with the `gguf` package. No small vision model is on the
package index, so the projector's weights are random, of the right shapes: answers are nonsense,
but every step a real one takes (decoding, slicing into tiles, encoding, evaluating the image's
embeddings in the text model's KV) runs, in llama.cpp's libmtmd as llama-cpp-python 0.3.36 ships
it and in llama-server alike.

`write_vision_model(folder)` writes both files, the same bytes at every call:
- `smolvlm-text.gguf`: SmolLM2-135M with the tokens SmolVLM adds to its vocabulary, which libmtmd
  looks up by text around each image (tools/mtmd/mtmd.cpp, `PROJECTOR_TYPE_IDEFICS3`:
  `<fake_token_around_image>`, `<global-img>`, `<row_R_col_C>`); without them the lookup yields
  -1 and the prompt cannot be evaluated. Their embedding rows are random (Q8_0, as SmolLM2's);
  every other tensor and key is copied, the chat template is SmolLM2's.
- `smolvlm-mmproj.gguf`: the projector, `general.architecture` `clip`, projector type
  `idefics3`, as small as libmtmd allows: 16-pixel tiles of 4-pixel patches (16 patches, shuffled
  2x2 into 4 embeddings per tile), 2 encoder layers of width 64, a 32-pixel longest edge, so an
  image becomes a grid of at most 2x2 tiles plus the whole image as an overview.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 32
TEXT_FILE = "smolvlm-text.gguf"
PROJECTOR_FILE = "smolvlm-mmproj.gguf"

ADDED_TOKENS = (
    "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)
"""SmolVLM's additions to SmolLM2's vocabulary (its tokenizer's added special tokens)."""


@dataclass(frozen=True)
class ProjectorShape:
    """The projector's hyperparameters (the `clip.vision.*` keys)."""

    text_width: int = 576  # SmolLM2-135M's n_embd: the projector's output
    tile: int = 16  # clip.vision.image_size: the encoder's input, in pixels
    patch: int = 4
    width: int = 64  # the encoder's hidden size
    heads: int = 2
    ffn: int = 128  # not `width`: libmtmd swaps up/down when ffn_down's rows are `width` long
    layers: int = 2
    scale: int = 2  # pixel shuffle: scale x scale patches become one embedding
    longest_edge: int = 32  # clip.vision.preproc_image_size: images are resized to this, then tiled

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile // self.patch // self.scale) ** 2


@dataclass(frozen=True)
class VisionModel:
    text: Path
    projector: Path
    shape: ProjectorShape


def write_vision_model(folder: Path, text_source: Path | None = None,
                       shape: ProjectorShape = ProjectorShape()) -> VisionModel:
    """Write the text model (from `text_source`, SmolLM2's file when None) and its projector into
    `folder`; deterministic (fixed seed)."""
    if text_source is None:
        from tests.conftest import smollm2_file

        text_source = smollm2_file()
    folder.mkdir(parents=True, exist_ok=True)
    text = write_text_model(text_source, folder / TEXT_FILE)
    projector = write_projector(folder / PROJECTOR_FILE, shape)
    return VisionModel(text, projector, shape)


def write_projector(dest: Path, shape: ProjectorShape = ProjectorShape(), seed: int = SEED) -> Path:
    """An Idefics3 projector GGUF of random weights, laid out as llama.cpp's converter writes
    SmolVLM's (conversion/smolvlm.py; tensor names in tools/mtmd/clip-impl.h, read by clip.cpp's
    `load_tensors`). Shapes are numpy's (rows, columns): ggml's reversed."""
    from gguf import GGMLQuantizationType, GGUFWriter, VisionProjectorType

    rng = np.random.default_rng(seed)
    s = shape
    n_patches = (s.tile // s.patch) ** 2

    def rand(*dims: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(dims) * std).astype(np.float32)

    tensors: dict[str, np.ndarray] = {
        "v.patch_embd.weight": rand(s.width, 3, s.patch, s.patch),  # a convolution, F32 as the converter forces
        "v.patch_embd.bias": rand(s.width),
        "v.position_embd.weight": rand(n_patches, s.width),
    }
    for i in range(s.layers):
        blk = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{blk}.{name}.weight"] = rand(s.width, s.width)
            tensors[f"{blk}.{name}.bias"] = rand(s.width)
        for name in ("ln1", "ln2"):
            tensors[f"{blk}.{name}.weight"] = 1 + rand(s.width)
            tensors[f"{blk}.{name}.bias"] = rand(s.width)
        tensors[f"{blk}.ffn_up.weight"] = rand(s.ffn, s.width)
        tensors[f"{blk}.ffn_up.bias"] = rand(s.ffn)
        tensors[f"{blk}.ffn_down.weight"] = rand(s.width, s.ffn)
        tensors[f"{blk}.ffn_down.bias"] = rand(s.width)
    tensors["v.post_ln.weight"] = 1 + rand(s.width)
    tensors["v.post_ln.bias"] = rand(s.width)
    # After the pixel shuffle each embedding is scale*scale patches wide; SmolVLM's connector
    # maps that to the text model's width (clip_n_mmproj_embd reads it from this tensor).
    tensors["mm.model.fc.weight"] = rand(s.text_width, s.width * s.scale * s.scale, std=0.5)

    writer = GGUFWriter(dest, arch="clip")
    writer.add_name("SmolVLM fixture projector (random weights)")
    writer.add_file_type(1)  # mostly F16, as the converter's default
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(VisionProjectorType.IDEFICS3)
    writer.add_vision_projection_dim(s.text_width)
    writer.add_vision_image_size(s.tile)
    writer.add_vision_patch_size(s.patch)
    writer.add_vision_embedding_length(s.width)
    writer.add_vision_feed_forward_length(s.ffn)
    writer.add_vision_block_count(s.layers)
    writer.add_vision_head_count(s.heads)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_vision_projector_scale_factor(s.scale)
    writer.add_vision_use_gelu(True)
    writer.add_vision_preproc_image_size(s.longest_edge)
    for name, data in tensors.items():
        if data.ndim == 2 and name != "v.position_embd.weight":
            # matrices in F16; vectors, the convolution and the position embeddings (added, not
            # multiplied: ggml's CPU add takes no F16 operand) in F32, as the converter writes them
            writer.add_tensor(name, data.astype(np.float16), raw_dtype=GGMLQuantizationType.F16)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def write_text_model(source: Path, dest: Path, seed: int = SEED) -> Path:
    """A copy of the GGUF `source` (SmolLM2) with `ADDED_TOKENS` at the end of its vocabulary,
    as control tokens with random embedding rows. SmolLM2 ties its output to `token_embd`, so
    that one tensor grows."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys, TokenType, quants

    reader = GGUFReader(source, "r")
    arch = str(reader.fields[Keys.General.ARCHITECTURE].contents())
    assert "output.weight" not in {t.name for t in reader.tensors}, "expects tied embeddings"
    writer = GGUFWriter(dest, arch=arch, endianess=reader.endianess)
    grown = {
        Keys.Tokenizer.LIST: list(ADDED_TOKENS),
        Keys.Tokenizer.TOKEN_TYPE: [int(TokenType.CONTROL)] * len(ADDED_TOKENS),
    }
    vocab_size = f"{arch}.vocab_size"
    for field in reader.fields.values():
        name = field.name
        if name == Keys.General.ARCHITECTURE or name.startswith("GGUF."):
            continue  # the writer writes these itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        value = field.contents()
        if name in grown:
            value = [*value, *grown[name]]
        elif name == vocab_size:
            value = int(value) + len(ADDED_TOKENS)
        writer.add_key_value(name, value, value_type, sub_type=sub_type)

    data = {}
    for tensor in reader.tensors:
        values = tensor.data
        if tensor.name == "token_embd.weight":
            n_embd = int(tensor.shape[0])
            rows = np.random.default_rng(seed).standard_normal((len(ADDED_TOKENS), n_embd)).astype(np.float32)
            rows *= float(np.std(quants.dequantize(values[:1024], tensor.tensor_type)))
            values = np.concatenate([values, quants.quantize(rows, tensor.tensor_type)])
        data[tensor.name] = (values, tensor.tensor_type)
    for name, (values, kind) in data.items():
        writer.add_tensor_info(name, values.shape, values.dtype, values.nbytes, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for values, _ in data.values():
        writer.write_tensor_data(values, tensor_endianess=reader.endianess)
    writer.close()
    return dest


def png_image(width: int, height: int, seed: int = SEED) -> bytes:
    """A PNG of random RGB pixels, written by hand (zlib): no image library needed."""
    import struct
    import zlib

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter type 0 per scanline

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
