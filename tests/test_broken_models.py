"""A registry row whose blob is missing or damaged is reported as broken, never served."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from myllm.pull import pull
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.server import running_server

MYLLM = str(Path(sys.executable).parent / "myllm")


def damage(registry: Registry, smollm2_path: Path, tmp_path: Path) -> None:
    """three models: one missing its blob, one truncated, one changed in place (same size)."""
    for name in ("gone", "short", "flipped"):
        copy = tmp_path / f"{name}.gguf"
        copy.write_bytes(smollm2_path.read_bytes() + name.encode())  # distinct digests
        pull(registry, Settings(), str(copy), name=name)
    registry.blobs.path(registry.get("gone").digest).unlink()
    short = registry.blobs.path(registry.get("short").digest)
    os.truncate(short, short.stat().st_size - 100)
    flipped = registry.blobs.path(registry.get("flipped").digest)
    with flipped.open("r+b") as fh:
        fh.seek(-3, os.SEEK_END)
        fh.write(b"XYZ")


def test_problems_are_found(registry: Registry, smollm2_path: Path, tmp_path: Path) -> None:
    pull(registry, Settings(), str(smollm2_path), name="fine")
    damage(registry, smollm2_path, tmp_path)
    assert registry.problem(registry.get("fine")) is None
    assert "missing" in (registry.problem(registry.get("gone")) or "")
    assert "expected" in (registry.problem(registry.get("short")) or "")
    assert "no longer matches its sha256" in (registry.problem(registry.get("flipped")) or "")


def test_api_and_cli_report_broken(registry: Registry, settings: Settings, smollm2_path: Path, tmp_path: Path) -> None:
    pull(registry, settings, str(smollm2_path), name="fine")
    damage(registry, smollm2_path, tmp_path)
    proc = subprocess.run([MYLLM, "list"], capture_output=True, text=True, env=os.environ.copy())
    listing = proc.stdout
    for name in ("gone", "short", "flipped"):
        line = next(line for line in listing.splitlines() if line.strip().startswith(f"{name}:latest"))
        assert line.split()[-1] == "broken"
        assert f"{name}:latest is broken: blob sha256-" in proc.stderr
    assert next(line for line in listing.splitlines() if line.strip().startswith("fine:latest")).split()[-1] == "ok"

    with running_server(Settings(num_threads=2, num_ctx=512)) as url:
        models = {m["name"]: m for m in httpx.get(f"{url}/api/models").json()["models"]}
        assert models["fine:latest"]["status"] == "ok"
        assert {models[n]["status"] for n in ("gone:latest", "short:latest", "flipped:latest")} == {"broken"}
        r = httpx.post(f"{url}/api/chat", json={"model": "flipped", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 500 and "is broken" in r.json()["detail"] and "pull it again" in r.json()["detail"]
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "short", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_broken"
        # A file that is not there at all is a model this machine has not pulled (with a shared
        # database, another machine may have): 404, saying what to pull.
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "gone", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "is not on this machine; pull it here: `myllm pull file:" in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/api/chat", json={"model": "fine", "messages": [{"role": "user", "content": "hi"}],
                                                  "options": {"max_tokens": 2}}, timeout=60)
        assert ok.status_code == 200
