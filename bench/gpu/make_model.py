"""Write a GGUF that llama.cpp loads: SmolLM2-135M-Instruct's metadata (tokenizer, chat
template, hyperparameters; .gpu/model_meta.gguf, made by make_meta.py) and random weights of the
real file's tensor shapes (.gpu/model_tensors.json).

    python3 make_model.py OUT.gguf                 # SmolLM2-135M-shaped, Q8_0 (about 145 MB)
    python3 make_model.py OUT.gguf --scale 1b      # Llama-3.2-1B-shaped, Q8_0 (about 1.2 GB)
    python3 make_model.py OUT.gguf --scale tiny    # 2 layers of width 64, Q8_0 (about 3.5 MB)

Needs numpy and the `gguf` package (PYTHONPATH at the unpacked wheels).

2-D weight matrices are Q8_0 (or --qtype), 1-D norm weights F32 near 1. Weights are small
(standard deviation 0.02) so activations stay finite; the generated text is garbage.
By default Q8_0 blocks are written directly (random int8 quants, one f16 scale per 32 values:
a few seconds even for the 1B shape); --exact draws normal * 0.02 floats and quantizes them
with gguf.quants.quantize instead (slower; the only way for other --qtype values).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES
from make_meta import field_value  # beside this script, which runs from its own folder

KIT = Path(__file__).resolve().parents[2] / ".gpu"
STD = 0.02
CHUNK = 1 << 22  # values generated at a time (16 MiB of float32)

# Other shapes with SmolLM2's vocabulary (the tokenizer metadata must match it): Llama-3.2-1B's,
# and a tiny one whose llama.cpp step takes a fraction of a millisecond on a CPU, the regime of
# a GPU, where the host's work per token decides (make bench's fast-engine guard).
SCALES = {
    "1b": dict(embedding_length=2048, block_count=16, head_count=32, head_count_kv=8,
               feed_forward_length=8192, size_label="1B", name="Llama-3.2-1B-shaped"),
    "tiny": dict(embedding_length=64, block_count=2, head_count=1, head_count_kv=1,
                 feed_forward_length=256, size_label="tiny", name="tiny"),
}
FILE_TYPES = {
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
}


def llama_tensors(n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int,
                  head_dim: int) -> list[tuple[str, list[int]]]:
    """Names and ggml shapes (ne0 = input features first) of a llama model with tied output."""
    kv = n_head_kv * head_dim
    out = [("token_embd.weight", [n_embd, n_vocab])]
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", [n_embd]),
            (p + "ffn_down.weight", [n_ff, n_embd]),
            (p + "ffn_gate.weight", [n_embd, n_ff]),
            (p + "ffn_up.weight", [n_embd, n_ff]),
            (p + "ffn_norm.weight", [n_embd]),
            (p + "attn_k.weight", [n_embd, kv]),
            (p + "attn_output.weight", [n_head * head_dim, n_embd]),
            (p + "attn_q.weight", [n_embd, n_head * head_dim]),
            (p + "attn_v.weight", [n_embd, kv]),
        ]
    out.append(("output_norm.weight", [n_embd]))
    return out


def nbytes(shape: list[int], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    assert shape[0] % block == 0, (shape, qtype)
    return n // block * size


def q8_0_direct(rng: np.random.Generator, n: int) -> np.ndarray:
    """n values as Q8_0 blocks: uniform int8 quants in [-127, 127] (std ~73.3) and one f16
    scale per block chosen so the dequantized weights have standard deviation ~STD."""
    nb = n // 32
    blocks = np.empty((nb, 34), dtype=np.uint8)
    scale = np.float16(STD / 73.3)
    blocks[:, 0:2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    blocks[:, 2:] = rng.integers(-127, 128, size=(nb, 32), dtype=np.int8).view(np.uint8)
    return blocks


def tensor_chunks(rng: np.random.Generator, shape: list[int], qtype: GGMLQuantizationType, exact: bool):
    """Yield the tensor's bytes in pieces of whole rows (a few MiB each)."""
    row = shape[0]
    rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if len(shape) == 1:  # norm weights: F32 near 1
        yield (1.0 + STD * rng.standard_normal(row, dtype=np.float32)).astype(np.float32).tobytes()
        return
    per = max(1, CHUNK // row)
    for start in range(0, rows, per):
        r = min(per, rows - start)
        if qtype == GGMLQuantizationType.Q8_0 and not exact:
            yield q8_0_direct(rng, r * row).tobytes()
            continue
        data = (STD * rng.standard_normal((r, row), dtype=np.float32))
        if qtype == GGMLQuantizationType.F32:
            yield data.tobytes()
        elif qtype == GGMLQuantizationType.F16:
            yield data.astype(np.float16).tobytes()
        else:
            from gguf import quants

            yield quants.quantize(data, qtype).tobytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--scale", choices=["135m", *SCALES], default="135m")
    ap.add_argument("--qtype", default="Q8_0", help="type of the 2-D weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, F32)")
    ap.add_argument("--exact", action="store_true", help="quantize normal*0.02 floats with gguf.quants (slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--meta", type=Path, default=KIT / "model_meta.gguf")
    ap.add_argument("--tensors", type=Path, default=KIT / "model_tensors.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    qtype = GGMLQuantizationType[args.qtype.upper()]

    reader = GGUFReader(args.meta)
    arch = reader.fields["general.architecture"].contents()
    meta = {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.") and k != "general.architecture"}

    def get(key: str):
        return meta[f"{arch}.{key}"][0]

    real = json.loads(args.tensors.read_text())["tensors"]
    n_vocab = len(meta["tokenizer.ggml.tokens"][0])
    head_dim = int(get("rope.dimension_count"))
    # The real file's own list must be what llama_tensors() derives from its hyperparameters,
    # so the 1B list built the same way is the one llama.cpp expects.
    derived = llama_tensors(int(get("embedding_length")), int(get("block_count")), int(get("attention.head_count")),
                            int(get("attention.head_count_kv")), int(get("feed_forward_length")), n_vocab, head_dim)
    if sorted((t["name"], t["shape"]) for t in real) != sorted(derived):
        sys.exit("model_tensors.json does not match the llama layout derived from model_meta.gguf")

    if args.scale == "135m":
        tensors = [(t["name"], t["shape"]) for t in real]
    else:
        s = SCALES[args.scale]
        assert s["embedding_length"] // s["head_count"] == head_dim
        tensors = llama_tensors(s["embedding_length"], s["block_count"], s["head_count"], s["head_count_kv"],
                                s["feed_forward_length"], n_vocab, head_dim)
        for key, val in (("embedding_length", s["embedding_length"]), ("block_count", s["block_count"]),
                         ("attention.head_count", s["head_count"]), ("attention.head_count_kv", s["head_count_kv"]),
                         ("feed_forward_length", s["feed_forward_length"]), ("rope.dimension_count", head_dim)):
            _, vtype, sub = meta[f"{arch}.{key}"]
            meta[f"{arch}.{key}"] = (val, vtype, sub)
        meta["general.size_label"] = (s["size_label"].encode(), GGUFValueType.STRING, None)
        meta["general.name"] = (f"SmolLM2-vocab {s['name']} (random weights)".encode(), GGUFValueType.STRING, None)
    if "general.file_type" in meta and qtype in FILE_TYPES:
        meta["general.file_type"] = (int(FILE_TYPES[qtype]), GGUFValueType.UINT32, None)

    writer = GGUFWriter(args.out, arch)
    for key, (val, vtype, sub) in meta.items():
        writer.add_key_value(key, val, vtype, sub)
    plan = []
    for name, shape in tensors:
        t = GGMLQuantizationType.F32 if len(shape) == 1 else qtype
        n = nbytes(shape, t)
        # add_tensor_info wants the numpy-order shape (outermost first) when the dtype is not raw bytes
        writer.add_tensor_info(name, list(reversed(shape)), np.dtype(np.float32), n, raw_dtype=t)
        plan.append((name, shape, t, n))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    align = writer.data_alignment
    rng = np.random.default_rng(args.seed)
    total = 0
    for name, shape, t, n in plan:
        writer.write_padding(fout, fout.tell())
        written = 0
        for piece in tensor_chunks(rng, shape, t, args.exact):
            fout.write(piece)
            written += len(piece)
        assert written == n, (name, written, n)
        total += n
        writer.write_padding(fout, n, align)
    writer.close()
    params = sum(int(np.prod(s)) for _, s in tensors)
    print(f"wrote {args.out}: {args.scale}, {len(tensors)} tensors, {params / 1e6:.1f}M parameters, "
          f"{total / 2**20:.1f} MiB of {qtype.name}/F32 data in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
