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


ADMIN, ALICE, BOB = "admin-key", "alice-key", "bob-key"


@pytest.fixture(scope="module")
def keyed(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from tests.conftest import writable_home

    home = writable_home(models_home, tmp_path_factory.mktemp("keys") / "home")
    settings = Settings(home=home, num_threads=2, num_ctx=512, api_keys=ADMIN, inference_keys=f"{ALICE},{BOB}")
    with running_servers(settings) as urls:
        yield urls


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


HI = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}], "options": {"max_tokens": 2}}


def test_an_inference_key_runs_models_but_changes_nothing(keyed: tuple[str, str], smollm2_path: Path) -> None:
    main, ollama = keyed
    assert httpx.post(f"{main}/api/chat", json=HI, headers=as_key(ALICE), timeout=60).status_code == 200
    r = httpx.post(f"{main}/v1/chat/completions", headers=as_key(ALICE), timeout=60,
                   json={"model": "smollm2:135m", "messages": HI["messages"], "max_tokens": 2})
    assert r.status_code == 200
    assert httpx.post(f"{ollama}/api/chat", json={**HI, "stream": False}, headers=as_key(ALICE), timeout=60).status_code == 200
    assert httpx.get(f"{main}/api/models", headers=as_key(ALICE)).status_code == 200
    refused = [
        (httpx.post(f"{main}/api/models/smollm2:135m/unload", headers=as_key(ALICE)), {"detail"}),
        (httpx.post(f"{ollama}/api/pull", json={"model": str(smollm2_path)}, headers=as_key(ALICE)), {"error"}),
        (httpx.post(f"{ollama}/api/copy", json={"source": "smollm2:135m", "destination": "x"}, headers=as_key(ALICE)), {"error"}),
        (httpx.request("DELETE", f"{ollama}/api/delete", json={"model": "smollm2:135m"}, headers=as_key(ALICE)), {"error"}),
        (httpx.post(f"{ollama}/api/generate", json={"model": "smollm2:135m", "keep_alive": 0}, headers=as_key(ALICE)), {"error"}),
        (httpx.post(f"{main}/load_model", json={"model_name": str(smollm2_path)}, headers=as_key(ALICE)),
         {"status", "message", "detail", "error_code"}),
    ]
    for r, keys in refused:
        assert r.status_code == 403 and set(r.json()) == keys, r.text
        assert "needs an admin key" in r.text
    # A registered model: an inference key loads it, without switching the default for everyone.
    before = httpx.get(f"{main}/model_status", headers=as_key(ADMIN)).json()["model_name"]
    assert httpx.post(f"{main}/load_model", json={"model_name": "gemma3:270m"}, headers=as_key(ALICE), timeout=60).status_code == 200
    assert httpx.get(f"{main}/model_status", headers=as_key(ADMIN)).json()["model_name"] == before
    # The admin key may do all of it.
    assert httpx.post(f"{ollama}/api/copy", json={"source": "smollm2:135m", "destination": "mine"}, headers=as_key(ADMIN)).status_code == 200
    assert httpx.post(f"{main}/api/models/gemma3:270m/unload", headers=as_key(ADMIN)).status_code == 200
    assert httpx.get(f"{main}/api/models", headers=as_key("wrong")).status_code == 401


