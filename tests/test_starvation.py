"""Hangs and starvation: slow chat templates, conversations far past the context, huge prompts
and clients that leave. Each request ends with a clear answer in its route's shape, the rest of
the daemon keeps answering meanwhile, and work nobody waits for stops.

Client timeouts here are hang detectors (a request that used to run for minutes), not speed
targets."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tests.server
from myllm.registry.store import Overrides, Registry
from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import in_server, running_server

# Cubic in the number of messages, one attribute lookup per step: minutes for 200 messages.
SLOW_TEMPLATE = (
    "{% for a in messages %}{% for b in messages %}{% for c in messages %}"
    "{% if c.role == 'nobody' %}x{% endif %}{% endfor %}{% endfor %}{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
TIMEOUT = 3.0
MANY = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(199)]


@pytest.fixture(scope="module")
def url(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = writable_home(models_home, tmp_path_factory.mktemp("starvation") / "home")
    registry = Registry.open(Settings(home=home))
    registry.copy("smollm2:135m", "loops", Overrides(template_override=SLOW_TEMPLATE))
    registry.close()
    settings = Settings(home=home, num_threads=2, num_ctx=1024, template_timeout=TIMEOUT, max_queue=2)
    with running_server(settings) as url:
        yield url


def _services() -> Any:
    assert tests.server.LAST_APP is not None
    return tests.server.LAST_APP.state.services


def _pending() -> int:
    return _services().runtime.prepare.pending


def _wait_for(condition: Any, within: float) -> bool:
    ends = time.monotonic() + within
    while time.monotonic() < ends:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_a_slow_template_is_cut_off_and_starves_nobody(url: str) -> None:
    requests = [
        ("/api/chat", {"model": "loops", "messages": MANY}),
        ("/v1/chat/completions", {"model": "loops", "messages": MANY}),
    ] * 3
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(httpx.post, f"{url}{path}", json=body, timeout=60) for path, body in requests]
        # Readiness says what is degraded while the pool is full...
        assert _wait_for(lambda: httpx.get(f"{url}/health", params={"ready": 1}, timeout=5).status_code == 503, 20)
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 200 and "prompt preparation is full" in health.json()["problems"][0], health.text
        # ...and meanwhile the routes that use the default thread pool answer at once.
        assert httpx.get(f"{url}/api/models", timeout=5).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
        results = [(path, f.result()) for (path, _), f in zip(requests, answers)]
    for path, r in results:
        assert r.status_code in (400, 503), (path, r.status_code, r.text)
        body = r.json()
        message = body["detail"] if path.startswith("/api/") else body["error"]["message"]
        assert "took more than 3 s" in message or "prompts are being prepared" in message, message
    assert any(r.status_code == 400 for _, r in results), "some were rendered until their deadline"
    assert any(r.status_code == 503 for _, r in results), "the queue past 2 workers + 2 waiting is refused"
    assert _wait_for(lambda: _pending() == 0, 5)
    ok = httpx.post(f"{url}/api/chat", json={"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}],
                                             "options": {"max_tokens": 3}}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{url}/health", params={"ready": 1}, timeout=5).status_code == 200


def test_a_rendering_whose_client_left_is_called_off(url: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/api/chat", json={"model": "loops", "messages": MANY}, timeout=0.5)
    # Called off at the next step of the template, long before its 3 s deadline.
    assert _wait_for(lambda: _pending() == 0, TIMEOUT - 1.5)


def test_a_non_streamed_generation_whose_client_left_stops(url: str) -> None:
    body = {"model": "smollm2:135m", "options": {"max_tokens": 900, "temperature": 0},  # greedy: all 900 every run
            "messages": [{"role": "user", "content": "Write a long story."}]}
    httpx.post(f"{url}/api/chat", json={**body, "options": {"max_tokens": 2}}, timeout=60)  # loaded
    [inst] = [i for i in _services().runtime.manager._instances.values() if i.row.name == "smollm2:135m"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/api/chat", json=body, timeout=1.0)
    at_leave = in_server(inst.runner.stats())["decoded"]
    assert _wait_for(lambda: not in_server(inst.runner.stats())["busy"], 5)
    extra = in_server(inst.runner.stats())["decoded"] - at_leave
    assert extra < 100, f"{extra} tokens decoded after the client left"


def test_a_conversation_far_past_the_context_is_trimmed_in_one_pass(url: str) -> None:
    """1000 messages into 1024 tokens: each message tokenized once, not the whole conversation
    re-rendered per dropped message (which took 271 s)."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"This is message number {i}."} for i in range(1001)]
    r = httpx.post(f"{url}/api/chat", json={"model": "smollm2:135m", "messages": messages,
                                            "options": {"max_tokens": 3}}, timeout=60)
    assert r.status_code == 200, r.text
    kept = r.json()["usage"]["prompt_tokens"]
    assert 1021 - 40 < kept <= 1021, kept  # filled up to the reply's reserve (max_tokens), give or take a message


@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions", "/api/chat"])
def test_a_huge_prompt_is_refused_without_tokenizing_it(url: str, path: str) -> None:
    text = "lorem ipsum dolor sit amet " * 150_000  # 4 MB
    body: dict[str, Any] = {"model": "smollm2:135m", "prompt": text}
    if path == "/api/chat":
        body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": text}]}
    r = httpx.post(f"{url}{path}", json=body, timeout=20)
    assert r.status_code == 400, r.text
    message = r.json()["detail"] if path.startswith("/api/") else r.json()["error"]["message"]
    assert "more than 1024 tokens" in message, message
