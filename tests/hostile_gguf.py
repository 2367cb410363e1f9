"""GGUF files built to hurt llama.cpp, for tests of what a bad model file may cost."""

from __future__ import annotations

from pathlib import Path

UNKNOWN_ROPE_SCALING = "not-a-rope-scaling-type"
"""The value `write_aborting_gguf` gives `<arch>.rope.scaling.type`: no scaling type has it."""


def write_aborting_gguf(source: Path, dest: Path) -> Path:
    """Write to `dest` a copy of the GGUF file `source` that makes llama.cpp abort the process
    (SIGABRT) while it loads the model; return `dest`.

    The one change: the key `<arch>.rope.scaling.type` (`llama.rope.scaling.type` for
    SmolLM2) is set to the string "not-a-rope-scaling-type", added if `source` lacks it.
    Every other key and every tensor (info and data) is copied unchanged, so the `gguf`
    reader, `read_gguf_info` and `Registry.register` accept the file like the original: `pull`
    registers it by path.

    What it trips: `llama_model_load_from_file` -> `llama_model_base::load_hparams`
    (src/llama-model.cpp, generic to every architecture) maps the string with
    `llama_rope_scaling_type_from_string`, which returns `LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED`
    for a name it does not know, and then runs

        GGML_ASSERT(hparams.rope_scaling_type_train != LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED);

    Why an abort and not a clean failure: a bad value that llama.cpp checks with `throw`
    (a tensor of the wrong shape, `invalid n_rot`, a bad `head_count_kv`) is caught in
    `llama_model_load`, which returns NULL, and llama-cpp-python raises ValueError("Failed
    to load model from file"). GGML_ASSERT throws nothing: `ggml_abort` prints the message
    (plus a backtrace unless GGML_NO_BACKTRACE is set) and calls `abort()`, so the process
    dies by SIGABRT (`returncode == -6` from subprocess) before Python gets control back.
    It dies while reading hyperparameters, before any tensor is loaded, so it is quick.
    Checked with llama-cpp-python 0.3.36.

    With `verbose=False` llama-cpp-python sends stderr to /dev/null during the load, so
    the assertion's message is seen only when loading with `verbose=True`.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

    reader = GGUFReader(source, "r")
    arch = str(reader.fields[Keys.General.ARCHITECTURE].contents())
    changed = Keys.Rope.SCALING_TYPE.format(arch=arch)

    writer = GGUFWriter(dest, arch=arch, endianess=reader.endianess)  # writes the architecture
    for field in reader.fields.values():
        if field.name in (Keys.General.ARCHITECTURE, changed) or field.name.startswith("GGUF."):
            continue  # GGUF.* are the header's own fields, which the writer writes itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_key_value(changed, UNKNOWN_ROPE_SCALING, GGUFValueType.STRING)

    for tensor in reader.tensors:  # quantized data as raw bytes: no conversion, same offsets
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return dest
