"""A GGUF file's header (its keys and tensor infos) read in time and memory bounded by the
file's size, for files nobody has checked yet.

Every count and length the header declares is checked against the bytes left in the file
before anything is read or set aside for it, so a 99-byte file that declares a 2^40-element
array is refused at once (the `gguf` package's reader walks such an array past the end of
the file, growing without end). Fixed-size arrays are stepped over by arithmetic, string
arrays by one step per string, so the walk is bounded by the file's size; string values are
decoded only when asked for. Errors (`HeaderError`) never quote the file's bytes.

The limits are llama.cpp's own (ggml/src/gguf.cpp, `gguf_init_from_file_impl`) where it has
them, plus caps on how many keys and tensors a header may declare (each becomes a Python
object here, and real models have under a hundred keys and a few thousand tensors) and on
the strings in one array (each is a step of a Python loop).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # gguf.cpp: v1 "is no longer supported", above GGUF_VERSION (3) unknown
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
MAX_NAME_BYTES = 63  # a tensor name must be shorter than GGML_MAX_NAME (64)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING_BYTES = 1 << 30  # GGUF_MAX_STRING_LENGTH
MAX_KEY_BYTES = 1024
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
MAX_ARRAY_STRINGS = 1 << 22
"""Strings are stepped over one by one (~0.1 s a million here): 16 times Gemma 3's 262k-token
vocabulary, the largest real one known, where llama.cpp allows 2^30."""

# GGUF value types (gguf.GGUFValueType) to struct formats; STRING and ARRAY are read apart.
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
UINT32, FLOAT32, STRING, ARRAY = 4, 6, 8, 9
_U32, _U64, _I64 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<q")
# The fewest bytes a key/value pair (key length, type, a one-byte value) and a tensor info
# (name length, n_dims, type, offset) can take: what a declared count is checked against.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


class HeaderError(ValueError):
    """What is wrong with a header, in words that quote none of the file's bytes."""


@dataclass(frozen=True)
class Field:
    """One key's value, where it lies: `offset` is the start of a number, of a string's
    length, or of an array's first element."""

    type: int
    offset: int
    item_type: int | None = None
    count: int = 1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    type: int
    offset: int
    """From the start of the data section, as the file gives it."""


@dataclass(frozen=True)
class Header:
    version: int
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int
    """Where the data section starts: the end of the tensor infos, padded to `alignment`."""
    data: mmap.mmap | bytes

    def value(self, key: str, max_string_bytes: int = MAX_STRING_BYTES) -> Any:
        """A scalar key's value (a string decoded, a longer one than `max_string_bytes` is a
        `HeaderError`); None for a key the file lacks or an array."""
        field = self.fields.get(key)
        if field is None or field.type == ARRAY:
            return None
        if field.type != STRING:
            return struct.unpack_from("<" + SCALAR_FORMATS[field.type], self.data, field.offset)[0]
        (size,) = _U64.unpack_from(self.data, field.offset)
        if size > max_string_bytes:
            raise HeaderError(f"the value of {shown_name(key)} is {size} bytes long, more than {max_string_bytes}")
        start = field.offset + 8
        return self.data[start : start + size].decode("utf-8", "replace")

    def numbers(self, key: str) -> list[int | float]:
        """The elements of an array of numbers (`count` checked against the file's size
        when the header was read), for the short per-layer arrays a few keys hold."""
        field = self.fields[key]
        assert field.item_type is not None and field.item_type in SCALAR_FORMATS
        fmt = f"<{field.count}{SCALAR_FORMATS[field.item_type]}"
        return list(struct.unpack_from(fmt, self.data, field.offset))


def shown_name(name: str) -> str:
    """A key or tensor name as an error may show it: quoted when it is short plain text (as
    every real one is), else described, so no message carries arbitrary bytes of a file."""
    if 0 < len(name) <= MAX_NAME_BYTES and name.isascii() and all(c.isalnum() or c in "._-" for c in name):
        return repr(name)
    return "(a name that is not plain text)"


def read_header(data: mmap.mmap | bytes) -> Header:
    """The header of the GGUF file whose bytes are `data`; `HeaderError` for anything that is
    not a GGUF header llama.cpp would read, or that runs past the end of the file."""
    if len(data) < 4 or data[:4] != GGUF_MAGIC:
        raise HeaderError("it is not a GGUF file (it does not start with the GGUF magic)")
    try:
        return _Walk(data).header()
    except struct.error:
        raise HeaderError("its header runs past the end of the file") from None


