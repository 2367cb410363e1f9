"""Every GGUF is checked here before it is registered, so no file reaches llama.cpp that
makes it loop, run out of memory, or abort the process.

llama.cpp trusts a model file: many bad values are not errors it reports but `GGML_ASSERT`s,
which abort the whole process (`block_count` 0, `expert_count` 5000, an unknown
`rope.scaling.type`, a norm weight stored as Q8_0), and the `gguf` package's reader walks
a declared 2^40-element array past the end of the file. So the header is read with bounded
work (`gguf_header`), every tensor is checked to lie within the file, and the
hyperparameters llama.cpp asserts on for every architecture are checked against its
limits. The limits are those of the llama.cpp that llama-cpp-python 0.3.36 ships (files
named below are in its source); architecture-specific asserts (`load_arch_hparams` of
~150 architectures) are not all mirrored: a runner that aborts costs only its own process.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from contextlib import nullcontext
from math import prod
from pathlib import Path
from typing import TypeVar

from myllm.errors import InvalidModelFile
from myllm.registry.gguf_header import ARRAY, FLOAT32, STRING, UINT32, Header, HeaderError, read_header, shown_name

T = TypeVar("T")

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS, src/llama-hparams.h
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS, src/llama-hparams.h
MAX_CONTEXT = 1 << 24
"""Not a llama.cpp limit (it reads a uint32 and breaks past 2^31-1, where the context size
turns negative), but above the largest real one: Llama 4 Scout's 10M tokens."""
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES, src/llama-model.cpp
_INT_ARRAY_TYPES = (UINT32, 5, 7)  # uint32, int32, bool: what `get_arr` reads into a uint32 array
_FLOAT_TYPES = (FLOAT32, 12)  # float32, float64
MAX_FLOAT_ARRAY = 4096
"""Float hyperparameter arrays hold one value per layer (at most 512); llama.cpp's `get_arr`
throws (a clean load failure, no abort) on a longer one, so a longer one is not read here."""
SIGNED_FLOATS = {
    "activation_sparsity_scale": "Gemma 3n: -inf is the normal quantile of a layer without sparsity",
    "rope.scaling.yarn_ext_factor": "a negative value asks llama.cpp to derive it",
    "xielu.alpha_n": "Apertus' xIELU activation parameters",
    "xielu.alpha_p": "Apertus' xIELU activation parameters",
    "xielu.beta": "Apertus' xIELU activation parameters",
    "xielu.eps": "Apertus' xIELU activation: -1e-6",
}
"""Float hyperparameters whose real values may be negative or infinite (by key without the
architecture's prefix); every other must be a finite number of at least 0."""


def _architectures() -> frozenset[str]:
    """The names in llama.cpp's LLM_ARCH_NAMES (src/llama-arch.cpp) as the `gguf` package
    mirrors them, less "clip": llama.cpp refuses it as a main model ("use it with --mmproj")."""
    import gguf

    return frozenset(gguf.MODEL_ARCH_NAMES.values()) - {"clip"}


def check_gguf(path: Path, shown_as: str) -> None:
    """Raise `InvalidModelFile` with one line naming `shown_as` (the file as the user knows
    it, never a temp or blob path) and what is wrong, unless `path` is a GGUF model that
    llama.cpp can load as far as its header tells. Reads the header only: well under a
    second for any real model, and bounded by the file's size for a hostile one."""

    def check(header: Header, size: int) -> None:
        check_tensors(header, size)
        _check_hyperparameters(header)
        check_floats(header)

    inspect_gguf(path, shown_as, "a model llama.cpp can load", check)


def inspect_gguf(path: Path, shown_as: str, what: str, check: Callable[[Header, int], T]) -> T:
    """`check(header, file size)` over the header of the GGUF at `path`, its `HeaderError` (or an
    unreadable file) raised as `InvalidModelFile`: "<shown_as> is not <what>: <reason>"."""
    shown = shown_as if shown_as.isprintable() else repr(shown_as)  # one line, whatever the name
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else nullcontext(b"") as data:
                return check(read_header(data), size)
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {shown}: {exc.strerror}") from exc
    except HeaderError as exc:
        raise InvalidModelFile(f"{shown} is not {what}: {exc}") from exc


