"""Run HERE (prepare.sh does): copy every metadata key/value of a real GGUF into a GGUF with no
tensors (model_meta.gguf), and record its tensors' names, shapes and types (model_tensors.json),
from which make_model.py writes a model of the same shape on the GPU machine.

    python make_meta.py REAL.gguf OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter


def field_value(field):
    """(value, vtype, sub_type) of a reader field, strings kept as raw bytes."""
    vtype = GGUFValueType(field.types[0])
    if vtype == GGUFValueType.ARRAY:
        sub = GGUFValueType(field.types[-1])
        if len(field.types) != 2:
            raise ValueError(f"{field.name}: nested arrays are not supported")
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], vtype, sub
        return field.contents(), vtype, sub
    if vtype == GGUFValueType.STRING:
        return bytes(field.parts[-1]), vtype, None
    return field.contents(), vtype, None


def main() -> None:
    src, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out_dir / "model_meta.gguf", arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val, vtype, sub = field_value(field)
        writer.add_key_value(key, val, vtype, sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    tensors = [
        {"name": t.name, "shape": [int(x) for x in t.shape], "ggml_type": t.tensor_type.name,
         "n_elements": int(t.n_elements), "n_bytes": int(t.n_bytes)}
        for t in reader.tensors
    ]
    head = {"source": src.name, "architecture": arch,
            "shape_order": "GGUF/ggml order: ne[0] (row length, contiguous) first"}
    text = json.dumps(head)[:-1] + ', "tensors": [\n' + ",\n".join("  " + json.dumps(t) for t in tensors) + "\n]}\n"
    (out_dir / "model_tensors.json").write_text(text)
    print(f"{len(reader.fields)} fields, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
