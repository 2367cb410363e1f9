"""A model's draft model for speculative decoding (Modelfile `DRAFT`, Ollama create's `draft`):
another registered chat model, loaded beside it to propose its next tokens (runtime/engine/
draft_model.py). Its drafts are token ids, so it must share the model's vocabulary: checked here,
at create, from both files' headers (the token count, the BOS and EOS ids and a hash of the whole
token list), so a mismatch is the creator's clear error rather than a load that fails later (the
runner checks again, from llama.cpp's own vocabularies)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from myllm.errors import InvalidOptions
from myllm.registry.gguf_check import inspect_gguf
from myllm.registry.gguf_header import Header

if TYPE_CHECKING:
    from myllm.registry.store import Registry

_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TokenList:
    count: int
    bos: int | None
    eos: int | None
    digest: str
    """sha256 of the token strings as the file stores them, in order."""


def token_list(path: Path, shown_as: str) -> TokenList:
    """The vocabulary facts of the GGUF at `path` (`InvalidModelFile` naming `shown_as` for a bad
    header). The strings are stepped over one by one, each length within the file (checked when
    the header was read)."""

    def read(header: Header, size: int) -> TokenList:
        field = header.fields.get("tokenizer.ggml.tokens")
        digest = hashlib.sha256()
        offset = field.offset if field is not None else 0
        for _ in range(field.count if field is not None else 0):
            (length,) = _U64.unpack_from(header.data, offset)
            digest.update(header.data[offset : offset + 8 + length])
            offset += 8 + length
        return TokenList(field.count if field is not None else 0, header.value("tokenizer.ggml.bos_token_id"),
                         header.value("tokenizer.ggml.eos_token_id"), digest.hexdigest())

    return inspect_gguf(path, shown_as, "a model llama.cpp can load", read)


def draft_columns(registry: Registry, base: Path, base_shown: str, draft: str) -> dict[str, Any]:
    """The model row's draft columns for the registered model named `draft`, once it is found a
    chat model whose vocabulary is that of the model file `base`; else `InvalidOptions` (field
    `draft`, a 400 in each API) saying what differs."""
    row = registry.find(draft)
    if row is None:
        raise InvalidOptions(f"the draft model {draft!r} is not a registered model: pull it first", field="draft")
    if row.kind != "chat":
        raise InvalidOptions(f"the draft model {draft!r} is an {row.kind} model, not a chat model", field="draft")
    mine, theirs = token_list(base, base_shown), token_list(registry.blob_file(row), row.name)
    differences = [f"{what} {b} where the model has {a}" for what, a, b in (
        ("tokens", mine.count, theirs.count), ("BOS id", mine.bos, theirs.bos), ("EOS id", mine.eos, theirs.eos))
        if a != b]
    if not differences and mine.digest != theirs.digest:
        differences.append("other token strings")
    if differences:
        raise InvalidOptions(f"the draft model {draft!r} has another vocabulary than the model ({'; '.join(differences)}):"
                             " a draft model must share its model's tokenizer", field="draft")
    return {"draft_digest": row.digest, "draft_size": row.size}
