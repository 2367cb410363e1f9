"""GGUF files built to hurt llama.cpp, for tests of what a bad model file may cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ABORTING_ARCH = "gemma-embedding"
"""The architecture `write_aborting_gguf` gives its file: one whose own hyperparameter
checks (`load_arch_hparams`) abort, which `check_gguf` does not mirror."""


def rewrite_gguf(
    source: Path,
    dest: Path,
    arch: str | None = None,
    keys: dict[str, tuple[Any, Any]] | None = None,
    tensors: dict[str, Any] | None = None,
) -> Path:
    """Write to `dest` a copy of the GGUF file `source` with changes, and return `dest`.

    `arch` renames the architecture and every `<old arch>.*` key with it; `keys` sets keys
    to (value, gguf.GGUFValueType) pairs, None removing a key; `tensors` gives tensors new
    types ({name: gguf.GGMLQuantizationType}, the data converted through F32). Every other
    key and tensor is copied unchanged, quantized data as raw bytes."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys, quants

    reader = GGUFReader(source, "r")
    old_arch = str(reader.fields[Keys.General.ARCHITECTURE].contents())
    new_arch = arch or old_arch
    changes = keys or {}
    writer = GGUFWriter(dest, arch=new_arch, endianess=reader.endianess)  # writes the architecture
    for field in reader.fields.values():
        name = field.name
        if name == Keys.General.ARCHITECTURE or name.startswith("GGUF."):
            continue  # GGUF.* are the header's own fields, which the writer writes itself
        if name.startswith(f"{old_arch}."):
            name = f"{new_arch}.{name.removeprefix(f'{old_arch}.')}"
        if name in changes:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    for name, (value, value_type) in changes.items():
        if value is not None:
            writer.add_key_value(name, value, value_type)

    retyped = tensors or {}
    data = {}
    for tensor in reader.tensors:
        if tensor.name in retyped:
            values = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            data[tensor.name] = (quants.quantize(values, retyped[tensor.name]), retyped[tensor.name])
        else:
            data[tensor.name] = (tensor.data, tensor.tensor_type)
    for tensor in reader.tensors:
        values, kind = data[tensor.name]
        writer.add_tensor_info(tensor.name, values.shape, values.dtype, values.nbytes, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(data[tensor.name][0], tensor_endianess=reader.endianess)
    writer.close()
    return dest


def write_aborting_gguf(source: Path, dest: Path) -> Path:
    """Write to `dest` a copy of the GGUF file `source` (SmolLM2 in the tests) that makes
    llama.cpp abort the process (SIGABRT) while it loads the model, yet passes `check_gguf`;
    return `dest`.

    The changes: the architecture is "gemma-embedding" (every `<arch>.*` key renamed with
    it), with the one key that architecture requires added (`attention.sliding_window`)
    and `gemma-embedding.dense_2_feat_in` set to 1, which is not the embedding length.
    Every generic check passes (`check_gguf` mirrors those of `load_hparams`), so the
    registry takes the file: `pull` registers it by path.

    What it trips: `llama_model_load_from_file` -> `load_hparams` -> the architecture's own
    `llama_model_gemma_embedding::load_arch_hparams` (src/models/gemma-embedding.cpp) runs

        GGML_ASSERT((hparams.dense_2_feat_in == 0 || hparams.dense_2_feat_in == hparams.n_embd)
                    && "dense_2_feat_in must be equal to n_embd");

    Architecture-specific asserts like this one (~150 architectures have their own) are
    what the registry's check does not mirror, and why a runner runs in its own process.

    Why an abort and not a clean failure: a bad value that llama.cpp checks with `throw`
    (a tensor of the wrong shape, `invalid n_rot`) is caught in `llama_model_load`, which
    returns NULL, and llama-cpp-python raises ValueError("Failed to load model from file").
    GGML_ASSERT throws nothing: `ggml_abort` prints the message (plus a backtrace unless
    GGML_NO_BACKTRACE is set) and calls `abort()`, so the process dies by SIGABRT
    (`returncode == -6` from subprocess) before Python gets control back. It dies while
    reading hyperparameters, before any tensor is loaded, so it is quick. Checked with
    llama-cpp-python 0.3.36.

    With `verbose=False` llama-cpp-python sends stderr to /dev/null during the load, so
    the assertion's message is seen only when loading with `verbose=True`.
    """
    from gguf import GGUFValueType

    return rewrite_gguf(source, dest, arch=ABORTING_ARCH, keys={
        f"{ABORTING_ARCH}.attention.sliding_window": (512, GGUFValueType.UINT32),
        f"{ABORTING_ARCH}.dense_2_feat_in": (1, GGUFValueType.UINT32),
    })
