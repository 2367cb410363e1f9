"""A multimodal model's projector (its `mmproj` GGUF, which llama.cpp's libmtmd loads beside the
text model) is checked here before it is registered, as `gguf_check` checks a model.

libmtmd (tools/mtmd/clip.cpp in the llama.cpp that llama-cpp-python 0.3.36 ships) refuses most
bad projector keys with an exception, which a runner reports as a failed load; what is checked
here is what would abort the runner instead, or what a user should hear at registration:
- the file is a GGUF whose tensors lie within it (`check_tensors`), of architecture `clip`,
  with a vision encoder (`clip.has_vision_encoder`: myllm takes images, not audio);
- every tensor libmtmd adds or multiplies element-wise onto its F32 activations is F32: the
  one-dimensional ones (biases, norm weights, layer scales), any that is not a `.weight` and the
  position embeddings (`build_vit`: `ggml_add(inp, learned_pos_embd)`). ggml's CPU add and mul
  abort on an F16 operand beside F32 (ggml-cpu/binary-ops.cpp, "unsupported types"), at the
  first image, after a load that went fine; llama.cpp's converter writes these F32 itself;
- the encoder's head count divides its width (clip.cpp divides by it, and reshapes by it);
- float keys are finite and at least 0 (`check_floats`: a negative norm epsilon is an assert);
- its projection width (`clip.vision.projection_dim`, which llama.cpp's converter writes as
  the text model's `n_embd`) is the text model's embedding width (`check_pairing`): libmtmd
  would refuse the pair at load (mtmd.cpp, "mismatch between text model and mmproj").
Not mirrored: the projector type's name (a newer llama.cpp knows more; an unknown one is
clip.cpp's clean "unknown projector type") and each type's own tensor set (a missing tensor is
its clean "unable to find tensor").
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

from myllm.errors import InvalidModelFile
from myllm.registry.gguf_check import check_floats, check_tensors, inspect_gguf
from myllm.registry.gguf_header import STRING, UINT32, Header, HeaderError, read_header, shown_name

ARCHITECTURE = "clip"
_BOOL = 7
_F32 = 0


@dataclass(frozen=True)
class ProjectorFacts:
    projection_dim: int | None
    """The width of the embeddings it writes into the text model, when the file says."""


def check_projector(path: Path, shown_as: str) -> ProjectorFacts:
    """`ProjectorFacts` of the projector at `path`, or `InvalidModelFile` naming `shown_as` and
    what is wrong (see the module's docstring). Reads the header only."""
    return inspect_gguf(path, shown_as, "a projector libmtmd can load", _check)


def check_pairing(facts: ProjectorFacts, text_width: int | None, projector: str, model: str) -> None:
    """A projector must write embeddings as wide as the text model's (`InvalidModelFile` naming both)."""
    if facts.projection_dim and text_width and facts.projection_dim != text_width:
        raise InvalidModelFile(
            f"the projector {projector} writes embeddings of {facts.projection_dim} values, but the model {model} "
            f"has an embedding width (n_embd) of {text_width}: the projector is not made for this model")


def is_projector(path: Path) -> bool:
    """Whether `path` is a GGUF of architecture `clip` (a projector, as Ollama's create tells a
    model's files apart); False for anything else, unreadable files included, which are then
    checked, and refused, as models."""
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            header = read_header(data)
            arch = header.fields.get("general.architecture")
            return arch is not None and arch.type == STRING and header.value("general.architecture", 64) == ARCHITECTURE
    except (OSError, ValueError):  # ValueError: a HeaderError, or an empty file (which mmap refuses)
        return False


def _check(header: Header, size: int) -> ProjectorFacts:
    field = header.fields.get("general.architecture")
    if field is None or field.type != STRING:
        raise HeaderError("it has no general.architecture")
    arch = header.value("general.architecture", max_string_bytes=64)
    if arch != ARCHITECTURE:
        raise HeaderError(f"its architecture is {shown_name(arch)}, where a projector's is {ARCHITECTURE}")
    vision = header.fields.get("clip.has_vision_encoder")
    if vision is None or vision.type != _BOOL or not header.value("clip.has_vision_encoder"):
        raise HeaderError("it has no vision encoder (clip.has_vision_encoder): myllm's models take images")
    check_tensors(header, size)
    _check_operands(header)
    width = _uint32(header, "clip.vision.embedding_length")
    heads = _uint32(header, "clip.vision.attention.head_count")
    if not width or not heads or width % heads:
        raise HeaderError(f"clip.vision.attention.head_count {heads} does not divide "
                          f"clip.vision.embedding_length {width}")
    check_floats(header)
    return ProjectorFacts(_uint32(header, "clip.vision.projection_dim") or None)


def _check_operands(header: Header) -> None:
    for tensor in header.tensors:
        if tensor.type == _F32:
            continue
        if len(tensor.dims) == 1 or not tensor.name.endswith(".weight") or "position_embd" in tensor.name:
            import gguf

            kind = gguf.GGMLQuantizationType(tensor.type).name  # a known type: check_tensors passed it
            raise HeaderError(f"tensor {shown_name(tensor.name)} is {kind}; libmtmd adds or multiplies it onto "
                              "F32 values, which ggml aborts on unless it is F32 (as llama.cpp's converter writes it)")


def _uint32(header: Header, key: str) -> int:
    field = header.fields.get(key)
    if field is None:
        return 0
    if field.type != UINT32:
        raise HeaderError(f"{key} is not a uint32")
    return int(header.value(key))
