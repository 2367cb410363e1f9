"""Issue 27, web and keys: pages of other sites (5), forwarded addresses and key guesses (7),
inference keys' keep_alive (9), path oracles (15), session ids across keys (16), paths in
answers (17). Each case runs against a real `myllm serve` while a bystander keeps being served
(`tests/hostile.py`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

from myllm.errors import InvalidOptions
from myllm.registry.db import make_engine
from myllm.registry.migrations import MIGRATIONS, migrate
from myllm.registry.sessions import ResponseStore, SessionStore, Viewer, resolve
from myllm.settings import Settings
from tests.conftest import CLOSED_PORT_URL
from tests.hostile import ADMIN, ALICE, BOB, MODEL, Hostile, hostile_daemon, key, still_answering
from tests.server import running_servers

NATIVE, OLLAMA, OPENAI = {"detail"}, {"error"}, {"error"}
LEGACY = {"status", "message", "detail", "error_code"}
HI = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": False, "options": {"max_tokens": 1}}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def keyed(models_home: Path, root: Path, smollm2_path: Path) -> Iterator[Hostile]:
    """Keys on, local files allowed under `root/allowed` (which holds `model.gguf`)."""
    allowed = root / "allowed"
    allowed.mkdir()
    os.link(smollm2_path, allowed / "model.gguf")
    with hostile_daemon(models_home, root / "keyed", MYLLM_MODEL_DIRS=str(allowed), HF_ENDPOINT=CLOSED_PORT_URL) as h:
        yield h


@pytest.fixture(scope="module")
def keyless(models_home: Path, root: Path) -> Iterator[Hostile]:
    """Keys off, as by default (Bob's key is then ignored)."""
    with hostile_daemon(models_home, root / "keyless", MYLLM_API_KEYS="", MYLLM_INFERENCE_KEYS="",
                        HF_ENDPOINT=CLOSED_PORT_URL) as h:
        yield h


def loaded(h: Hostile, headers: dict[str, str] | None = None) -> list[str]:
    return [m["name"] for m in httpx.get(f"{h.url}/api/ps", headers=headers or {}).json()["models"]]


# -- case 5: a web page of another site changes nothing -----------------------------------------

EVIL = "http://evil.example"
BLOB = b"bytes a page uploads"
PAGE_REQUESTS = [  # (listener, method, path, body, error shape): what a page could send without a preflight
    ("main", "POST", f"/api/models/{MODEL}/unload", None, NATIVE),
    ("main", "POST", "/api/models/gemma3:270m/load", None, NATIVE),
    ("main", "POST", "/load_model", '{"model_name": "gemma3:270m"}', LEGACY),
    ("main", "POST", "/api/chat", json.dumps(HI), NATIVE),
    ("main", "POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": HI["messages"]}), OPENAI),
    ("main", "DELETE", "/api/sessions/some-session", None, NATIVE),
    ("main", "DELETE", "/v1/responses/resp_1", None, OPENAI),
    ("ollama", "POST", f"/api/blobs/sha256:{hashlib.sha256(BLOB).hexdigest()}", BLOB, OLLAMA),
    ("ollama", "POST", "/api/pull", json.dumps({"model": "gemma3:270m", "name": "page"}), OLLAMA),
    ("ollama", "POST", "/api/create", json.dumps({"model": "page", "from": MODEL}), OLLAMA),
    ("ollama", "POST", "/api/copy", json.dumps({"source": MODEL, "destination": "page"}), OLLAMA),
    ("ollama", "DELETE", "/api/delete", json.dumps({"model": MODEL}), OLLAMA),
    ("ollama", "POST", "/api/generate", json.dumps({"model": MODEL, "keep_alive": 0}), OLLAMA),
]
PAGES = [  # how a browser marks a request a page of another site sent
    {"Origin": EVIL, "Content-Type": "text/plain"},
    {"Origin": EVIL, "Content-Type": "application/x-www-form-urlencoded"},
    {"Origin": "null"},  # a sandboxed frame, a file:// page
    {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},  # a browser that left Origin out
]