def check_tensors(header: Header, file_size: int) -> None:
    """Each tensor as ggml/src/gguf.cpp reads it (known type, rows of whole blocks, data laid
    out back to back from the start of the data section, each at an aligned offset), with
    every dimension at least 1 (llama-model-loader.cpp asserts it) and its bytes inside the
    file. Norm weights and biases must be F32: ggml's CPU MUL and ADD abort on any other
    type beside F32 activations (ggml-cpu/binary-ops.cpp, "unsupported types")."""
    import gguf

    expected = 0
    for tensor in header.tensors:
        name = shown_name(tensor.name)
        if not 1 <= len(tensor.dims) <= 4:
            raise HeaderError(f"tensor {name} has {len(tensor.dims)} dimensions (1 to 4 are possible)")
        if min(tensor.dims) < 1:
            raise HeaderError(f"tensor {name} has a dimension of {min(tensor.dims)} (each must be at least 1)")
        try:
            kind = gguf.GGMLQuantizationType(tensor.type)
            block, type_size = gguf.GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise HeaderError(f"tensor {name} has type {tensor.type}, which is no ggml type") from None
        if tensor.dims[0] % block:
            raise HeaderError(
                f"tensor {name} has rows of {tensor.dims[0]} values, not whole {kind.name} blocks of {block}")
        if tensor.name.endswith(("norm.weight", ".bias")) and kind != gguf.GGMLQuantizationType.F32:
            raise HeaderError(f"tensor {name} is {kind.name}; llama.cpp needs norm weights and biases in F32")
        if tensor.offset % header.alignment:
            raise HeaderError(f"tensor {name} starts at offset {tensor.offset}, not a multiple of {header.alignment}")
        if tensor.offset != expected:
            raise HeaderError(f"tensor {name} starts at offset {tensor.offset}, where {expected} was expected "
                              "(tensors lie back to back, in order)")
        nbytes = prod(tensor.dims) // block * type_size
        if header.data_start + tensor.offset + nbytes > file_size:
            raise HeaderError(f"tensor {name} ends past the end of the file (a truncated copy?)")
        expected = tensor.offset + -(-nbytes // header.alignment) * header.alignment


def _check_hyperparameters(header: Header) -> None:
    """The checks `llama_model_base::load_hparams` (src/llama-model.cpp) makes with
    GGML_ASSERT for every architecture, and the values that would give a tensor a dimension
    of 0 (`create_tensor` asserts each is at least 1)."""
    arch_field = header.fields.get("general.architecture")
    if arch_field is None or arch_field.type != STRING:
        raise HeaderError("it has no general.architecture")
    arch = header.value("general.architecture", max_string_bytes=64)
    if arch == "clip":
        raise HeaderError("it is a multimodal projector (architecture clip), not a model: give it beside its model "
                          "(a second FROM line, or a second file of Ollama's create)")
    if arch not in _architectures():
        raise HeaderError(f"its architecture {shown_name(arch)} is not one llama.cpp knows")
    hp = _Keys(header, arch)

    n_layer = hp.required("block_count")
    if not 1 <= n_layer <= MAX_LAYERS:
        raise HeaderError(f"{arch}.block_count is {n_layer}; llama.cpp takes 1 to {MAX_LAYERS} layers")
    n_ctx = hp.required("context_length")
    if not 1 <= n_ctx <= MAX_CONTEXT:
        raise HeaderError(f"{arch}.context_length is {n_ctx}; it must be 1 to {MAX_CONTEXT}")
    n_embd = hp.required("embedding_length")
    if n_embd < 1:
        raise HeaderError(f"{arch}.embedding_length is 0")
    if (nextn := hp.uint32("nextn_predict_layers")) > n_layer:
        raise HeaderError(f"{arch}.nextn_predict_layers is {nextn}, more than its {n_layer} layers")
    _check_experts(hp, n_layer)
    _check_heads(hp, n_layer, n_embd)
    rope = header.fields.get(f"{arch}.rope.scaling.type")
    if rope is not None and (rope.type != STRING or hp.string("rope.scaling.type") not in ROPE_SCALING_TYPES):
        raise HeaderError(f"{arch}.rope.scaling.type is not one of {', '.join(ROPE_SCALING_TYPES)}")


def _check_experts(hp: _Keys, n_layer: int) -> None:
    arch = hp.arch
    n_expert = hp.uint32("expert_count")
    if n_expert > MAX_EXPERTS:
        raise HeaderError(f"{arch}.expert_count is {n_expert}; llama.cpp takes at most {MAX_EXPERTS}")
    used = max(hp.per_layer("expert_used_count", n_layer) or [0])
    groups = hp.uint32("expert_group_count")
    if not n_expert:
        if used or groups:
            raise HeaderError(f"{arch}.expert_used_count or expert_group_count is set, but the model has no experts")
        return
    if not 1 <= used <= n_expert:
        raise HeaderError(f"{arch}.expert_used_count is {used}; with {n_expert} experts it must be 1 to {n_expert}")
    if groups >= n_expert:
        raise HeaderError(f"{arch}.expert_group_count is {groups}, not fewer than its {n_expert} experts")
    if groups > 1:
        group_used = hp.uint32("expert_group_used_count")
        if n_expert % groups or not 0 < group_used < groups:
            raise HeaderError(f"{arch}.expert_group_count {groups} does not divide its {n_expert} experts, "
                              f"or expert_group_used_count {group_used} is not 1 to {groups - 1}")


def _check_heads(hp: _Keys, n_layer: int, n_embd: int) -> None:
    """A layer with attention needs 1 to n_head KV heads dividing n_head (attention's
    broadcast asserts it), and a head size of at least 1: without `attention.key_length`
    it is n_embd / n_head."""
    heads = hp.per_layer("attention.head_count", n_layer) or [0] * n_layer
    heads_kv = hp.per_layer("attention.head_count_kv", n_layer) or heads
    if heads[0] and not hp.has("attention.key_length") and n_embd < heads[0]:
        raise HeaderError(f"{hp.arch}.attention.head_count {heads[0]} is more than embedding_length {n_embd}")
    for key in ("attention.key_length", "attention.value_length"):
        if heads[0] and hp.has(key) and hp.uint32(key) == 0:
            raise HeaderError(f"{hp.arch}.{key} is 0")
    for n_head, n_head_kv in zip(heads, heads_kv, strict=True):
        if n_head and not (0 < n_head_kv <= n_head and n_head % n_head_kv == 0):
            raise HeaderError(f"{hp.arch}.attention.head_count_kv {n_head_kv} is not a divisor of head_count {n_head}")


def check_floats(header: Header) -> None:
    """Every float hyperparameter (any key but the `general.*` metadata and the `tokenizer.*`
    vocabulary, a number or an array of them) must be a number, and finite and at least 0
    unless `SIGNED_FLOATS` names it: epsilons, rope bases and scales, softcapping and the other
    scales are read by ggml's operations at run time, where a NaN or negative epsilon fails
    `GGML_ASSERT(eps >= 0.0f)` on every request, after the model has loaded fine."""
    arch = str(header.value("general.architecture", max_string_bytes=64))
    for key, field in header.fields.items():
        kind = field.item_type if field.type == ARRAY else field.type
        if kind not in _FLOAT_TYPES or key.startswith(("general.", "tokenizer.")):
            continue
        if field.type == ARRAY and field.count > MAX_FLOAT_ARRAY:
            continue
        values = header.numbers(key) if field.type == ARRAY else [header.value(key)]
        signed = key.removeprefix(f"{arch}.") in SIGNED_FLOATS
        for value in values:
            if math.isnan(value) or not signed and (math.isinf(value) or value < 0):
                raise HeaderError(f"{shown_name(key)} is {value:g}; a hyperparameter must be a finite number, at least 0")


class _Keys:
    """`<arch>.*` keys read as llama.cpp's `get_key` reads them: of the exact type, else refused."""

    def __init__(self, header: Header, arch: str) -> None:
        self.header = header
        self.arch = arch

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.header.fields

    def string(self, key: str) -> str:
        return str(self.header.value(f"{self.arch}.{key}", max_string_bytes=64))

    def required(self, key: str) -> int:
        if not self.has(key):
            raise HeaderError(f"it has no {self.arch}.{key}")
        return self.uint32(key)

    def uint32(self, key: str, default: int = 0) -> int:
        name = f"{self.arch}.{key}"
        field = self.header.fields.get(name)
        if field is None:
            return default
        if field.type != UINT32:
            raise HeaderError(f"{name} is not a uint32")
        return int(self.header.value(name))

    def per_layer(self, key: str, n_layer: int) -> list[int] | None:
        """One value per layer, from a value for all of them or an array (`get_key_or_arr`)."""
        name = f"{self.arch}.{key}"
        field = self.header.fields.get(name)
        if field is None:
            return None
        if field.type != ARRAY:
            return [self.uint32(key)] * n_layer
        if field.item_type not in _INT_ARRAY_TYPES or field.count != n_layer:
            raise HeaderError(f"{name} is not a uint32 or an array of one integer per layer ({n_layer})")
        return [int(v) & 0xFFFFFFFF for v in self.header.numbers(name)]
