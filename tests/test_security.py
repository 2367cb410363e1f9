"""Safe by default on a network: the Host allow-list, key kinds, sessions owned by their key,
rate limits. Against a real daemon (both listeners), with the official clients' shapes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from myllm.settings import Settings
from tests.server import running_servers

ROUTES = {  # a route of each API (and the Ollama listener's), and the keys its errors carry
    "/api/models": {"detail"},
    "/v1/models": {"error"},
    "/status": {"status", "message", "detail", "error_code"},
}


@pytest.fixture(scope="module")
def urls(models_home: Path) -> Iterator[tuple[str, str]]:
    with running_servers(Settings(home=models_home, num_threads=2, num_ctx=512, allowed_hosts="myllm.lan")) as urls:
        yield urls


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80"])
def test_a_foreign_host_is_403_on_both_listeners(urls: tuple[str, str], host: str) -> None:
    main, ollama = urls
    for path, keys in ROUTES.items():
        r = httpx.get(f"{main}{path}", headers={"Host": host})
        assert r.status_code == 403 and set(r.json()) == keys, (path, r.text)
        assert "MYLLM_ALLOWED_HOSTS" in r.text
    r = httpx.get(f"{ollama}/api/tags", headers={"Host": host})
    assert r.status_code == 403 and set(r.json()) == {"error"}
    assert httpx.post(f"{main}/api/chat", headers={"Host": host}, json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 403


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "LOCALHOST", "myllm.lan:8000"])
def test_local_and_listed_hosts_pass(urls: tuple[str, str], host: str) -> None:
    main, ollama = urls
    assert httpx.get(f"{main}/api/models", headers={"Host": host}).status_code == 200
    assert httpx.get(f"{ollama}/api/tags", headers={"Host": host}).status_code == 200


def test_star_turns_the_check_off(models_home: Path) -> None:
    with running_servers(Settings(home=models_home, num_threads=2, allowed_hosts="*")) as (main, _):
        assert httpx.get(f"{main}/api/models", headers={"Host": "evil.example"}).status_code == 200
