"""What a GGUF file says about itself: the facts the registry keeps, read with the `gguf`
package's reader, and every metadata key for Ollama's `show`, read by walking the header."""

from __future__ import annotations

import mmap
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from myllm.errors import InvalidModelFile

GGUF_MAGIC = b"GGUF"
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
)


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


def check_magic(path: Path) -> None:
    """Cheap first check, so a non-GGUF file fails before the reader maps it."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc.strerror}") from exc
    if head != GGUF_MAGIC:
        raise InvalidModelFile(f"{path.name} is not a GGUF file (bad magic {head!r})")


def read_gguf_info(path: Path) -> GGUFInfo:
    """Raise `InvalidModelFile` for anything llama.cpp would refuse to map: bad magic,
    unparsable header, or tensor data running past the end of the file (a truncated copy)."""
    from gguf import GGUFReader

    check_magic(path)
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on garbage
        raise InvalidModelFile(f"{path.name} is not a readable GGUF file: {exc}") from exc

    file_size = path.stat().st_size
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > file_size:
            raise InvalidModelFile(
                f"{path.name} is truncated: tensor {tensor.name} ends past the end of the file"
            )

    def scalar(key: str) -> Any:
        fld = reader.fields.get(key)
        return None if fld is None else fld.contents()

    def token_text(index: Any) -> str | None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None or index is None or not 0 <= int(index) < len(tokens.data):
            return None
        return bytes(tokens.parts[tokens.data[int(index)]]).decode("utf-8", "replace")

    arch = scalar("general.architecture")
    if not arch:
        raise InvalidModelFile(f"{path.name} has no general.architecture")
    details = {
        suffix: value
        for suffix in _KEPT_SUFFIXES
        if (value := scalar(f"{arch}.{suffix}")) is not None
    }
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    vocab = details.get("vocab_size") or (len(tokens_field.data) if tokens_field else 0)
    param_count = sum(int(t.n_elements) for t in reader.tensors)
    return GGUFInfo(
        architecture=str(arch),
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


# GGUF value types (gguf.GGUFValueType) to struct formats; STRING (8) and ARRAY (9) are read apart.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


def read_gguf_kv(path: Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value, as Ollama's `show` lists them: a
    non-empty array (the tokenizer's tokens, scores, merges) is None, an empty one [].

    The header is walked here, skipping over arrays, instead of with `GGUFReader`, which
    builds every array element (~15 s for Gemma's 262k-token vocabulary). Raises
    `InvalidModelFile` for a header that runs past the end of the file or is not GGUF."""
    check_magic(path)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _KVWalk(data).read_all()
        except (struct.error, ValueError, KeyError, RecursionError) as exc:
            raise InvalidModelFile(f"{path.name} has an unreadable GGUF header: {exc}") from exc


class _KVWalk:
    """A cursor over a GGUF header's key/value section."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        # A version with its low half zero was written by a machine of the other byte order.
        self.order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
        self.offset = 4 + 4 + 8  # magic, version, tensor count

    def read_all(self) -> dict[str, Any]:
        count = self._unpack("Q")
        return {self._string(): self._value(self._unpack("I")) for _ in range(count)}

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        size = self._unpack("Q")
        end = self.offset + size
        if end > len(self.data):
            raise ValueError(f"a string of {size} bytes at offset {self.offset} ends past the end of the file")
        text = self.data[self.offset : end].decode("utf-8", "replace")
        self.offset = end
        return text

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item_kind, count = self._unpack("I"), self._unpack("Q")
            if item_kind in (_STRING, _ARRAY):
                for _ in range(count):
                    self._value(item_kind)
            else:
                self.offset += count * struct.calcsize(_SCALAR_FORMATS[item_kind])
            return None if count else []
        value = self._unpack(_SCALAR_FORMATS[kind])
        return _shortest_float32(value) if kind == _FLOAT32 else value


def _shortest_float32(value: float) -> float:
    """A float32 as it was written (1e-05), not as widened to a double (9.99999974737875e-06):
    the shortest decimal that reads back as the same float32."""
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", short))[0] == value:
            return short
    return value