def test_a_page_of_another_site_changes_nothing_on_either_port(keyless: Hostile) -> None:
    h = keyless
    with still_answering(h):
        for headers in PAGES:
            for listener, method, path, body, shape in PAGE_REQUESTS:
                url = (h.url if listener == "main" else h.ollama) + path
                r = httpx.request(method, url, content=body, headers=headers, timeout=30)
                assert r.status_code == 403 and set(r.json()) == shape, (headers, path, r.status_code, r.text)
                assert "another site" in r.text or "MYLLM_ORIGINS" in r.text
        assert MODEL in loaded(h) and "gemma3:270m" not in loaded(h)
        assert httpx.head(f"{h.ollama}/api/blobs/sha256:{hashlib.sha256(BLOB).hexdigest()}").status_code == 404
        names = [m["name"] for m in httpx.get(f"{h.ollama}/api/tags").json()["models"]]
        assert MODEL in names and not any(n.startswith("page") for n in names)


def test_clients_that_are_not_pages_and_allowed_pages_still_work(keyless: Hostile, smollm2_path: Path) -> None:
    h = keyless
    main_port, ollama_port = h.url.rsplit(":", 1)[1], h.ollama.rsplit(":", 1)[1]
    with still_answering(h):
        # The daemon's own page (same origin) and the default allowed (local) origins.
        for origin, url in ((f"http://127.0.0.1:{main_port}", h.url), (f"http://127.0.0.1:{ollama_port}", h.ollama),
                            ("http://localhost:5173", h.url)):
            r = httpx.post(f"{url}/api/chat", json=HI, headers={"Origin": origin}, timeout=60)
            assert r.status_code == 200, r.text
        # curl: no Origin, no body or a form content type.
        assert httpx.post(f"{h.url}/api/models/gemma3:270m/load", timeout=60).status_code == 200
        assert httpx.post(f"{h.url}/api/models/gemma3:270m/unload", headers={"Content-Type": "text/plain"}).status_code == 200
        # The Ollama client's blob upload and create, and the OpenAI client.
        client = ollama.Client(host=h.ollama, timeout=60)
        digest = client.create_blob(smollm2_path)
        assert client.create(model="from-blob", files={"model.gguf": digest}).status == "success"
        assert client.delete("from-blob").status == "success"
        answer = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        assert answer.choices[0].message is not None


def test_listed_origins_replace_the_local_ones(models_home: Path) -> None:
    settings = Settings(home=models_home, num_threads=1, origins="https://app.example")
    with running_servers(settings) as (main, _):
        assert httpx.post(f"{main}/api/models/nope/unload", headers={"Origin": "https://app.example"}).status_code == 404
        refused = httpx.post(f"{main}/api/models/nope/unload", headers={"Origin": "http://localhost:3000"})
        assert refused.status_code == 403 and "MYLLM_ORIGINS" in refused.json()["detail"]
        assert httpx.get(f"{main}/api/models", headers={"Origin": EVIL}).status_code == 200  # reads: CORS's business


# -- case 7: forwarded addresses and key guesses ---------------------------------------------------


def test_key_guesses_are_limited_per_address_whatever_it_forwards(keyed: Hostile) -> None:
    h = keyed
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10) as guesser, \
            still_answering(h):
        statuses = [guesser.get(f"{h.url}/api/models", headers={**key(f"guess-{i}"), "X-Forwarded-For": f"10.0.0.{i}"})
                    .status_code for i in range(14)]
        assert statuses == [401] * 10 + [429] * 4
        # Past the budget a right key is refused too, on both ports: a guesser learns nothing.
        for url, shape in ((f"{h.url}/api/models", NATIVE), (f"{h.ollama}/api/tags", OLLAMA)):
            r = guesser.get(url, headers=key(ALICE))
            assert r.status_code == 429 and set(r.json()) == shape and 1 <= int(r.headers["Retry-After"]) <= 6
            assert "MYLLM_AUTH_FAILURES" in r.text
        assert httpx.get(f"{h.url}/api/models", headers=key(ALICE)).status_code == 200  # another address


