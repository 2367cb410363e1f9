"""The registry's row cache (registry/row_cache.py): rows are served without a database call
while nothing was committed, and every commit, by this process or another (the CLI), is seen
by the very next lookup."""

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from myllm.errors import ModelNotFound
from myllm.registry.db import make_engine
from myllm.registry.row_cache import RowCache
from myllm.registry.store import Overrides, Registry


@pytest.fixture
def counted(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The registry's database calls from async callers, counted."""
    calls: list[Any] = []
    run = registry.pools.db.run

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(fn)
        return await run(fn, *args, **kwargs)

    monkeypatch.setattr(registry.pools.db, "run", counting)
    yield calls


def elsewhere(code: str) -> None:
    """`code` in another process on the same home, with `reg` its registry: as `myllm pull`
    or `myllm rm` writes the file a running daemon reads."""
    script = f"from myllm.registry.store import Registry, Overrides\nfrom myllm.settings import Settings\n" \
             f"reg = Registry.open(Settings())\n{code}\nreg.close()\n"
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ), timeout=120)


def test_a_second_lookup_makes_no_database_call(registry: Registry, smollm2_path: Path, counted: list[Any]) -> None:
    registry.register("smol:a", registry.blobs.stage_copy(smollm2_path), "test")
    first = asyncio.run(registry.lookup("smol:a"))
    second = asyncio.run(registry.lookup("smol:a"))
    assert second is first
    assert len(counted) == 1


def test_another_process_removing_the_model_is_seen_at_once(registry: Registry, smollm2_path: Path,
                                                          counted: list[Any]) -> None:
    registry.register("smol:a", registry.blobs.stage_copy(smollm2_path), "test")
    asyncio.run(registry.lookup("smol:a"))
    elsewhere("reg.remove('smol:a')")
    with pytest.raises(ModelNotFound):
        asyncio.run(registry.lookup("smol:a"))


def test_another_process_changing_the_model_is_seen_at_once(registry: Registry, smollm2_path: Path) -> None:
    registry.register("smol:a", registry.blobs.stage_copy(smollm2_path), "test")
    assert asyncio.run(registry.lookup("smol:a")).system is None
    elsewhere(f"from pathlib import Path\nreg.register('smol:a', reg.blobs.stage_copy(Path({str(smollm2_path)!r})), 'test', "
              "overrides=Overrides(system='hi'))")
    assert asyncio.run(registry.lookup("smol:a")).system == "hi"


def test_a_commit_in_this_process_is_seen_too(registry: Registry, smollm2_path: Path) -> None:
    registry.register("smol:a", registry.blobs.stage_copy(smollm2_path), "test")
    asyncio.run(registry.lookup("smol:a"))
    registry.register("smol:a", registry.blobs.stage_copy(smollm2_path), "test", overrides=Overrides(system="again"))
    assert asyncio.run(registry.lookup("smol:a")).system == "again"


def test_a_database_without_a_commit_counter_is_read_every_time(tmp_path: Path) -> None:
    cache = RowCache(make_engine("sqlite://"))  # in memory: nobody else can write it, but no file to watch
    assert cache.version() is None
    assert cache.get("smol:latest") == (None, None)
    on_file = RowCache(make_engine(f"sqlite:///{tmp_path / 'r.db'}"))
    assert isinstance(on_file.version(), int)
    on_file.close()
