"""The 003 document's own Python (httpx) and cURL examples, unchanged but for the base URL,
against a daemon that has a model registered under the document's name, `llama-3-8b`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from myllm.pull import pull
from myllm.registry.schema import models
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.server import running_server

PYTHON_EXAMPLE = '''
import httpx

# Chat (streaming)
with httpx.stream(
    "POST",
    "http://localhost:8000/api/chat",
    json={
        "model": "llama-3-8b",
        "messages": [{"role": "user", "content": "Hello!"}],
        "stream": True
    }
) as response:
    for line in response.iter_lines():
        if line.startswith("data: "):
            print(line[6:])

# Generate (non-streaming)
response = httpx.post(
    "http://localhost:8000/api/generate",
    json={
        "model": "llama-3-8b",
        "prompt": "Once upon a time",
        "stream": False
    }
)
print(response.json()["text"])
'''

CURL_CHAT = """curl -X POST http://localhost:8000/api/chat \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "llama-3-8b",
    "messages": [{"role": "user", "content": "Hello!"}],
    "stream": false
  }'"""

CURL_GENERATE = """curl -X POST http://localhost:8000/api/generate \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "llama-3-8b",
    "prompt": "Once upon a time",
    "stream": false
  }'"""

CURL_EMBEDDINGS = """curl -X POST http://localhost:8000/api/embeddings \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "llama-3-8b",
    "input": "Hello world"
  }'"""


@pytest.fixture(scope="module")
def doc_server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[str]:
    home = tmp_path_factory.mktemp("doc-home")
    settings = Settings(home=home, num_threads=2, num_ctx=2048)
    registry = Registry.open(settings)
    pull(registry, settings, str(smollm2_path), name="smollm2:135m")
    alias = registry.copy("smollm2:135m", "llama-3-8b")
    # The examples use httpx's default 5 s timeout: cap replies as a Modelfile PARAMETER would
    # (32 tokens, ~0.2 s here: 128 once passed 5 s on a machine busy beside the suite).
    with registry.engine.begin() as conn:
        conn.execute(update(models).where(models.c.id == alias.id).values(parameters={"num_predict": 32}))
    registry.close()
    with running_server(settings) as url:
        yield url


def run(code: list[str], url: str) -> str:
    proc = subprocess.run(code, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_python_example(doc_server: str) -> None:
    script = PYTHON_EXAMPLE.replace("http://localhost:8000", doc_server)
    out = run([sys.executable, "-c", script], doc_server).splitlines()
    events = []
    for line in out:  # the chat's events (JSON objects), then the generated text, which may parse as JSON too
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(event, dict):
            break
        events.append(event)
    assert events[-1]["done"] is True and events[-1]["full_text"]
    assert all(not e["done"] for e in events[:-1])
    assert len(out) > len(events), "the generate example printed its text"


@pytest.mark.parametrize(("command", "keys"), [
    (CURL_CHAT, {"message", "session_id", "usage"}),
    (CURL_GENERATE, {"text", "usage"}),
    (CURL_EMBEDDINGS, {"embedding", "model"}),
])
def test_curl_examples(doc_server: str, command: str, keys: set[str]) -> None:
    out = run(["bash", "-c", command.replace("http://localhost:8000", doc_server)], doc_server)
    assert set(json.loads(out)) == keys
