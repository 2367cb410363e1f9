"""A model's kind (chat, embedding, reranking: registry/gguf_meta.py `model_kind`) where models are
listed and shown: `myllm list` and `show` (on the registry, and through a daemon), the native
`/api/models`, Ollama's `/api/tags` and `/api/show` `capabilities`. And rows registered before
kinds were recorded: their kind (and the keys it is told by) read from the blob at the daemon's
start, once (registry/kinds.py), a row whose blob is gone left as it was.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import pytest
from sqlalchemy import select, update

from myllm.pull import pull
from myllm.registry.kinds import fill_in_kinds
from myllm.registry.schema import models
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.conftest import writable_home
from tests.encoder_fixture import POOLING_TYPES, write_encoder
from tests.retrieval_reference import Reference
from tests.server import running_servers

MYLLM = str(Path(sys.executable).parent / "myllm")
KINDS = {"enc:mean": "embedding", "enc:cls": "embedding", "rerank:tiny": "reranking", "smollm2:135m": "chat"}
POOLINGS = {"enc:mean": "mean", "enc:cls": "cls", "rerank:tiny": "rank"}
CAPABILITIES = {"embedding": ["embedding"], "reranking": ["rerank"]}


def home_with_encoders(models_home: Path, root: Path) -> tuple[Path, dict[str, Path]]:
    """A writable copy of the test models' home with the encoder fixtures pulled into it."""
    home = writable_home(models_home, root / "home")
    files = {name: write_encoder(root / f"{pooling}.gguf", pooling)  # type: ignore[arg-type]
             for name, pooling in POOLINGS.items()}
    registry = Registry.open(Settings(home=home))
    try:
        for name, path in files.items():
            pull(registry, Settings(home=home), str(path), name=name)
    finally:
        registry.close()
    return home, files


def myllm(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([MYLLM, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def kind_column(listing: str) -> dict[str, str]:
    """NAME -> KIND of `myllm list`'s table."""
    lines = listing.splitlines()
    at = lines[0].index("KIND")
    return {line.split()[0]: line[at:].split()[0] for line in lines[1:] if line.strip()}


def test_kinds_are_listed_and_shown_everywhere(models_home: Path, tmp_path: Path) -> None:
    home, _ = home_with_encoders(models_home, tmp_path)
    local = {**os.environ, "MYLLM_HOME": str(home), "MYLLM_PORT": "9"}  # no daemon there: the registry answers
    assert kind_column(myllm(local, "list")).items() >= KINDS.items()
    assert json.loads(myllm(local, "show", "rerank:tiny", "--json"))["kind"] == "reranking"
    assert "embedding" in myllm(local, "show", "enc:cls").splitlines()[1]
    with running_servers(Settings(home=home, num_threads=2)) as (main, ollama_url):
        listed = {m["name"]: m["kind"] for m in httpx.get(f"{main}/api/models").json()["models"]}
        assert listed.items() >= KINDS.items()
        assert httpx.get(f"{main}/api/models/enc:mean").json()["kind"] == "embedding"
        tags = {m["name"]: m["capabilities"] for m in httpx.get(f"{ollama_url}/api/tags").json()["models"]}
        client = ollama.Client(host=ollama_url)
        for name, kind in KINDS.items():
            shown = client.show(name).capabilities
            assert tags[name] == shown and shown == CAPABILITIES.get(kind, shown)
        assert {"completion", "embedding", "tools"} <= set(tags["smollm2:135m"])
        remote = {**os.environ, "MYLLM_HOME": str(tmp_path / "cli-home"), "MYLLM_PORT": main.rsplit(":", 1)[1]}
        assert kind_column(myllm(remote, "list")).items() >= KINDS.items()  # through the daemon's API
        assert json.loads(myllm(remote, "show", "enc:cls", "--json"))["kind"] == "embedding"


def test_rows_from_before_kinds_get_theirs_at_start(models_home: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    home, files = home_with_encoders(models_home, tmp_path)
    settings = Settings(home=home, num_threads=2)
    gone = write_encoder(tmp_path / "gone.gguf", "mean", seed=7)
    registry = Registry.open(settings)
    try:
        pull(registry, settings, str(gone), name="gone:1")
        registry.blobs.path(registry.get("gone:1").digest).unlink()
        with registry.engine.begin() as conn:  # as registration wrote them before kinds were recorded
            for row in conn.execute(select(models.c.id, models.c.details)).all():
                old = {k: v for k, v in row.details.items() if k not in ("kind", "pooling_type", "attention.causal")}
                conn.execute(update(models).where(models.c.id == row.id)
                             .values(details=old, modified_at=models.c.modified_at))
        before = {r.name: (r.kind, r.modified_at) for r in registry.list()}
    finally:
        registry.close()
    assert {kind for kind, _ in before.values()} == {"chat"}
    caplog.set_level(logging.INFO, logger="myllm.registry.kinds")
    cls = Reference(files["enc:cls"], POOLING_TYPES["cls"])
    try:
        with running_servers(settings) as (main, _):
            listed = {m["name"]: m["kind"] for m in httpx.get(f"{main}/api/models").json()["models"]}
            assert listed.items() >= {**KINDS, "gone:1": "chat"}.items()
            r = httpx.post(f"{main}/api/embeddings", json={"model": "enc:cls", "input": "the cat sat"}, timeout=120)
            want, _ = cls.embedding("the cat sat")  # CLS pooled: the pooling type came back with the kind
            assert max(abs(a - b) for a, b in zip(r.json()["embedding"], want)) < 1e-3
            gemma = httpx.post(f"{main}/v1/rerank", json={"model": "gemma3:270m", "query": "q", "documents": ["d"]})
            assert gemma.status_code == 400 and "is a chat model" in gemma.json()["error"]["message"]
    finally:
        cls.close()
    said = [r.getMessage() for r in caplog.records if r.name == "myllm.registry.kinds"]
    assert "model rerank:tiny is a reranking model (its kind read from its file, once)" in said
    assert any(line.startswith("the kind of model gone:1 is unknown") for line in said)
    registry = Registry.open(settings)
    try:
        after = {r.name: (r.kind, r.modified_at) for r in registry.list()}
        assert {name: at for name, (_, at) in after.items()} == {name: at for name, (_, at) in before.items()}
        assert "kind" not in registry.get("gone:1").details
        assert fill_in_kinds(registry) == 0  # nothing more to read (the missing blob is still missing)
    finally:
        registry.close()
