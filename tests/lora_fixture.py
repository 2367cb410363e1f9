"""LoRA adapters for tests, written with the `gguf` package from a base model's own tensor list
(no adapter for the test models is published): `general.type` adapter, `adapter.type` lora, the
base's architecture, and for each targeted weight W (ggml shape [n_in, n_out]) a pair
`<name>.lora_a` [n_in, rank] and `<name>.lora_b` [rank, n_out], which llama.cpp adds to W's
product as scale * alpha / rank * B(A x). Zero B matrices make an adapter that changes nothing."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

TARGETS = ("attn_q", "attn_v", "ffn_down")
"""Which weights of each block the adapter touches."""


def write_adapter(base: Path, out: Path, rank: int = 8, zero: bool = False, seed: int = 0,
                  architecture: str | None = None) -> Path:
    """An adapter for `base` at `out`: random A and B (or zero B with `zero`), F32.
    `architecture` overrides the base's (for a mismatched adapter)."""
    reader = gguf.GGUFReader(base)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(out, architecture or arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        if not tensor.name.endswith(".weight") or tensor.name.split(".")[-2] not in TARGETS:
            continue
        n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])
        a = rng.normal(0, 0.2, (rank, n_in)).astype(np.float32)  # numpy's order: ggml's reversed
        b = np.zeros((n_out, rank), np.float32) if zero else rng.normal(0, 0.2, (n_out, rank)).astype(np.float32)
        writer.add_tensor(f"{tensor.name}.lora_a", a)
        writer.add_tensor(f"{tensor.name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
