"""Ollama's API on the second listener, driven by the official `ollama` client and LangChain's
`ChatOllama` / `OllamaEmbeddings` against a real daemon on the test models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import running_servers


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(main URL, Ollama URL) of one daemon over a writable copy of the test models."""
    home = writable_home(models_home, tmp_path_factory.mktemp("ollama") / "home")
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024)) as urls:
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> ollama.Client:
    return ollama.Client(host=urls[1], timeout=120)


def test_clients_find_ollama_running(urls: tuple[str, str]) -> None:
    _, url = urls
    assert httpx.get(url).text == "Ollama is running"
    assert httpx.head(url).status_code == 200
    assert httpx.get(f"{url}/api/version").json()["version"].count(".") == 2
    missing = httpx.get(f"{url}/api/nothing")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}
