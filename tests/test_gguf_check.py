"""Every GGUF is checked before it is registered: crafted files that would hang the `gguf`
reader or abort llama.cpp are refused at once, with one line naming the user's file and
the problem, quoting none of its bytes, and leaving nothing behind."""

from __future__ import annotations

import hashlib
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf  # imported up front, so its import is not counted against a check's memory
import httpx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T

from myllm.errors import InvalidModelFile
from myllm.pull import pull
from myllm.registry.gguf_check import check_gguf
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.hostile_gguf import write_aborting_gguf
from tests.server import running_servers
from tests.test_pull import assert_nothing_left

BASE_KEYS: dict[str, tuple[Any, T]] = {
    "llama.block_count": (1, T.UINT32),
    "llama.context_length": (128, T.UINT32),
    "llama.embedding_length": (32, T.UINT32),
    "llama.feed_forward_length": (64, T.UINT32),
    "llama.attention.head_count": (4, T.UINT32),
    "llama.attention.head_count_kv": (2, T.UINT32),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
}


def q8_0(shape: tuple[int, ...]) -> np.ndarray:
    return gguf.quants.quantize(np.ones(shape, dtype=np.float32), Q.Q8_0)


def write_model(
    path: Path, keys: dict[str, tuple[Any, T]] | None = None, arch: str = "llama", norm: Q = Q.F32
) -> Path:
    """A small GGUF that passes the check: a llama header (with `keys` laid over it, None
    removing one) and four tensors, one of them Q8_0; `norm` is the type of output_norm."""
    writer = gguf.GGUFWriter(path, arch=arch)
    for key, (value, value_type) in {**BASE_KEYS, **(keys or {})}.items():
        if value is not None:
            writer.add_key_value(key, value, value_type)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", q8_0((64, 32)), raw_dtype=Q.Q8_0)
    if norm == Q.F32:
        writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    else:
        writer.add_tensor("output_norm.weight", q8_0((32,)), raw_dtype=norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patch(path: Path, tensor: str, field: str, new: Callable[[int], int]) -> Path:
    """Rewrite one field of a tensor's info in place: its n_dims, first or second dim, type
    or offset."""
    data = bytearray(path.read_bytes())
    at = data.index(tensor.encode()) + len(tensor)
    (n_dims,) = struct.unpack_from("<I", data, at)
    pos, fmt = {"n_dims": (at, "<I"), "dim0": (at + 4, "<q"), "dim1": (at + 12, "<q"),
                "type": (at + 4 + 8 * n_dims, "<I"), "offset": (at + 8 + 8 * n_dims, "<Q")}[field]
    (old,) = struct.unpack_from(fmt, data, pos)
    struct.pack_into(fmt, data, pos, new(old))
    path.write_bytes(data)
    return path


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def huge_array(path: Path) -> None:
    """The issue's file: 99 bytes declaring a 2^40-element uint8 array (the `gguf` reader
    loops past the end of it, growing ~55 MB/s)."""
    data = header(0, 1) + gguf_string("tokenizer.ggml.scores") + struct.pack("<IIQ", T.ARRAY, T.UINT8, 1 << 40)
    path.write_bytes(data.ljust(99, b"\0"))
    assert path.stat().st_size == 99


def raw(data: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(data)


def many_strings(path: Path) -> None:
    """An array of more strings than the walk steps over, all empty: a sparse file of 32 MiB."""
    count = (1 << 22) + 1
    with path.open("wb") as fh:
        fh.write(header(0, 1) + gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", T.ARRAY, T.STRING, count))
        fh.truncate(fh.tell() + 8 * count)


def cut(size: Callable[[int], int]) -> Callable[[Path], object]:
    def build(path: Path) -> None:
        data = write_model(path).read_bytes()
        path.write_bytes(data[: size(len(data))])
    return build


def keys(**changed: tuple[Any, T]) -> Callable[[Path], object]:
    """A builder of the small model with `llama.<key>` keys changed (`__` standing for `.`)."""
    return lambda path: write_model(path, {f"llama.{k.replace('__', '.')}": v for k, v in changed.items()})


def patched(tensor: str, field: str, new: Callable[[int], int]) -> Callable[[Path], object]:
    return lambda path: patch(write_model(path), tensor, field, new)


STRINGS = struct.pack("<IIQ", T.ARRAY, T.STRING, 1 << 40)
HUGE_STRING = struct.pack("<IQ", T.STRING, 1 << 62)
HOSTILE: dict[str, tuple[Callable[[Path], object], str]] = {
    # The header: every count and length bounded by the file's size.
    "array of 2^40 items in 99 bytes": (huge_array, "'tokenizer.ggml.scores' (1099511627776 items) runs past the end"),
    "string array of 2^40 strings": (raw(header(0, 1) + gguf_string("tokenizer.ggml.tokens") + STRINGS),
                                     "declares 1099511627776 strings, more than the file holds"),
    "4M strings in an array": (many_strings, "declares 4194305 strings, more than 4194304"),
    "huge string length": (raw(header(0, 1) + gguf_string("general.name") + HUGE_STRING + b"x" * 64),
                           "a string in 'general.name' runs past the end of the file"),
    "huge key count": (raw(header(0, 1 << 62) + b"\0" * 64), f"declares {1 << 62} keys, more than its 88 bytes"),
    "huge tensor count": (raw(header(1 << 62, 0) + b"\0" * 64), f"declares {1 << 62} tensors"),
    "huge key length": (raw(header(0, 1) + struct.pack("<Q", 1 << 50) + b"\0" * 64),
                        "a key of 1125899906842624 bytes runs past"),
    "big-endian": (raw(b"GGUF" + struct.pack(">IQQ", 3, 0, 0)), "written on a big-endian machine"),
    "GGUF version 1": (raw(header(0, 0, version=1)), "GGUF version 1 is not one llama.cpp reads"),
    "truncated header": (cut(lambda n: 400), "its header runs past the end of the file"),
    # Tensors.
    "truncated data": (cut(lambda n: n - 100), "tensor 'output_norm.weight' ends past the end of the file"),
    "tensor past the end": (patched("output_norm.weight", "dim0", lambda d: 32_000), "ends past the end"),
    "tensor out of place": (patched("output_norm.weight", "offset", lambda o: o + (1 << 40)),
                            "where 3328 was expected"),
    "misaligned tensor": (patched("output_norm.weight", "offset", lambda o: o + 4),
                          "starts at offset 3332, not a multiple of 32"),
    "unknown tensor type": (patched("token_embd.weight", "type", lambda t: 4), "has type 4, which is no ggml type"),
    "zero dimension": (patched("token_embd.weight", "dim1", lambda d: 0), "'token_embd.weight' has a dimension of 0"),
    "negative dimension": (patched("token_embd.weight", "dim0", lambda d: -32), "has a dimension of -32"),
    "no dimensions": (patched("output_norm.weight", "n_dims", lambda n: 0), "'output_norm.weight' has 0 dimensions"),
    "five dimensions": (patched("output_norm.weight", "n_dims", lambda n: 5), "has 5 dimensions, more than 4"),
    "dims larger than the bytes": (patched("token_embd.weight", "dim1", lambda d: 9),
                                   "'blk.0.attn_norm.weight' starts at offset 1024, where 1152 was expected"),
    "rows not whole blocks": (patched("blk.0.ffn_up.weight", "dim0", lambda d: 48),
                              "rows of 48 values, not whole Q8_0 blocks of 32"),
    "output_norm.weight as Q8_0": (lambda p: write_model(p, norm=Q.Q8_0),
                                   "'output_norm.weight' is Q8_0; llama.cpp needs norm weights and biases in F32"),
    # The architecture and hyperparameters.
    "unknown architecture": (lambda p: write_model(p, arch="notanarch"), "architecture 'notanarch' is not one"),
    "clip architecture": (lambda p: write_model(p, arch="clip"), "it is a multimodal projector (architecture clip), not a model"),
    "block_count 0": (keys(block_count=(0, T.UINT32)), "llama.block_count is 0; llama.cpp takes 1 to 512 layers"),
    "block_count 513": (keys(block_count=(513, T.UINT32)), "llama.block_count is 513"),
    "block_count missing": (keys(block_count=(None, T.UINT32)), "it has no llama.block_count"),
    "block_count not uint32": (keys(block_count=(1, T.UINT64)), "llama.block_count is not a uint32"),
    "context_length 2^31": (keys(context_length=(1 << 31, T.UINT32)),
                            "llama.context_length is 2147483648; it must be 1 to 16777216"),
    "expert_count 5000": (keys(expert_count=(5000, T.UINT32)), "expert_count is 5000; llama.cpp takes at most 1024"),
    "expert_used_count without experts": (keys(expert_used_count=(2, T.UINT32)), "but the model has no experts"),
    "expert_used_count above expert_count": (keys(expert_count=(4, T.UINT32), expert_used_count=(8, T.UINT32)),
                                             "expert_used_count is 8; with 4 experts it must be 1 to 4"),
    "unknown rope.scaling.type": (keys(rope__scaling__type=("not-a-rope-scaling-type", T.STRING)),
                                  "llama.rope.scaling.type is not one of none, linear, yarn, longrope"),
    "head_count_kv 0": (keys(attention__head_count_kv=(0, T.UINT32)),
                        "head_count_kv 0 is not a divisor of head_count 4"),
    "per-layer head_count_kv": (keys(attention__head_count_kv=([3], T.ARRAY)),
                                "head_count_kv 3 is not a divisor of head_count 4"),
    "per-layer array too long": (keys(attention__head_count=([4, 4], T.ARRAY)),
                                 "llama.attention.head_count is not a uint32 or an array of one integer per layer (1)"),
    "more heads than embedding": (keys(attention__head_count=(64, T.UINT32), attention__head_count_kv=(64, T.UINT32)),
                                  "head_count 64 is more than embedding_length 32"),
}


def refusal(call: Callable[[], object]) -> str:
    """The message `call` is refused with, after checking it came fast and with little memory."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidModelFile) as info:
            call()
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 2, f"refused after {elapsed:.1f} s"
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB allocated before the refusal"
    message = info.value.message
    assert "\n" not in message
    return message


@pytest.mark.timeout(60)  # a walk that loops past the end of a file fails here, not after 300 s
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_crafted_file_is_refused_by_pull(case: str, registry: Registry, settings: Settings, tmp_path: Path) -> None:
    build, problem = HOSTILE[case]
    path = tmp_path / "crafted.gguf"
    build(path)
    message = refusal(lambda: pull(registry, settings, str(path), name="crafted"))
    assert message.startswith(f"file:{path} is not a model llama.cpp can load: "), message
    assert problem in message
    assert ".partial-" not in message and str(settings.home_dir) not in message
    assert_nothing_left(registry)


def test_the_registry_checks_staged_bytes_and_names_the_source(registry: Registry, tmp_path: Path) -> None:
    """The registry's own check (behind `pull`'s early one): the error names the source, not
    the temp file the bytes were staged in, and the temp file goes."""
    path = tmp_path / "crafted.gguf"
    huge_array(path)
    staged = registry.blobs.stage_copy(path)
    message = refusal(lambda: registry.register("crafted", staged, "hf:someone/model/model.gguf"))
    assert message.startswith("hf:someone/model/model.gguf is not a model llama.cpp can load: "), message
    assert staged.path.name not in message
    assert_nothing_left(registry)


def test_a_blob_that_fails_is_removed(registry: Registry, tmp_path: Path) -> None:
    path = write_model(tmp_path / "crafted.gguf", {"llama.context_length": (1 << 31, T.UINT32)})
    staged = registry.blobs.stage_copy(path)
    digest = registry.blobs.commit(staged)
    message = refusal(lambda: registry.register_blob("crafted", digest, "upload:crafted.gguf"))
    assert message.startswith("upload:crafted.gguf is not a model llama.cpp can load: llama.context_length")
    assert_nothing_left(registry)


def test_bad_magic_quotes_no_bytes(registry: Registry, settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_bytes(b"swordfish:x:0:0:hunter2:/root:/bin/bash\n")
    message = refusal(lambda: pull(registry, settings, str(path), name="passwd"))
    assert message == f"file:{path} is not a model llama.cpp can load: it is not a GGUF file " \
                      "(it does not start with the GGUF magic)"
    path.write_bytes(b"")
    assert "not a GGUF file" in refusal(lambda: pull(registry, settings, str(path), name="passwd"))
    assert_nothing_left(registry)


def test_names_that_are_not_plain_text_are_not_shown(tmp_path: Path) -> None:
    path = write_model(tmp_path / "crafted.gguf", arch="sw\x00rdfish\n")
    message = refusal(lambda: check_gguf(path, "crafted.gguf"))
    assert message == "crafted.gguf is not a model llama.cpp can load: " \
                      "its architecture (a name that is not plain text) is not one llama.cpp knows"


def test_the_small_model_passes(tmp_path: Path) -> None:
    check_gguf(write_model(tmp_path / "fine.gguf"), "fine.gguf")


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_the_real_models_pass_quickly(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    started = time.perf_counter()
    check_gguf(path, path.name)
    assert time.perf_counter() - started < 1


def test_the_crash_test_model_passes(smollm2_path: Path, tmp_path: Path) -> None:
    """tests/test_runner_crash.py registers this file to see llama.cpp abort a runner: it
    must pass the check (its abort is an architecture's own, which the check leaves alone)."""
    check_gguf(write_aborting_gguf(smollm2_path, tmp_path / "aborts.gguf"), "aborts.gguf")


def test_a_daemon_refuses_crafted_files_and_keeps_answering(tmp_path: Path) -> None:
    """Through a real daemon: `POST /load_model` of the 99-byte file and Ollama's `create`
    from an uploaded blob whose context length breaks every request are both a 400 naming
    the file, and the daemon answers on."""
    hang = tmp_path / "hang.gguf"
    huge_array(hang)
    blob = write_model(tmp_path / "ctx.gguf", {"llama.context_length": (1 << 31, T.UINT32)}).read_bytes()
    digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
    with running_servers(Settings(num_threads=1, model_dirs=str(tmp_path))) as (url, ollama):
        r = httpx.post(f"{url}/load_model", json={"model_name": str(hang)}, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["message"].startswith(f"file:{hang} is not a model llama.cpp can load: ")

        assert httpx.post(f"{ollama}/api/blobs/{digest}", content=blob, timeout=30).status_code == 201
        r = httpx.post(f"{ollama}/api/create", json={"model": "ctx", "files": {"ctx.gguf": digest}}, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("upload:ctx.gguf is not a model llama.cpp can load: llama.context_length")
        assert httpx.head(f"{ollama}/api/blobs/{digest}", timeout=5).status_code == 404, "the blob went"

        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert httpx.get(f"{ollama}/api/tags", timeout=5).json()["models"] == []
