"""`myllm serve` as a process: its access log and its graceful shutdown."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import Daemon


@pytest.fixture
def daemon(private_home: Path) -> Iterator[Daemon]:
    d = Daemon(private_home, MYLLM_SHUTDOWN_GRACE="3")
    yield d
    if d.proc.poll() is None:
        d.proc.kill()


def test_access_log_line_per_request(daemon: Daemon) -> None:
    httpx.post(f"{daemon.url}/api/chat", json={"model": "smollm2:135m", "options": {"max_tokens": 7, "temperature": 0},
                                               "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
    with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", json={
            "model": "smollm2:135m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
            timeout=60) as r:
        r.read()
    completions = httpx.post(f"{daemon.url}/v1/completions", json={
        "model": "smollm2:135m", "prompt": ["One, two,", "A, B,"], "max_tokens": 3, "temperature": 0}, timeout=60)
    httpx.get(f"{daemon.url}/api/models/nope:1")
    assert daemon.stop() == 0
    log = "".join(daemon.output)
    tokens = completions.json()["usage"]["completion_tokens"]  # both prompts' tokens
    assert tokens > 3 and f"POST /v1/completions 200 model=smollm2:135m tokens={tokens} " in log
    assert "POST /api/chat 200 model=smollm2:135m tokens=7" in log
    assert "POST /v1/chat/completions 200 model=smollm2:135m tokens=5" in log
    assert "GET /api/models/nope:1 404 model=- tokens=-" in log
    assert "ms" in log.split("tokens=7")[1].splitlines()[0]


def test_graceful_shutdown(daemon: Daemon, private_home: Path) -> None:
    events: list[dict] = []
    short: dict = {}

    def long_stream() -> None:
        with httpx.stream("POST", f"{daemon.url}/api/chat", json={
                "model": "gemma3:270m", "stream": True, "options": {"max_tokens": 3000, "temperature": 0},  # greedy: loops past 3,000 tokens
                "messages": [{"role": "user", "content": "Tell an endless story."}]}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))

    def short_request() -> None:
        short["response"] = httpx.post(f"{daemon.url}/api/generate", json={
            "model": "smollm2:135m", "prompt": "Hi", "options": {"max_tokens": 30}}, timeout=120)

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    deadline = time.monotonic() + 60
    while not events:
        assert time.monotonic() < deadline and streamer.is_alive(), "the long stream never started"
        time.sleep(0.05)
    httpx.post(f"{daemon.url}/api/models/smollm2:135m/load", timeout=60)
    shorty = threading.Thread(target=short_request)
    shorty.start()
    time.sleep(0.2)
    signalled = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{daemon.url}/health", timeout=2)  # no new connections once shutting down
    shorty.join(60)
    streamer.join(60)
    code = daemon.proc.wait(60)
    took = time.monotonic() - signalled
    assert short["response"].status_code == 200, "a request that fits in the grace period finishes"
    assert events[-1] == {"error": "the server is shutting down", "done": True}
    assert 2.5 < took < 15, f"cancelled after the 3 s grace period, exited after {took:.1f}s"
    assert code == 0
    wal = private_home / "myllm.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "the database was closed cleanly"


def test_sigterm_stops_renderings_within_the_grace(private_home: Path) -> None:
    """Chat templates still rendering (a template that would run for minutes, with a generous
    MYLLM_TEMPLATE_TIMEOUT) do not hold the daemon past its grace period: their renderings are
    called off and their threads never block the exit."""
    from myllm.registry.store import Overrides, Registry
    from myllm.settings import Settings
    from tests.test_starvation import MANY, SLOW_TEMPLATE

    registry = Registry.open(Settings(home=private_home))
    registry.copy("smollm2:135m", "loops", Overrides(template_override=SLOW_TEMPLATE))
    registry.close()
    daemon = Daemon(private_home, MYLLM_SHUTDOWN_GRACE="2", MYLLM_TEMPLATE_TIMEOUT="600")
    warm = httpx.post(f"{daemon.url}/api/chat", json={"model": "loops", "messages": [{"role": "user", "content": "Hi"}],
                                                      "options": {"max_tokens": 1}}, timeout=60)
    assert warm.status_code == 200, warm.text
    answers: list[httpx.Response | Exception] = []

    def slow() -> None:
        try:
            answers.append(httpx.post(f"{daemon.url}/api/chat", json={"model": "loops", "messages": MANY}, timeout=60))
        except httpx.HTTPError as exc:
            answers.append(exc)

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)  # rendering by now (the model is loaded)
    assert not answers, "still rendering"
    signalled = time.monotonic()
    code = daemon.stop()
    took = time.monotonic() - signalled
    for thread in threads:
        thread.join(30)
    assert code == 0 and took < 12, f"exited {code} after {took:.1f}s (grace 2 s)"
    assert len(answers) == 4


def test_a_taken_ollama_port_costs_one_line(private_home: Path) -> None:
    """A real Ollama on the port: the daemon says so once and serves its main port."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(private_home, MYLLM_OLLAMA_PORT=str(port))
        try:
            assert httpx.get(f"{daemon.url}/api/models", timeout=10).status_code == 200
            assert "ollama_port" not in httpx.get(f"{daemon.url}/").json()
        finally:
            assert daemon.stop() == 0
    said = [line for line in daemon.output if f"port {port} is taken" in line]
    assert len(said) == 1 and "Ollama" in said[0], "".join(daemon.output)


def test_the_ollama_port_serves_ollamas_api(private_home: Path) -> None:
    from tests.server import free_port

    port = free_port()
    daemon = Daemon(private_home, MYLLM_OLLAMA_PORT=str(port))
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "Ollama is running"
        assert httpx.get(f"{daemon.url}/").json()["ollama_port"] == port
    finally:
        assert daemon.stop() == 0


def test_json_log_lines(private_home: Path) -> None:
    """MYLLM_LOG_FORMAT=json: each request is one JSON object with its fields, and model loads
    are log events too."""
    daemon = Daemon(private_home, MYLLM_LOG_FORMAT="json", MYLLM_INFERENCE_KEYS="k1")
    reply = httpx.post(f"{daemon.url}/v1/chat/completions", headers={"Authorization": "Bearer k1"}, timeout=60,
                       json={"model": "smollm2:135m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.output if line.startswith("{")]
    [request] = [line for line in lines if line.get("route") == "/v1/chat/completions"]
    assert request["api"] == "openai" and request["status"] == 200 and request["model"] == "smollm2:135m"
    assert request["completion_tokens"] == reply["usage"]["completion_tokens"]
    assert request["prompt_tokens"] == reply["usage"]["prompt_tokens"] and request["ttft_ms"] > 0 and request["ms"] > 0
    import hashlib

    assert request["key"] == hashlib.sha256(b"k1").hexdigest()[:8] and "k1" not in json.dumps(request["message"])
    assert any(line["message"].startswith("loaded smollm2:135m") for line in lines)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