def test_sessions_belong_to_the_key_that_made_them(keyed: tuple[str, str]) -> None:
    main, _ = keyed
    made = httpx.post(f"{main}/api/chat", json=HI, headers=as_key(ALICE), timeout=60).json()["session_id"]
    assert httpx.get(f"{main}/api/sessions/{made}", headers=as_key(ALICE)).status_code == 200
    for r in (
        httpx.get(f"{main}/api/sessions/{made}", headers=as_key(BOB)),
        httpx.request("DELETE", f"{main}/api/sessions/{made}", headers=as_key(BOB)),
    ):
        assert r.status_code == 404 and r.json() == {"detail": f"session '{made}' not found"}, r.text
    assert made not in [s["id"] for s in httpx.get(f"{main}/api/sessions", headers=as_key(BOB)).json()["sessions"]]
    # Bob's chat on that id is a session of his own (ids are scoped by key: tests/test_hardening_web.py).
    assert httpx.post(f"{main}/api/chat", json={**HI, "session_id": made}, headers=as_key(BOB), timeout=60).status_code == 200
    assert len(httpx.get(f"{main}/api/sessions/{made}", headers=as_key(ALICE)).json()["messages"]) == 2
    admin_ids = [s["id"] for s in httpx.get(f"{main}/api/sessions", headers=as_key(ADMIN)).json()["sessions"]]
    assert len([i for i in admin_ids if i.startswith(f"{made}@")]) == 2
    # The Responses API's chains likewise.
    rid = httpx.post(f"{main}/v1/responses", json={"model": "smollm2:135m", "input": "Hi", "max_output_tokens": 2},
                     headers=as_key(ALICE), timeout=60).json()["id"]
    assert httpx.get(f"{main}/v1/responses/{rid}", headers=as_key(ALICE)).status_code == 200
    assert httpx.get(f"{main}/v1/responses/{rid}", headers=as_key(BOB)).status_code == 404
    cont = httpx.post(f"{main}/v1/responses", json={"model": "smollm2:135m", "input": "More", "previous_response_id": rid},
                      headers=as_key(BOB), timeout=60)
    assert cont.status_code == 404 and set(cont.json()) == {"error"}
    assert httpx.get(f"{main}/v1/responses/{rid}", headers=as_key(ADMIN)).status_code == 200


def test_rate_limit_per_key(models_home: Path) -> None:
    settings = Settings(home=models_home, num_threads=2, inference_keys=f"{ALICE},{BOB}", rate_limit="3/minute")
    with running_servers(settings) as (main, ollama):
        for _ in range(3):
            assert httpx.get(f"{main}/api/models", headers=as_key(ALICE)).status_code == 200
        for url, keys in ((f"{main}/api/models", {"detail"}), (f"{main}/v1/models", {"error"}), (f"{ollama}/api/tags", {"error"})):
            r = httpx.get(url, headers=as_key(ALICE))
            assert r.status_code == 429 and set(r.json()) == keys, r.text
            assert 1 <= int(r.headers["Retry-After"]) <= 20
        assert httpx.get(f"{main}/api/models", headers=as_key(BOB)).status_code == 200  # a bucket per key
        assert httpx.get(f"{main}/health").status_code == 200  # never limited


def test_concurrent_generations_per_key(models_home: Path) -> None:
    settings = Settings(home=models_home, num_threads=2, num_ctx=1024, inference_keys=f"{ALICE},{BOB}", max_concurrent_per_key=1)
    long = {"model": "smollm2:135m", "stream": True, "options": {"max_tokens": 300, "temperature": 0},
            "messages": [{"role": "user", "content": "Write a long story."}]}
    with running_servers(settings) as (main, _):
        with httpx.stream("POST", f"{main}/api/chat", json=long, headers=as_key(ALICE), timeout=60) as running:
            lines = running.iter_lines()  # held: a dropped iterator closes the connection
            next(lines)
            second = httpx.post(f"{main}/api/chat", json=HI, headers=as_key(ALICE), timeout=60)
            assert second.status_code == 429 and "MYLLM_MAX_CONCURRENT_PER_KEY" in second.json()["detail"]
            assert httpx.post(f"{main}/api/chat", json=HI, headers=as_key(BOB), timeout=60).status_code == 200
        assert httpx.post(f"{main}/api/chat", json=HI, headers=as_key(ALICE), timeout=60).status_code == 200


def test_local_paths_need_model_dirs_and_never_repoint_a_name(models_home: Path, tmp_path: Path, smollm2_path: Path,
                                                              gemma3_path: Path) -> None:
    import os

    from myllm.registry.store import Overrides, Registry
    from tests.conftest import writable_home

    home = writable_home(models_home, tmp_path / "home")
    allowed = tmp_path / "models"
    allowed.mkdir()
    os.link(gemma3_path, allowed / "victim.gguf")
    registry = Registry.open(Settings(home=home))
    made = registry.copy("smollm2:135m", "victim", Overrides(system="Made with care."))
    registry.close()
    blobs = sorted(p.name for p in (home / "blobs").iterdir())
    with running_servers(Settings(home=home, num_threads=2, model_dirs=str(allowed))) as (main, ollama):
        # Outside the folders: the same 403 whether the file exists or not, and none of its bytes.
        answers = [httpx.post(f"{main}/load_model", json={"model_name": str(p)}, timeout=60)
                   for p in (smollm2_path, "/etc/passwd", "/no/such/file.gguf")]
        assert {r.status_code for r in answers} == {403} and len({r.json()["message"] for r in answers}) == 1
        assert "MYLLM_MODEL_DIRS" in answers[0].text and "root" not in answers[1].text
        pulled = httpx.post(f"{ollama}/api/pull", json={"model": "/etc/passwd"})
        assert pulled.status_code == 403 and "MYLLM_MODEL_DIRS" in pulled.json()["error"]
        # Inside: a file whose name is taken by another model is a 409, and that model is untouched.
        for r in (httpx.post(f"{main}/load_model", json={"model_name": str(allowed / "victim.gguf")}, timeout=60),
                  httpx.post(f"{ollama}/api/pull", json={"model": str(allowed / "victim.gguf"), "stream": False}, timeout=60)):
            assert r.status_code == 409 and "victim:latest" in r.text and "another file" in r.text, r.text
        victim = httpx.get(f"{main}/api/models/victim").json()
        assert victim["digest"] == made.digest and victim["system"] == "Made with care."
    assert sorted(p.name for p in (home / "blobs").iterdir()) == blobs, "nothing left behind"