def test_forwarded_for_counts_only_from_trusted_proxies(models_home: Path) -> None:
    forwarded = [{"X-Forwarded-For": f"10.0.0.{i}"} for i in range(5)]
    with running_servers(Settings(home=models_home, num_threads=1, rate_limit="3/minute")) as (main, _):
        assert [httpx.get(f"{main}/api/models", headers=h).status_code for h in forwarded] == [200] * 3 + [429] * 2
    settings = Settings(home=models_home, num_threads=1, rate_limit="3/minute", trusted_proxies="127.0.0.0/8")
    with running_servers(settings) as (main, _):
        assert [httpx.get(f"{main}/api/models", headers=h).status_code for h in forwarded] == [200] * 5
        assert [httpx.get(f"{main}/api/models", headers=forwarded[0]).status_code for _ in range(3)] == [200, 200, 429]


# -- case 9: an inference key's keep_alive never unloads a shared model ----------------------------


def keep_alive_unloads(h: Hostile) -> float:
    text = httpx.get(f"{h.url}/metrics", headers=key(ADMIN)).text
    found = re.findall(r'^myllm_model_evictions_total\{[^}]*reason="keep_alive"[^}]*\} (\S+)$', text, re.M)
    return sum(float(v) for v in found)


def test_an_inference_key_cannot_unload_through_keep_alive(keyed: Hostile) -> None:
    h = keyed
    one, ollama_one = {"max_tokens": 1}, {"num_predict": 1}
    requests = [
        (f"{h.url}/api/generate", {"model": MODEL, "prompt": "x", "keep_alive": 0, "stream": False, "options": one}),
        (f"{h.url}/api/chat", {**HI, "keep_alive": 0}),
        (f"{h.url}/api/embeddings", {"model": MODEL, "input": "x", "keep_alive": 0}),
        (f"{h.ollama}/api/generate", {"model": MODEL, "prompt": "x", "keep_alive": 0, "stream": False,
                                      "options": ollama_one}),
        (f"{h.ollama}/api/chat", {**HI, "options": ollama_one, "keep_alive": "0s"}),
        (f"{h.ollama}/api/embed", {"model": MODEL, "input": "x", "keep_alive": 0}),
        (f"{h.url}/v1/chat/completions", {"model": MODEL, "messages": HI["messages"], "max_tokens": 1, "keep_alive": 0}),
        (f"{h.url}/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "keep_alive": 0}),
        (f"{h.url}/v1/embeddings", {"model": MODEL, "input": "x", "keep_alive": 0}),
    ]
    before = keep_alive_unloads(h)
    with still_answering(h):
        for url, body in requests:
            r = httpx.post(url, json=body, headers=key(ALICE), timeout=60)
            assert r.status_code == 200, (url, r.text)
        # Nor cut short: the model's stay is still the default five minutes.
        r = httpx.post(f"{h.ollama}/api/generate", json={**requests[3][1], "keep_alive": "1s"}, headers=key(ALICE), timeout=60)
        assert r.status_code == 200
        ps = httpx.get(f"{h.ollama}/api/ps", headers=key(ADMIN)).json()["models"]
        expires = datetime.fromisoformat(next(m["expires_at"] for m in ps if m["name"] == MODEL))
        assert expires > datetime.now(timezone.utc) + timedelta(minutes=4)
        # Asking to unload outright stays an admin's.
        r = httpx.post(f"{h.ollama}/api/generate", json={"model": MODEL, "keep_alive": 0}, headers=key(ALICE))
        assert r.status_code == 403 and "admin key" in r.json()["error"]
        assert keep_alive_unloads(h) == before
    # An admin's keep_alive still counts (and loads nothing the bystander needs afterwards).
    r = httpx.post(f"{h.url}/api/embeddings", json={"model": MODEL, "input": "x", "keep_alive": 0}, headers=key(ADMIN),
                   timeout=60)
    assert r.status_code == 200 and keep_alive_unloads(h) == before + 1


# -- case 15: the same answer whether a path exists until it is allowed ---------------------------


def test_pull_and_load_say_nothing_of_paths_outside_the_model_dirs(keyed: Hostile, root: Path) -> None:
    h = keyed
    here = os.path.relpath(__file__)  # relative to the daemon's folder, which is ours
    pairs = [("/etc/passwd", "/etc/no-such-file"), ("file:/etc/passwd", "file:/etc/no-such-file"),
             (f"{root}/allowed/../../../../etc/passwd", f"{root}/allowed/../../../../etc/no-such-file"),
             ("~root/.profile", "~no-such-user-27/.profile")]
    if not here.startswith(".."):
        pairs.append((here, str(Path(here).with_name("no-such-file.py"))))
    routes = [(f"{h.ollama}/api/pull", "model", {"stream": False}), (f"{h.url}/load_model", "model_name", {})]
    with still_answering(h):
        for there, missing in pairs:
            for url, field, extra in routes:
                a, b = (httpx.post(url, json={field: p, **extra}, headers=key(ADMIN), timeout=60) for p in (there, missing))
                assert a.status_code == b.status_code and 400 <= a.status_code < 500, (there, url, a.text, b.text)
                assert a.text.replace(there, "PATH") == b.text.replace(missing, "PATH"), (a.text, b.text)
        # Inside the folders, a file is a file.
        r = httpx.post(f"{h.ollama}/api/pull", json={"model": f"{root}/allowed/model.gguf", "stream": False},
                       headers=key(ADMIN), timeout=60)
        assert r.status_code == 200, r.text


# -- case 16: a session id is its key's own -----------------------------------------------------


def chat(h: Hostile, secret: str, session: str, text: str) -> httpx.Response:
    body = {**HI, "session_id": session, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{h.url}/api/chat", json=body, headers=key(secret), timeout=60)


def history(h: Hostile, secret: str, session: str) -> list[str]:
    r = httpx.get(f"{h.url}/api/sessions/{session}", headers=key(secret))
    assert r.status_code == 200, r.text
    return [m["content"] for m in r.json()["messages"] if m["role"] == "user"]


def test_ids_are_scoped_by_key_and_kept_whole_with_keys_off() -> None:
    """A key's id is scoped (`id@tag`, so at most 111 characters of its own); with keys off an
    id is kept as given, all 128 characters the column holds, as before ids were scoped."""
    alice = Viewer("ab" * 32, False)
    assert resolve("s1", alice) == "s1@" + "ab" * 8
    assert resolve("s" * 128, Viewer(None, True)) == "s" * 128
    with pytest.raises(InvalidOptions):
        resolve("s" * 112, alice)


def test_two_keys_same_session_id_are_two_sessions(keyed: Hostile) -> None:
    h = keyed
    with still_answering(h):
        assert chat(h, ALICE, "s1", "Alice speaking").status_code == 200
        # Bob can neither see nor take Alice's "s1": his is another session, and nothing tells them apart
        # from an id never used.
        for path in ("s1", "never-used"):
            r = httpx.get(f"{h.url}/api/sessions/{path}", headers=key(BOB))
            assert r.status_code == 404 and r.json() == {"detail": f"session '{path}' not found"}
            r = httpx.delete(f"{h.url}/api/sessions/{path}", headers=key(BOB))
            assert r.status_code == 404 and r.json() == {"detail": f"session '{path}' not found"}
        assert chat(h, BOB, "s1", "Bob speaking").json()["session_id"] == "s1"
        assert history(h, ALICE, "s1") == ["Alice speaking"] and history(h, BOB, "s1") == ["Bob speaking"]
        # Squatting first changes nothing either, for generate sessions too.
        r = httpx.post(f"{h.url}/api/generate", json={"model": MODEL, "prompt": "Bob first", "session_id": "g1",
                                                    "stream": False, "options": {"max_tokens": 1}}, headers=key(BOB), timeout=60)
        assert r.status_code == 200
        r = httpx.post(f"{h.url}/api/generate", json={"model": MODEL, "prompt": "Alice next", "session_id": "g1",
                                                    "stream": False, "options": {"max_tokens": 1}}, headers=key(ALICE), timeout=60)
        assert r.status_code == 200 and history(h, ALICE, "g1") == ["Alice next"]
        # Each key lists its own ids as it named them; an admin sees both, each by an id it can open.
        for secret in (ALICE, BOB):
            ids = [s["id"] for s in httpx.get(f"{h.url}/api/sessions", headers=key(secret)).json()["sessions"]]
            assert "s1" in ids and "g1" in ids
        ids = [s["id"] for s in httpx.get(f"{h.url}/api/sessions", headers=key(ADMIN)).json()["sessions"]]
        scoped = [i for i in ids if i.startswith("s1@")]
        assert len(scoped) == 2
        assert sorted(history(h, ADMIN, i)[0] for i in scoped) == ["Alice speaking", "Bob speaking"]
        assert httpx.get(f"{h.url}/api/sessions/s1@0123456789abcdef", headers=key(BOB)).status_code == 400
        # A Responses chain of Alice's is as unknown to Bob as one that never was.
        rid = httpx.post(f"{h.url}/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 1},
                         headers=key(ALICE), timeout=60).json()["id"]
        answers = [httpx.post(f"{h.url}/v1/responses", json={"model": MODEL, "input": "More", "previous_response_id": r},
                              headers=key(BOB), timeout=60) for r in (rid, "resp_0123456789abcdef")]
        assert [a.status_code for a in answers] == [404, 404]
        assert answers[0].text.replace(rid, "ID") == answers[1].text.replace("resp_0123456789abcdef", "ID")
        cont = httpx.post(f"{h.url}/v1/responses", json={"model": MODEL, "input": "More", "previous_response_id": rid,
                                                       "max_output_tokens": 1}, headers=key(ALICE), timeout=60)
        assert cont.status_code == 200, cont.text


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    from tests.postgres import throwaway_cluster

    with throwaway_cluster() as cluster:
        yield cluster.new_database()


def test_sessions_made_before_are_moved_into_their_keys_scope(database: str) -> None:
    """A database from before the scopes: each key's sessions, messages and responses are moved
    under its scope and read back by their old ids; sessions made without keys stay as they were."""
    owner = hashlib.sha256(b"alice").hexdigest()
    engine = sa.create_engine(database)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE schema_migrations (name VARCHAR(128) PRIMARY KEY, applied_at TIMESTAMP)"))
        ops = Operations(MigrationContext.configure(conn))
        for name, step in MIGRATIONS[:7]:
            step(ops)
            conn.execute(sa.text("INSERT INTO schema_migrations VALUES (:n, CURRENT_TIMESTAMP)"), {"n": name})
        now = datetime.now(timezone.utc)
        for sid, who in (("s1", owner), ("chain", owner), ("open", None)):
            conn.execute(sa.text("INSERT INTO sessions (id, kind, model, owner, created_at, updated_at) "
                                 "VALUES (:id, 'chat', 'm', :o, :t, :t)"), {"id": sid, "o": who, "t": now})
            conn.execute(sa.text("INSERT INTO session_messages (session_id, seq, role, content, created_at) "
                                 "VALUES (:id, 1, 'user', :c, :t)"), {"id": sid, "c": f"in {sid}", "t": now})
        conn.execute(sa.text("INSERT INTO responses (id, session_id, upto, body, created_at) "
                             "VALUES ('resp_1', 'chain', 1, '{\"id\": \"resp_1\"}', :t)"), {"t": now})
    engine.dispose()
    engine = make_engine(database)  # applies the rest
    assert migrate(engine) == []
    alice, admin = Viewer(owner, False), Viewer(None, True)
    store, responses = SessionStore(engine), ResponseStore(engine)
    assert [m.content for m in store.history("s1", alice)] == ["in s1"]
    assert responses.conversation("resp_1", alice)[0] == "chain"
    assert [m.content for m in store.history("open", admin)] == ["in open"]
    assert {s.id for s in store.list(alice)} == {"s1", "chain"}
    assert {s.id for s in store.list(admin)} == {f"s1@{owner[:16]}", f"chain@{owner[:16]}", "open"}
    engine.dispose()


# -- case 17: no answer says where the daemon keeps its files ------------------------------------


def test_no_answer_holds_a_path_of_the_daemons_machine(keyed: Hostile, smollm2_path: Path, gemma3_path: Path) -> None:
    h = keyed
    admin = key(ADMIN)
    with still_answering(h):
        answers: list[Any] = [httpx.get(f"{h.url}{p}", headers=admin).text for p in (
            "/", "/api/models", f"/api/models/{MODEL}", "/api/models/gemma3:270m", "/api/ps", "/api/sessions", "/status",
            "/model_status", "/v1/models", f"/v1/models/{MODEL}", "/metrics")]
        answers += [httpx.get(f"{h.ollama}{p}", headers=admin).text for p in ("/api/tags", "/api/ps", "/api/version")]
        client = ollama.Client(host=h.ollama, headers=admin)
        for name in (MODEL, "gemma3:270m"):
            shown = client.show(name)
            assert shown.modelfile is not None and f"\nFROM {name}\n" in shown.modelfile
            answers.append(shown.model_dump_json())
        detail = httpx.get(f"{h.url}/api/models/{MODEL}", headers=admin).json()
        assert detail["source"] == f"file:{smollm2_path.name}"
    for text in answers:
        for secret in (str(h.home), "/blobs/", str(smollm2_path.parent), str(gemma3_path.parent)):
            assert secret not in text, (secret, text[:300])


# -- the pure rules ---------------------------------------------------------------------------


def test_origin_rule() -> None:
    from myllm.api.http.origins import Origins, refusal

    local, listed = Origins(()), Origins(("https://app.example",))
    page = {b"host": b"127.0.0.1:8000"}
    assert refusal("GET", {**page, b"origin": EVIL.encode()}, local) is None  # reads are CORS's business
    assert refusal("POST", page, local) is None  # curl, the Ollama and OpenAI clients
    assert refusal("POST", {**page, b"sec-fetch-site": b"none"}, local) is None
    assert refusal("POST", {**page, b"origin": b"http://127.0.0.1:8000"}, listed) is None  # the daemon's own page
    assert refusal("POST", {**page, b"origin": b"http://localhost:3000"}, local) is None
    assert refusal("POST", {**page, b"origin": b"http://localhost:3000"}, listed) is not None
    assert refusal("PUT", {**page, b"origin": b"https://app.example"}, listed) is None
    for bad in (EVIL.encode(), b"null", b"http://127.0.0.1.evil.example", b"http://127.0.0.1:8001"):
        assert refusal("DELETE", {**page, b"origin": bad}, listed) is not None
    assert refusal("POST", {**page, b"sec-fetch-site": b"cross-site"}, local) is not None
    assert refusal("POST", {**page, b"origin": EVIL.encode()}, Origins(("*",))) is None


def test_inside_judges_by_the_text_first(tmp_path: Path) -> None:
    from myllm.pull.sources import inside

    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (allowed / "link").symlink_to(tmp_path / "outside")
    assert inside(allowed / "sub" / "m.gguf", [allowed]) and inside(allowed / "missing.gguf", [allowed])
    assert not inside(allowed / ".." / "outside" / "m.gguf", [allowed])
    assert not inside(allowed / "link" / "m.gguf", [allowed])  # a link out of the folder
    assert not inside(Path("/etc/passwd"), [allowed]) and not inside(Path("relative.gguf"), [])


def test_keep_alive_lengthens_only() -> None:
    from myllm.runtime.placement.leases import outlasts

    assert outlasts(600, 300) and outlasts(-1, 300)
    assert not outlasts(0, 300) and not outlasts(1, 300) and not outlasts(600, -1) and not outlasts(-1, -1)