class _Walk:
    """A cursor over a header, checking every length before it reads."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data = data
        self.pos = 4

    def header(self) -> Header:
        version = self._u32()
        if version and not version & 0xFFFF:
            raise HeaderError("it was written on a big-endian machine (llama.cpp reads only little-endian GGUF)")
        if version not in SUPPORTED_VERSIONS:
            raise HeaderError(f"GGUF version {version} is not one llama.cpp reads (2 or 3)")
        n_tensors = self._count("tensors", _I64, _MIN_TENSOR_INFO_BYTES, MAX_TENSORS)
        n_kv = self._count("keys", _I64, _MIN_KV_BYTES, MAX_KEYS)
        fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = self._key()
            if key in fields:
                raise HeaderError(f"the key {shown_name(key)} appears twice")
            fields[key] = self._field(key)
        alignment = self._alignment(fields)
        tensors = [self._tensor_info() for _ in range(n_tensors)]
        if len({t.name for t in tensors}) != len(tensors):
            raise HeaderError("two tensors have the same name")
        data_start = -(-self.pos // alignment) * alignment if tensors else self.pos
        return Header(version, fields, tensors, alignment, data_start, self.data)

    def _remaining(self) -> int:
        return len(self.data) - self.pos

    def _u32(self) -> int:
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def _count(self, what: str, fmt: struct.Struct, min_bytes: int, cap: int) -> int:
        (count,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        if count < 0 or count * min_bytes > self._remaining():
            raise HeaderError(f"it declares {count} {what}, more than its {len(self.data)} bytes can hold")
        if count > cap:
            raise HeaderError(f"it declares {count} {what}, more than the {cap} a model may have")
        return int(count)

    def _string_size(self, what: str, cap: int) -> int:
        (size,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        if size > self._remaining():
            raise HeaderError(f"{what} of {size} bytes runs past the end of the file")
        if size > cap:
            raise HeaderError(f"{what} is {size} bytes long, more than {cap}")
        return int(size)

    def _key(self) -> str:
        size = self._string_size("a key", MAX_KEY_BYTES)
        if not size:
            raise HeaderError("a key is empty")
        key = self.data[self.pos : self.pos + size].decode("utf-8", "replace")
        self.pos += size
        return key

    def _field(self, key: str) -> Field:
        kind = self._u32()
        if kind != ARRAY:
            field = Field(kind, self.pos)
            self._skip(key, kind, 1)
            return field
        item_type = self._u32()
        (count,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        field = Field(ARRAY, self.pos, item_type, int(count))
        self._skip(key, item_type, count)
        return field

    def _skip(self, key: str, kind: int, count: int) -> None:
        """Step over `count` values of type `kind`: fixed-size ones at once, strings one by one."""
        if kind == STRING:
            self._skip_strings(key, count)
            return
        if kind not in SCALAR_FORMATS:
            raise HeaderError(f"the key {shown_name(key)} has an invalid value type {kind}")
        size = count * struct.calcsize(SCALAR_FORMATS[kind])
        if size > self._remaining():
            items = f" ({count} items)" if count != 1 else ""
            raise HeaderError(f"the value of {shown_name(key)}{items} runs past the end of the file")
        self.pos += size

    def _skip_strings(self, key: str, count: int) -> None:
        """The one loop whose length the file sets (a vocabulary: 262k strings for Gemma 3),
        kept tight; `count` is bounded by the file's size first, at 8 bytes a string."""
        if count * 8 > self._remaining():
            raise HeaderError(f"the array {shown_name(key)} declares {count} strings, more than the file holds")
        if count > MAX_ARRAY_STRINGS:
            raise HeaderError(f"the array {shown_name(key)} declares {count} strings, more than {MAX_ARRAY_STRINGS}")
        data, pos, end, unpack = self.data, self.pos, len(self.data), _U64.unpack_from
        for _ in range(count):
            pos += 8 + unpack(data, pos)[0]
            if pos > end:
                raise HeaderError(f"a string in {shown_name(key)} runs past the end of the file")
        self.pos = pos

    def _alignment(self, fields: dict[str, Field]) -> int:
        field = fields.get("general.alignment")
        if field is None:
            return DEFAULT_ALIGNMENT
        if field.type != UINT32:
            raise HeaderError("general.alignment is not a uint32")
        (alignment,) = _U32.unpack_from(self.data, field.offset)
        if not alignment or alignment & (alignment - 1):
            raise HeaderError(f"general.alignment {alignment} is not a power of 2")
        return int(alignment)

    def _tensor_info(self) -> TensorInfo:
        size = self._string_size("a tensor name", MAX_NAME_BYTES)
        name = self.data[self.pos : self.pos + size].decode("utf-8", "replace")
        self.pos += size
        n_dims = self._u32()
        if n_dims > MAX_DIMS:
            raise HeaderError(f"tensor {shown_name(name)} has {n_dims} dimensions, more than {MAX_DIMS}")
        dims = struct.unpack_from(f"<{n_dims}q", self.data, self.pos)
        self.pos += 8 * n_dims
        kind = self._u32()
        (offset,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return TensorInfo(name, dims, kind, int(offset))
