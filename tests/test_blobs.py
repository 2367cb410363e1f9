import hashlib
import io
from pathlib import Path

import pytest

from myllm.errors import IntegrityError, InvalidDigest
from myllm.registry.blobs import BlobStore, parse_digest


def test_stage_and_commit(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = b"hello blobs" * 1000
    seen: list[tuple[int, int | None]] = []
    staged = store.stage_stream(io.BytesIO(data), len(data), lambda d, t: seen.append((d, t)))
    assert staged.path.name.startswith(".partial-")
    assert store.digests() == set()  # nothing visible before commit
    digest = store.commit(staged)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.path(digest).read_bytes() == data
    assert not staged.path.exists()
    assert seen[-1] == (len(data), len(data))


def test_mismatch_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    staged = store.stage_stream(io.BytesIO(b"abc"))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.commit(staged, expected="0" * 64)
    assert list(store.root.iterdir()) == []


def test_same_bytes_twice_is_one_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    a = store.commit(store.stage_stream(io.BytesIO(b"same")))
    b = store.commit(store.stage_stream(io.BytesIO(b"same")))
    assert a == b
    assert len(list(store.root.iterdir())) == 1


def test_failed_stream_removes_temp(tmp_path: Path) -> None:
    class Broken(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            raise OSError("disk went away")

    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(OSError):
        store.stage_stream(Broken())
    assert list(store.root.iterdir()) == []


def test_sweep_removes_crash_leftovers(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    keep = store.commit(store.stage_stream(io.BytesIO(b"keep")))
    leftover = store.temp_path()
    leftover.write_bytes(b"half a model")
    assert store.sweep_temp() == [leftover]
    assert store.digests() == {keep}


def test_sweep_leaves_a_live_writer_alone(tmp_path: Path) -> None:
    """Every registry open sweeps; a pull still running in another process keeps its staged
    file (it used to die with FileNotFoundError), which goes once that process has ended."""
    import subprocess
    import sys

    store = BlobStore(tmp_path / "blobs")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        staged = store.root / f".partial-{writer.pid}-0123abcd"
        staged.write_bytes(b"a pull in progress")
        assert store.sweep_temp() == []
        assert staged.exists()
    finally:
        writer.kill()
        writer.wait()
    assert store.sweep_temp() == [staged]


def test_parse_digest_takes_sha256_and_64_lowercase_hex_only() -> None:
    hexdigest = hashlib.sha256(b"x").hexdigest()
    assert parse_digest(f"sha256:{hexdigest}") == hexdigest
    for bad in (hexdigest, f"sha256-{hexdigest}", f"sha256:{hexdigest.upper()}", f"sha256:{hexdigest[:-1]}",
                f"sha256:{hexdigest}0", f"sha256:{hexdigest}\n", "sha256:../../etc/passwd", f"md5:{hexdigest}", ""):
        with pytest.raises(InvalidDigest):
            parse_digest(bad)


def test_a_path_is_only_ever_made_from_a_hex_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    for bad in ("../../etc/passwd", "A" * 64, "a" * 63, "/" + "a" * 63):
        with pytest.raises(InvalidDigest):
            store.path(bad)
