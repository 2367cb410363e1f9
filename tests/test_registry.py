import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine

from myllm.create import create_model
from myllm.errors import BlobNotFound, InvalidModelFile, InvalidModelName, ModelExists, ModelNotFound
from myllm.registry.db import make_engine
from myllm.registry.migrations import MIGRATIONS, schema_version
from myllm.registry.names import normalize
from myllm.registry.schema import metadata
from myllm.registry.store import Overrides, Registry
from myllm.settings import Settings


def test_migrations_build_the_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
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


def test_register_blob_names_a_stored_blob(registry: Registry, smollm2_path: Path) -> None:
    digest = registry.blobs.commit(registry.blobs.stage_copy(smollm2_path))  # uploaded, not yet named
    row = registry.register_blob("up:a", digest, "upload:smol.gguf", Overrides(system="hi", parameters={"top_k": 7}))
    assert (row.name, row.digest, row.size, row.source) == ("up:a", digest, smollm2_path.stat().st_size, "upload:smol.gguf")
    assert (row.family, row.system, row.parameters) == ("llama", "hi", {"top_k": 7})
    with pytest.raises(BlobNotFound):
        registry.register_blob("up:b", "0" * 64, "upload:x.gguf")
    with pytest.raises(InvalidModelName):
        registry.register_blob("Up B", digest, "upload:x.gguf")
    registry.remove("up:a")
    assert not registry.blobs.exists(digest), "once named, the blob goes with its last name"


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


class Killed(BaseException):
    """Stands for a SIGKILL: no `except Exception` stops it, and the open transaction is lost."""


@contextmanager
def killed_at(engine: Engine, step: int) -> Iterator[None]:
    """Raise `Killed` at the `step`-th database step (a statement sent, or a commit) on `engine`."""
    seen = 0

    def tick(*_: Any) -> None:
        nonlocal seen
        seen += 1
        if seen == step:
            raise Killed

    hooks = ("before_cursor_execute", "commit")
    for hook in hooks:
        event.listen(engine, hook, tick)
    try:
        yield
    finally:
        for hook in hooks:
            event.remove(engine, hook, tick)


OLD_MODELFILE = 'FROM smol:a\nSYSTEM "old"\nPARAMETER temperature 0.1\n'


def start_over(registry: Registry, settings: Settings, base_dir: Path, replacing: bool) -> None:
    """No model `mine`, or (`replacing`) the one OLD_MODELFILE makes."""
    if registry.find("mine") is not None:
        registry.remove("mine")
    if replacing:
        create_model(registry, settings, "mine", OLD_MODELFILE, base_dir)


def settings_of(registry: Registry, name: str) -> tuple[dict[str, Any], str | None] | None:
    """What a create writes (PARAMETERs, SYSTEM) of a model, which must be usable: blob intact."""
    row = registry.find(name)
    if row is None:
        return None
    assert registry.problem(row) is None
    return row.parameters, row.system


@pytest.mark.parametrize("base", ["smol:a", "./smol.gguf"])
@pytest.mark.parametrize("replacing", [False, True], ids=["new-name", "replacing"])
def test_create_killed_at_any_step_leaves_the_old_model_or_the_whole_new_one(
    registry: Registry, settings: Settings, smollm2_path: Path, tmp_path: Path, base: str, replacing: bool
) -> None:
    """`myllm create` dies at each database step in turn (every statement, every commit): the
    name is then absent or the old model, or the new one with all its settings, never a row
    without its SYSTEM and PARAMETERs."""
    registry.register("smol:a", registry.blobs.stage_copy(smollm2_path), "test")
    (tmp_path / "smol.gguf").symlink_to(smollm2_path)
    old = ({"temperature": 0.1}, "old") if replacing else None
    new = ({"top_k": 7}, "new")
    modelfile = f'FROM {base}\nSYSTEM "new"\nPARAMETER top_k 7\n'
    for step in itertools.count(1):
        start_over(registry, settings, tmp_path, replacing)
        try:
            with killed_at(registry.engine, step):
                create_model(registry, settings, "mine", modelfile, tmp_path)
        except Killed:
            assert settings_of(registry, "mine") in (old, new), f"killed at database step {step}"
        else:
            break
    assert step > 3, "the kills reached the write"
    assert settings_of(registry, "mine") == new


def test_create_lays_the_modelfile_over_its_base(registry: Registry, settings: Settings, smollm2_path: Path,
                                                 tmp_path: Path) -> None:
    registry.register("smol:a", registry.blobs.stage_copy(smollm2_path), "test")
    registry.copy("smol:a", "base", Overrides(parameters={"temperature": 0.5, "top_k": 3}, system="base",
                                              messages=[{"role": "user", "content": "hi"}]))
    mine = create_model(registry, settings, "mine", 'FROM base\nPARAMETER top_k 7\nLICENSE "MIT"\n', tmp_path)
    assert mine.parameters == {"temperature": 0.5, "top_k": 7}
    assert (mine.system, mine.messages, mine.license) == ("base", [{"role": "user", "content": "hi"}], "MIT")
    # A model made over again from its own name keeps what the new Modelfile does not change.
    again = create_model(registry, settings, "mine", 'FROM mine\nSYSTEM "again"\n', tmp_path)
    assert (again.parameters, again.system, again.license) == ({"temperature": 0.5, "top_k": 7}, "again", "MIT")
    assert [r.name for r in registry.list()] == ["base:latest", "mine:latest", "smol:a"]
