from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from myllm.errors import InvalidModelFile, InvalidModelName, ModelExists, ModelNotFound
from myllm.registry.db import make_engine
from myllm.registry.migrations import MIGRATIONS, schema_version
from myllm.registry.names import normalize
from myllm.registry.schema import Base
from myllm.registry.store import Registry
from myllm.settings import Settings


def test_migrations_build_the_orm_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert schema_version(engine) == MIGRATIONS[-1][0]
    # Running again applies nothing and keeps the data.
    engine2 = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    assert schema_version(engine2) == MIGRATIONS[-1][0]


def test_sqlite_uses_wal(registry: Registry) -> None:
    with registry.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_default_database_lives_in_home(isolated_home: Path, registry: Registry) -> None:
    assert (isolated_home / "myllm.db").exists()
    assert "models" in inspect(registry.engine).get_table_names()


@pytest.mark.parametrize("good", ["smollm2:135m", "gemma3", "a.b_c-d:q4_k_m", "x1"])
def test_valid_names(good: str) -> None:
    assert ":" in normalize(good)


@pytest.mark.parametrize("bad", ["", "Smol:1", "../etc:x", "a/b", "a:b:c", "-x", "a..b", "a:", "a b"])
def test_invalid_names(bad: str) -> None:
    with pytest.raises(InvalidModelName):
        normalize(bad)


def test_register_share_and_remove(registry: Registry, smollm2_path: Path) -> None:
    first = registry.register("smol:a", registry.blobs.stage_copy(smollm2_path), "test")
    second = registry.register("smol:b", registry.blobs.stage_copy(smollm2_path), "test")
    assert first.digest == second.digest
    assert registry.blobs.digests() == {first.digest}
    assert [r.name for r in registry.list()] == ["smol:a", "smol:b"]
    assert registry.get("smol:a").quantization == "Q4_1"

    registry.remove("smol:a")
    assert registry.blobs.exists(first.digest), "blob still used by smol:b"
    registry.remove("smol:b")
    assert not registry.blobs.exists(first.digest)
    with pytest.raises(ModelNotFound):
        registry.get("smol:b")


def test_invalid_file_registers_nothing(registry: Registry, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(InvalidModelFile):
        registry.register("bogus:1", registry.blobs.stage_copy(bogus), "test")
    assert registry.list() == []
    assert list(registry.blobs.root.iterdir()) == []


def test_copy_shares_blob(registry: Registry, smollm2_path: Path) -> None:
    registry.register("smol:a", registry.blobs.stage_copy(smollm2_path), "test")
    copy = registry.copy("smol:a", "mine")
    assert copy.name == "mine:latest"
    assert copy.digest == registry.get("smol:a").digest
    with pytest.raises(ModelExists):
        registry.copy("smol:a", "mine")


def test_survives_reopen(settings: Settings, smollm2_path: Path) -> None:
    reg = Registry.open(settings)
    reg.register("smol:a", reg.blobs.stage_copy(smollm2_path), "test")
    reg.close()
    again = Registry.open(settings)
    assert again.get("smol:a").context_length == 8192
    again.close()


def test_open_sweeps_temp_files(settings: Settings) -> None:
    reg = Registry.open(settings)
    leftover = reg.blobs.temp_path()
    leftover.write_bytes(b"crashed mid-copy")
    reg.close()
    Registry.open(settings).close()
    assert not leftover.exists()


def test_any_sqlalchemy_url(tmp_path: Path, smollm2_path: Path) -> None:
    url = f"sqlite+pysqlite:///{tmp_path / 'elsewhere' / 'reg.sqlite'}"
    reg = Registry.open(Settings(database_url=url))
    reg.register("smol:a", reg.blobs.stage_copy(smollm2_path), "test")
    assert (tmp_path / "elsewhere" / "reg.sqlite").exists()
    reg.close()
