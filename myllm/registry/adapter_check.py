"""`check_adapter`: whether a GGUF is a LoRA adapter llama.cpp can apply to a given base model,
as far as the two headers tell (src/llama-adapter.cpp's checks, before any bytes are copied):
`general.type` adapter, `adapter.type` lora, the base's architecture, tensors in `.lora_a` /
`.lora_b` pairs of a weight the base has, with A [n_in, rank] and B [rank, n_out] for the base
weight's [n_in, n_out]. A mismatch is `InvalidModelFile` naming the adapter and the base, so a
wrong adapter is refused when a model is created, not when a request first loads it."""

from __future__ import annotations

from pathlib import Path

from myllm.registry.gguf_check import check_tensors, inspect_gguf
from myllm.registry.gguf_header import Header, HeaderError, shown_name


def check_adapter(path: Path, shown_as: str, base: Path, base_name: str) -> None:
    """Raise `InvalidModelFile` unless `path` is a LoRA adapter for the model file `base`."""
    def shapes(header: Header, _size: int) -> tuple[str, dict[str, tuple[int, ...]]]:
        return str(header.value("general.architecture") or ""), {t.name: t.dims for t in header.tensors}

    arch, weights = inspect_gguf(base, base_name, "a model llama.cpp can load", shapes)

    def check(header: Header, size: int) -> None:
        check_tensors(header, size)
        if header.value("general.type") != "adapter" or header.value("adapter.type") != "lora":
            raise HeaderError("it is not a LoRA adapter (general.type adapter, adapter.type lora)")
        if header.value("general.architecture") != arch:
            raise HeaderError(f"it is an adapter for architecture {header.value('general.architecture')!r}, "
                              f"and {base_name} is {arch!r}")
        pairs: dict[str, dict[str, tuple[int, ...]]] = {}
        for tensor in header.tensors:
            weight, _, part = tensor.name.rpartition(".")
            if part not in ("lora_a", "lora_b"):
                raise HeaderError(f"its tensor {shown_name(tensor.name)} is not a .lora_a or .lora_b matrix")
            pairs.setdefault(weight, {})[part] = tensor.dims
        if not pairs:
            raise HeaderError("it has no tensors")
        for weight, pair in pairs.items():
            if weight not in weights:
                raise HeaderError(f"it changes {shown_name(weight)}, which {base_name} does not have")
            if len(pair) != 2:
                raise HeaderError(f"its {shown_name(weight)} lacks its .lora_a or .lora_b matrix")
            w, a, b = weights[weight], pair["lora_a"], pair["lora_b"]
            if len(w) < 2 or len(a) != 2 or len(b) != 2 or a[0] != w[0] or b[1] != w[1] or a[1] != b[0]:
                raise HeaderError(f"its matrices for {shown_name(weight)} ({list(a)}, {list(b)}) do not fit "
                                  f"{base_name}'s {list(w)}")

    inspect_gguf(path, shown_as, f"a LoRA adapter for {base_name}", check)
