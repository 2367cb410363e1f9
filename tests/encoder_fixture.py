"""Tiny retrieval models for tests and bench: BERT-family encoders written with the `gguf` package,
laid out as llama.cpp's converter writes bge-small or bge-reranker (conversion/bert.py), with
random weights of the right shapes. No small encoder or reranker GGUF is on the package index;
these run every step a real one takes in llama.cpp (WordPiece tokenizing, bidirectional attention,
the model's own pooling, a classifier head for rank pooling), in llama-cpp-python as in
llama-server, so vectors and scores can be compared between the two.

- `write_encoder(dest, pooling="mean")`: an embedding model (`bert.pooling_type` mean or CLS).
- `write_encoder(dest, pooling="rank")`: a cross-encoder reranker: the same encoder with the
  classifier head (`cls.weight`, `cls.output.weight`) and one output label, and no pooling key,
  as the converter writes bge-reranker (llama-server is told `--rerank`).

The vocabulary is a WordPiece one of BERT's layout ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
[MASK] 103, which llama.cpp's `bert` tokenizer assumes), made of common English words, every
letter and digit, and `##` continuations of each letter, so any lowercase English text
tokenizes without [UNK]. Tokens are stored as the converter stores them: a word-initial piece
with the phantom space `\u2581`, a continuation without its `##`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

SEED = 33
Pooling = Literal["mean", "cls", "rank"]
POOLING_TYPES = {"mean": 1, "cls": 2, "rank": 4}
"""llama.cpp's `enum llama_pooling_type` values, as `bert.pooling_type` stores them."""

WORDS = """
the of and to in is was for on that with as by at from it his an were are which this be or has had
not first one their its new after who they have her she two been other when there all during into
school time may years more most only over city some world would where later up such used many can
state about national out known university united then made also team what how why query document
search find answer question text model vector rank score cat dog bird fish tree house car road
water fire earth air sun moon star sky rain snow wind river sea lake mountain forest city town
village country people man woman child friend family work play read write learn teach book paper
music art song dance game ball sport food bread milk apple orange green red blue black white
small large big little long short high low good bad best better fast slow hot cold old young
day night morning evening week month year today tomorrow yesterday computer phone program code
data file system network server client request response error memory disk speed local daemon
""".split()

SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
CONTROL, NORMAL, UNKNOWN, UNUSED = 3, 1, 2, 5
"""gguf's TokenType values."""


def vocabulary() -> tuple[list[str], list[int]]:
    """The tokens (as stored in the GGUF) and their types."""
    tokens = [SPECIAL.get(i, f"[unused{i}]") for i in range(104)]
    types = [CONTROL if i in SPECIAL and i != 100 else UNKNOWN if i == 100 else UNUSED for i in range(104)]
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = list(dict.fromkeys(WORDS))
    for word in [*pieces, *words]:
        tokens.append("\u2581" + word)
        types.append(NORMAL)
    for piece in string.ascii_lowercase + string.digits:  # "##x": a continuation, stored bare
        tokens.append(piece)
        types.append(NORMAL)
    return tokens, types


@dataclass(frozen=True)
class EncoderShape:
    """The encoder's hyperparameters (bge-micro's layout, narrower)."""

    width: int = 64
    heads: int = 4
    ffn: int = 128
    layers: int = 2
    context: int = 512


def write_encoder(dest: Path, pooling: Pooling = "mean", shape: EncoderShape = EncoderShape(),
                  seed: int = SEED) -> Path:
    """Write the model to `dest`; deterministic (fixed seed), the same bytes at every call."""
    from gguf import GGUFWriter

    tokens, types = vocabulary()
    rng = np.random.default_rng(seed)

    def rand(*dims: int, std: float = 0.05) -> np.ndarray:
        return (rng.standard_normal(dims) * std).astype(np.float32)

    def norm(name: str) -> None:
        tensors[f"{name}.weight"] = (1 + rand(shape.width, std=0.02)).astype(np.float32)
        tensors[f"{name}.bias"] = rand(shape.width, std=0.02)

    width, ffn = shape.width, shape.ffn
    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": rand(len(tokens), width, std=0.5),
        "token_types.weight": rand(2, width),
        "position_embd.weight": rand(shape.context, width, std=0.1),
    }
    norm("token_embd_norm")
    for i in range(shape.layers):
        block = f"blk.{i}"
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors[f"{block}.{part}.weight"] = rand(width, width, std=width ** -0.5)
            tensors[f"{block}.{part}.bias"] = rand(width, std=0.02)
        norm(f"{block}.attn_output_norm")
        tensors[f"{block}.ffn_up.weight"] = rand(ffn, width, std=width ** -0.5)
        tensors[f"{block}.ffn_up.bias"] = rand(ffn, std=0.02)
        tensors[f"{block}.ffn_down.weight"] = rand(width, ffn, std=ffn ** -0.5)
        tensors[f"{block}.ffn_down.bias"] = rand(width, std=0.02)
        norm(f"{block}.layer_output_norm")
    if pooling == "rank":
        tensors["cls.weight"] = rand(width, width, std=width ** -0.5)
        tensors["cls.bias"] = rand(width, std=0.02)
        tensors["cls.output.weight"] = rand(1, width, std=1.0)
        tensors["cls.output.bias"] = rand(1, std=0.1)

    writer = GGUFWriter(dest, arch="bert")
    writer.add_name(f"myllm-test-bert-{pooling}")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(shape.layers)
    writer.add_head_count(shape.heads)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    if pooling == "rank":  # as the converter writes bge-reranker: a head and its label, no pooling key
        writer.add_classifier_output_labels(["LABEL_0"])
    else:
        writer.add_pooling_type(_pooling_enum(pooling))
    writer.add_file_type(0)  # all F32
    writer.add_token_type_count(2)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(101)
    writer.add_sep_token_id(102)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(100)
    writer.add_mask_token_id(103)
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _pooling_enum(pooling: Pooling):  # type: ignore[no-untyped-def]
    from gguf import PoolingType

    return PoolingType(POOLING_TYPES[pooling])
