"""What a GGUF file says about itself: the facts the registry keeps, read with the `gguf`
package's reader, and every metadata key for Ollama's `show`, read by walking the header."""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from myllm.errors import InvalidModelFile
from myllm.registry.gguf_check import check_gguf
from myllm.registry.gguf_header import ARRAY, FLOAT32, Field, Header, read_header

# Scalar keys worth keeping for `show` and for the runtime's memory estimate.
_KEPT_SUFFIXES = (
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "rope.freq_base",
    "vocab_size",
    "pooling_type",
    "attention.causal",
)

RANK_POOLING = 4
"""llama.cpp's `LLAMA_POOLING_TYPE_RANK`: a cross-encoder's score from its classifier head."""

CLASSIFIER_HEAD = "cls.output.weight"
"""The tensor a BERT-family cross-encoder (bge-reranker, jina-reranker) carries; its converter
writes no pooling type, so this is how such a reranker is known (llama-server is told with
`--rerank`)."""


def model_kind(details: dict[str, Any], tensor_names: set[str]) -> str:
    """What a GGUF is for, from its metadata: `reranking` (rank pooling, or a classifier head),
    `embedding` (a pooling type, or an encoder: bidirectional attention), else `chat`."""
    pooling = details.get("pooling_type")
    if pooling == RANK_POOLING or CLASSIFIER_HEAD in tensor_names:
        return "reranking"
    if pooling or details.get("attention.causal") is False:
        return "embedding"
    return "chat"


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    name: str | None
    parameter_count: int
    size_label: str
    quantization: str
    context_length: int
    embedding_length: int | None
    vocab_size: int
    chat_template: str | None
    license: str | None
    bos_token: str | None
    eos_token: str | None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_label(count: int) -> str:
    """Human parameter count as model cards write it: 135M, 1.5B, 8B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            text = f"{value:.0f}" if value >= 10 or value.is_integer() else f"{value:.1f}"
            return f"{text}{unit}"
    return str(count)


def quantization_name(file_type: int | None) -> str:
    import gguf

    if file_type is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"type-{file_type}"


def read_gguf_info(path: Path, shown_as: str) -> GGUFInfo:
    """The registry's facts about a GGUF file, after `check_gguf` (which raises
    `InvalidModelFile` naming `shown_as`) has passed it: the `gguf` package's reader is
    never given a file that could send it past the end of the file."""
    from gguf import GGUFReader

    check_gguf(path, shown_as)
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on garbage
        raise InvalidModelFile(f"{shown_as} is not a readable GGUF file: {exc}") from exc

    def scalar(key: str) -> Any:
        fld = reader.fields.get(key)
        return None if fld is None else fld.contents()

    def token_text(index: Any) -> str | None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None or index is None or not 0 <= int(index) < len(tokens.data):
            return None
        return bytes(tokens.parts[tokens.data[int(index)]]).decode("utf-8", "replace")

    arch = str(scalar("general.architecture"))
    details = {
        suffix: value
        for suffix in _KEPT_SUFFIXES
        if (value := scalar(f"{arch}.{suffix}")) is not None
    }
    if (split := tensor_bytes(reader.tensors, int(details.get("block_count") or 0))) is not None:
        details["tensor_bytes"] = split
    details["kind"] = model_kind(details, {t.name for t in reader.tensors})
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    vocab = details.get("vocab_size") or (len(tokens_field.data) if tokens_field else 0)
    param_count = sum(int(t.n_elements) for t in reader.tensors)
    return GGUFInfo(
        architecture=arch,
        name=scalar("general.name"),
        parameter_count=param_count,
        size_label=scalar("general.size_label") or size_label(param_count),
        quantization=quantization_name(scalar("general.file_type")),
        context_length=int(details.get("context_length") or 0),
        embedding_length=details.get("embedding_length"),
        vocab_size=int(vocab),
        chat_template=scalar("tokenizer.chat_template"),
        license=scalar("general.license"),
        bos_token=token_text(scalar("tokenizer.ggml.bos_token_id")),
        eos_token=token_text(scalar("tokenizer.ggml.eos_token_id")),
        details=details,
    )


_LAYER = re.compile(r"blk\.(\d+)\.")


def tensor_bytes(tensors: Any, n_layers: int) -> dict[str, Any] | None:
    """The weights' bytes as llama.cpp places them by layer, for splitting a model between the
    CPU and a GPU (runtime/placement/memory.py): `input` (the token embeddings, always on the CPU),
    `layers` (each repeating layer's `blk.N.*` tensors), `output` (the other tensors: the
    output norm and matrix) and `tied` (no output matrix of its own: llama.cpp uses the
    embeddings, and copies them to a GPU that runs the output layer, so `output` counts them).
    None for a file whose tensors do not follow that naming."""
    layers = [0] * n_layers
    embed = output = 0
    has_output = False
    for t in tensors:
        size = int(t.n_bytes)
        if t.name == "token_embd.weight":
            embed += size
        elif (m := _LAYER.match(t.name)) is not None:
            if int(m.group(1)) >= n_layers:
                return None
            layers[int(m.group(1))] += size
        else:
            output += size
            has_output = has_output or t.name == "output.weight"
    if not embed or not n_layers:
        return None
    return {"input": embed, "layers": layers, "output": output + (0 if has_output else embed), "tied": not has_output}


def read_gguf_kv(path: Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value, as Ollama's `show` lists them: a
    non-empty array (the tokenizer's tokens, scores, merges) is None, an empty one [].

    The header is walked (`read_header`), skipping over arrays, instead of read with
    `GGUFReader`, which builds every array element (~15 s for Gemma's 262k-token
    vocabulary). Raises `InvalidModelFile` for a header that is not GGUF or runs past the
    end of the file."""
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            header = read_header(data)
            return {key: _shown_value(header, key, fld) for key, fld in header.fields.items()}
    except ValueError as exc:  # a HeaderError, or an empty file (which mmap refuses)
        raise InvalidModelFile(f"{path.name} has an unreadable GGUF header: {exc}") from exc


def _shown_value(header: Header, key: str, fld: Field) -> Any:
    if fld.type == ARRAY:
        return None if fld.count else []
    value = header.value(key)
    return _shortest_float32(value) if fld.type == FLOAT32 else value


def _shortest_float32(value: float) -> float:
    """A float32 as it was written (1e-05), not as widened to a double (9.99999974737875e-06):
    the shortest decimal that reads back as the same float32."""
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", short))[0] == value:
            return short
    return value
