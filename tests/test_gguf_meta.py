from pathlib import Path

import pytest

from myllm.errors import InvalidModelFile
from myllm.registry.gguf_meta import quantization_name, read_gguf_info, read_gguf_kv, size_label


def test_smollm2_metadata(smollm2_path: Path) -> None:
    info = read_gguf_info(smollm2_path, "smol.gguf")
    assert info.architecture == "llama"
    assert info.context_length == 8192
    assert info.quantization == "Q4_1"
    assert info.size_label == "135M"
    assert 130_000_000 < info.parameter_count < 140_000_000
    assert info.embedding_length == 576
    assert info.vocab_size == 49152
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.license == "apache-2.0"
    assert (info.bos_token, info.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert info.details["block_count"] == 30
    assert info.details["attention.head_count_kv"] == 3


def test_gemma3_metadata(gemma3_path: Path) -> None:
    info = read_gguf_info(gemma3_path, "gemma.gguf")
    assert info.architecture == "gemma3"
    assert info.context_length == 32768
    assert info.quantization == "Q4_K_M"
    assert info.chat_template is None
    assert info.vocab_size == 262144  # no gemma3.vocab_size key: counted from the token list
    assert info.size_label == "270M"
    assert (info.bos_token, info.eos_token) == ("<bos>", "<eos>")
    assert info.details["attention.key_length"] == 256


def test_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(InvalidModelFile, match="^zip.gguf is not a model llama.cpp can load: it is not a GGUF file"):
        read_gguf_info(bogus, "zip.gguf")


def test_truncated(tmp_path: Path, smollm2_path: Path) -> None:
    """The `gguf` reader sees only files that `check_gguf` passed (tests/test_gguf_check.py)."""
    cut = tmp_path / "cut.gguf"
    with smollm2_path.open("rb") as src:
        cut.write_bytes(src.read(smollm2_path.stat().st_size // 2))
    with pytest.raises(InvalidModelFile, match="ends past the end of the file"):
        read_gguf_info(cut, "cut.gguf")


def test_header_only(tmp_path: Path) -> None:
    stub = tmp_path / "stub.gguf"
    stub.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(InvalidModelFile, match="header runs past the end of the file"):
        read_gguf_info(stub, "stub.gguf")


@pytest.mark.parametrize(
    ("count", "label"), [(134_515_008, "135M"), (1_543_000_000, "1.5B"), (8_030_000_000, "8.0B"), (999, "999")]
)
def test_size_label(count: int, label: str) -> None:
    assert size_label(count) == label


def test_quantization_names() -> None:
    assert quantization_name(3) == "Q4_1"
    assert quantization_name(15) == "Q4_K_M"
    assert quantization_name(0) == "F32"
    assert quantization_name(None) == "unknown"


def test_kv_matches_the_gguf_reader_with_arrays_left_out(smollm2_path: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    kv = read_gguf_kv(smollm2_path)
    fields = {k: f for k, f in GGUFReader(smollm2_path).fields.items() if not k.startswith("GGUF.")}
    assert list(kv) == list(fields)
    for key, fld in fields.items():
        if fld.types[0] == GGUFValueType.ARRAY:
            assert kv[key] is None, key
        elif fld.types[0] == GGUFValueType.FLOAT32:
            assert kv[key] == pytest.approx(fld.contents(), rel=1e-6), key
        else:
            assert kv[key] == fld.contents(), key
    assert kv["llama.attention.layer_norm_rms_epsilon"] == 1e-05  # as written, not 9.99999974737875e-06


def test_kv_of_a_cut_header(tmp_path: Path, smollm2_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_path.open("rb") as src:
        cut.write_bytes(src.read(4096))  # inside the token list
    with pytest.raises(InvalidModelFile, match="unreadable GGUF header"):
        read_gguf_kv(cut)