def test_errors_carry_no_paths_under_the_home(models_home: Path, tmp_path: Path, smollm2_path: Path) -> None:
    """A model llama.cpp refuses: the error names the model and its blob, not where MYLLM_HOME is."""
    from myllm.registry.store import Registry
    from tests.conftest import register_broken_model, writable_home

    home = writable_home(models_home, tmp_path / "secret-home")
    registry = Registry.open(Settings(home=home))
    (tmp_path / "elsewhere").mkdir()
    register_broken_model(registry, "broken", smollm2_path, tmp_path / "elsewhere")
    registry.close()
    with running_servers(Settings(home=home, num_threads=2)) as (main, ollama):
        answers = [
            httpx.post(f"{main}/api/chat", json={**HI, "model": "broken"}, timeout=60),
            httpx.post(f"{main}/v1/chat/completions", json={"model": "broken", "messages": HI["messages"]}, timeout=60),
            httpx.post(f"{ollama}/api/generate", json={"model": "broken", "prompt": "Hi", "stream": False}, timeout=60),
        ]
        for r in answers:
            assert r.status_code >= 400 and "broken" in r.text, r.text
            assert str(home) not in r.text and str(tmp_path) not in r.text, r.text


@pytest.mark.parametrize("template", [
    "{{ 'x' * 300000000 }}",  # grew the daemon to 5 GB, then bad_alloc
    "{% for a in range(99999) %}{% for b in range(99999) %}{{ a }}{% endfor %}{% endfor %}",  # pinned every worker
    "{% for m in messages %}{{ raise_exception('no') }}{% endfor %}",  # fails every conversation
])
def test_a_template_that_explodes_is_refused_at_registration(urls: tuple[str, str], template: str) -> None:
    import time

    from myllm.modelfile import ModelfileError, parse

    started = time.monotonic()
    with pytest.raises(ModelfileError) as info:
        parse(f'FROM smollm2:135m\nTEMPLATE """{template}"""\n')
    assert "chat template" in str(info.value) and time.monotonic() - started < 10
    r = httpx.post(f"{urls[1]}/api/create", json={"model": "boom", "from": "smollm2:135m", "template": template, "stream": False},
                   timeout=60)
    assert r.status_code == 400 and "chat template" in r.json()["error"], r.text
    assert httpx.get(f"{urls[1]}/api/tags").status_code == 200


def test_a_gguf_whose_own_template_explodes_is_refused_at_pull(tmp_path: Path, smollm2_path: Path) -> None:
    from myllm.errors import InvalidModelFile
    from myllm.pull import pull
    from myllm.registry.store import Registry
    from tests.hostile_gguf import rewrite_gguf

    hostile = tmp_path / "exploding.gguf"
    import gguf

    rewrite_gguf(smollm2_path, hostile, keys={"tokenizer.chat_template": ("{{ 'x' * 300000000 }}", gguf.GGUFValueType.STRING)})
    registry = Registry.open(Settings(home=tmp_path / "home"))
    try:
        with pytest.raises(InvalidModelFile) as info:
            pull(registry, Settings(home=tmp_path / "home"), str(hostile))
        assert "exploding.gguf" in str(info.value) and "chat template" in str(info.value)
        assert registry.list() == [] and not [p for p in (tmp_path / "home" / "blobs").iterdir() if p.is_file()]
    finally:
        registry.close()
