"""Several daemons over one database (issue 22): two real `myllm serve` processes, each with its
own home (blobs, KV) over a shared PostgreSQL (a throwaway cluster) or, the same suite, a shared
SQLite file. Sessions continue across daemons, concurrent turns on one session are serialised,
a daemon killed mid-turn costs only its unfinished turn, and a lost database is a 503."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from myllm.pull import pull
from myllm.registry.db import make_engine
from myllm.registry.migrations import MIGRATIONS, migrate, schema_version
from myllm.registry.schema import metadata
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.postgres import Cluster, throwaway_cluster
from tests.server import Daemon

MODEL = "smollm2:135m"
RAMBLE = {"max_tokens": 800, "temperature": 2.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 7}
"""Sampling from the flattened whole vocabulary: the end-of-turn token is one of 49k, so the
answer runs to `max_tokens` (seconds on this machine), a turn still running when it is cut."""


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with throwaway_cluster() as c:
        yield c


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A shared, empty database: a fresh one in the throwaway PostgreSQL cluster, or a SQLite file."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("cluster").new_database()


def home_with_model(home: Path, database: str, smollm2_path: Path) -> Path:
    """A daemon's home whose blob store holds the test model, registered in `database` (a second
    home pulling it finds the row there: same name, same digest)."""
    reg = Registry.open(Settings(home=home, database_url=database))
    try:
        pull(reg, Settings(home=home, database_url=database), str(smollm2_path), name=MODEL)
    finally:
        reg.close()
    return home


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start(database: str, tmp_path: Path) -> Iterator[StartDaemon]:
    """Start a daemon named `name` over the shared database, with its own home."""
    daemons: list[Daemon] = []

    def run(name: str, home: Path | None = None, **env: str) -> Daemon:
        d = Daemon(home or tmp_path / name, MYLLM_DATABASE_URL=database, MYLLM_REPLICA_ID=name, MYLLM_NUM_CTX="1024",
                   MYLLM_NUM_PARALLEL="2", MYLLM_TURN_LEASE="3", **env)
        daemons.append(d)
        return d

    yield run
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(30)


@pytest.fixture
def pair(start: StartDaemon, database: str, tmp_path: Path, smollm2_path: Path) -> tuple[Daemon, Daemon]:
    """Two daemons over one database, each with the model in its own blob store."""
    a = start("a", home_with_model(tmp_path / "a", database, smollm2_path))
    b = start("b", home_with_model(tmp_path / "b", database, smollm2_path))
    return a, b


def turn(daemon: Daemon, session: str | None, text: str, max_tokens: int = 4, **extra: Any) -> httpx.Response:
    headers = {"X-MyLLM-Session": session} if session else {}
    return httpx.post(f"{daemon.url}/api/chat", headers=headers, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": text}],
        "options": {"max_tokens": max_tokens, "temperature": 0}, **extra})


def history(daemon: Daemon, session: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{daemon.url}/api/sessions/{session}", timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


def whole_turns(messages: list[dict[str, Any]]) -> list[str]:
    """The user texts of a history that is whole turns only (user, assistant, user, ...)."""
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2), "turns interleaved or cut"
    return [m["content"] for m in messages[::2]]


def test_migrations_build_the_orm_schema_on_postgresql(cluster: Cluster) -> None:
    engine = make_engine(cluster.new_database())
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert schema_version(engine) == MIGRATIONS[-1][0]
    assert migrate(engine) == [], "a second run applies nothing"
    engine.dispose()


def test_a_session_alternating_between_daemons_keeps_every_turn(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    first = turn(a, None, "Turn 1 on a")
    assert first.status_code == 200, first.text
    session = first.headers["X-MyLLM-Session"]
    assert first.headers["X-MyLLM-Replica"] == "a"
    prompt_tokens = [first.json()["usage"]["prompt_tokens"]]
    for n, (daemon, name) in enumerate([(b, "b"), (a, "a"), (b, "b")], start=2):
        r = turn(daemon, session, f"Turn {n} on {name}")
        assert r.status_code == 200, r.text
        assert r.headers["X-MyLLM-Replica"] == name
        assert r.headers["X-MyLLM-Session"] == session
        prompt_tokens.append(r.json()["usage"]["prompt_tokens"])
    assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == 4, "each turn saw the ones before"
    for daemon in (a, b):
        assert len(whole_turns(history(daemon, session))) == 4


def test_two_clients_writing_one_session_at_once_lose_nothing(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    session = "shared-by-two"
    answers: list[httpx.Response] = []

    def client(daemon: Daemon, name: str) -> None:
        for i in range(3):
            answers.append(turn(daemon, session, f"{name} says {i}"))

    threads = [threading.Thread(target=client, args=(d, f"{name}{k}")) for d, name in ((a, "a"), (b, "b")) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [r.status_code for r in answers] == [200] * 12, [r.text for r in answers if r.status_code != 200]
    users = whole_turns(history(b, session))
    assert sorted(users) == sorted(f"{d}{k} says {i}" for d in "ab" for k in range(2) for i in range(3))


def long_stream(daemon: Daemon, session: str, max_tokens: int = 800) -> Iterator[str]:
    """A streamed turn long enough to be cut: its SSE lines, as they come."""
    with httpx.stream("POST", f"{daemon.url}/api/chat", headers={"X-MyLLM-Session": session}, timeout=120, json={
            "model": MODEL, "stream": True, "options": {**RAMBLE, "max_tokens": max_tokens},
            "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]}) as r:
        assert r.status_code == 200, r.read()
        yield from r.iter_lines()


def test_a_daemon_killed_mid_turn_leaves_its_completed_turns(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    session = "survives-a-kill"
    assert turn(a, session, "A completed turn").status_code == 200
    lines = long_stream(a, session)
    assert any(line.startswith("data:") for line in lines), "the turn is under way"
    a.proc.kill()  # SIGKILL, mid-turn: its claim on the session lapses after MYLLM_TURN_LEASE (3 s)
    a.proc.wait(30)
    r = turn(b, session, "B goes on")
    assert r.status_code == 200, r.text
    assert whole_turns(history(b, session)) == ["A completed turn", "B goes on"]


def test_a_turn_waits_for_the_other_daemons_turn_at_most_turn_wait(
    start: StartDaemon, database: str, tmp_path: Path, smollm2_path: Path
) -> None:
    a = start("a", home_with_model(tmp_path / "a", database, smollm2_path))
    b = start("b", home_with_model(tmp_path / "b", database, smollm2_path), MYLLM_TURN_WAIT="1")
    session = "busy"
    lines = long_stream(a, session)
    assert any(line.startswith("data:") for line in lines)
    r = turn(b, session, "too eager")
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert "session 'busy' is busy: a turn on a has been running" in detail and "MYLLM_TURN_WAIT" in detail
    for _ in lines:  # let a's turn finish: then b's next turn goes through
        pass
    assert turn(b, session, "now").status_code == 200
    assert whole_turns(history(b, session)) == ["Count from 1 to 1000, one number per line.", "now"]


def test_a_model_registered_elsewhere_is_404_until_pulled_here(
    start: StartDaemon, database: str, tmp_path: Path, smollm2_path: Path
) -> None:
    start("a", home_with_model(tmp_path / "a", database, smollm2_path))
    b = start("b")
    listed = httpx.get(f"{b.url}/api/models", timeout=30).json()
    assert MODEL in [m["name"] for m in listed["models"]], "the registry is shared"
    r = turn(b, None, "Hi")
    assert r.status_code == 404
    # the source by its file name: no answer holds a path of a daemon's machine
    assert f"pull it here: `myllm pull file:{smollm2_path.name} --name {MODEL}`" in r.json()["detail"]
    home_with_model(tmp_path / "b", database, smollm2_path)  # the same pull on b's machine: same name, same digest
    assert turn(b, None, "Hi").status_code == 200


@pytest.fixture
def over_postgresql(cluster: Cluster, tmp_path: Path, smollm2_path: Path) -> Iterator[Daemon]:
    """One daemon over its own database in the throwaway cluster."""
    database = cluster.new_database()
    a = Daemon(home_with_model(tmp_path / "a", database, smollm2_path), MYLLM_DATABASE_URL=database,
               MYLLM_NUM_CTX="1024", MYLLM_TURN_LEASE="3")
    yield a
    a.proc.kill()
    a.proc.wait(30)


def test_a_lost_database_is_503_with_retry_after_and_no_lost_turn(over_postgresql: Daemon, cluster: Cluster) -> None:
    a = over_postgresql
    session = "through-an-outage"
    assert turn(a, session, "before").status_code == 200
    cluster.stop()
    try:
        down = httpx.get(f"{a.url}/api/sessions/{session}", timeout=30)
        assert down.status_code == 503 and down.headers["Retry-After"]
        assert "the database is unavailable" in down.json()["detail"]
        openai = httpx.post(f"{a.url}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
        assert openai.status_code == 503 and openai.headers["Retry-After"]
        assert openai.json()["error"]["code"] == "database_unavailable"
        assert turn(a, session, "while down").status_code == 503
    finally:
        cluster.start()
    assert turn(a, session, "after").status_code == 200
    # The database goes away while a turn generates (60 tokens: about a second here) and is back
    # 2.5 s later: the turn's store is tried again until it is.
    lines = long_stream(a, session, max_tokens=60)
    assert any(line.startswith("data:") for line in lines)
    cluster.stop()
    restart = threading.Timer(2.5, cluster.start)
    restart.start()
    last = json.loads([line for line in lines if line.startswith("data:")][-1].removeprefix("data:"))
    restart.join()
    assert last["done"] and "error" not in last, last
    assert "storing a turn: the database is unavailable" in "".join(a.output), "the store was tried again"
    assert whole_turns(history(a, session)) == ["before", "after", "Count from 1 to 1000, one number per line."]


def test_the_shared_database_is_the_only_shared_state(pair: tuple[Daemon, Daemon]) -> None:
    """What one daemon's clients change, another's see: models chosen through the LLM service."""
    a, b = pair
    r = httpx.post(f"{a.url}/load_model", json={"model_name": MODEL}, timeout=120)
    assert r.status_code == 200, r.text
    status = httpx.get(f"{b.url}/model_status", timeout=30).json()
    assert status["model_name"] == MODEL


def test_a_turn_whose_claim_lapsed_is_not_stored(database: str, tmp_path: Path) -> None:
    """A daemon that could not renew its claim (the database away longer than the lease) finds,
    when it stores its turn, that another turn took the session: `TurnLost`, nothing written."""
    from myllm.errors import TurnLost
    from myllm.registry.sessions import SessionStore

    engine = make_engine(database)
    store = SessionStore(engine)
    assert store.claim("s", "chat", MODEL, "first@a", lease=0.05) is None
    assert store.claim("s", "chat", MODEL, "second@b", lease=60) == "first@a", "a live claim is kept"
    time.sleep(0.1)
    assert store.claim("s", "chat", MODEL, "second@b", lease=60) is None, "a lapsed claim is taken over"
    with pytest.raises(TurnLost):
        store.append_turn("s", "chat", MODEL, [("user", "late", 1), ("assistant", "lost", 1)], holder="first@a")
    store.append_turn("s", "chat", MODEL, [("user", "on time", 1), ("assistant", "kept", 1)], holder="second@b")
    assert [m.content for m in store.history("s")] == ["on time", "kept"]
    assert store.claim("s", "chat", MODEL, "third@a", lease=60) is None, "storing the turn ended its claim"
    store.release("s", "third@a")
    assert store.claim("s", "chat", MODEL, "fourth@b", lease=60) is None, "a released claim is free"
    # A first turn that fails leaves no empty session behind.
    assert store.claim("new", "chat", MODEL, "fifth@a", lease=60) is None
    store.release("new", "fifth@a")
    assert [info.id for info in store.list()] == ["s"]
    engine.dispose()
