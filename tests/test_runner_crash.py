"""Each loaded model runs in its own process: a runner that dies (any signal, a llama.cpp abort)
costs that one model, never the daemon or the other models."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from myllm.pull import pull
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.hostile_gguf import write_aborting_gguf
from tests.test_serve import Daemon


def runner_of(daemon: Daemon, model: str) -> psutil.Process:
    """The daemon's runner process holding `model` (its command line names the model)."""
    for child in psutil.Process(daemon.proc.pid).children():
        cmdline = child.cmdline()
        if "myllm.runtime.runner" in cmdline and model in cmdline:
            return child
    raise AssertionError(f"no runner holds {model}")


def test_a_killed_runner_costs_only_its_own_model(private_home: Path) -> None:
    daemon = Daemon(private_home, MYLLM_NUM_CTX="2048")
    try:
        url = daemon.url
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
        other.chat.completions.create(model="gemma3:270m", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
        gemma = runner_of(daemon, "gemma3:270m")

        gemma_text: list[str] = []
        gemma_finish: list[str | None] = []

        def gemma_stream() -> None:  # a second model's stream on its own runner, running throughout
            for chunk in other.chat.completions.create(
                model="gemma3:270m", max_tokens=300, temperature=0, stream=True,
                messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
            ):
                if chunk.choices:
                    gemma_text.append(chunk.choices[0].delta.content or "")
                    gemma_finish.append(chunk.choices[0].finish_reason)

        gemma_thread = threading.Thread(target=gemma_stream)
        with httpx.stream("POST", f"{url}/api/chat", json={
            "model": "smollm2:135m", "stream": True, "options": {"temperature": 0, "max_tokens": 900},
            "messages": [{"role": "user", "content": "Write a long story."}],  # greedy: 900 tokens every run
        }, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            first = json.loads(next(lines)[6:])
            assert first["done"] is False
            gemma_thread.start()
            while len(gemma_text) < 5:
                time.sleep(0.01)
            smol = runner_of(daemon, "smollm2:135m")
            smol.send_signal(signal.SIGKILL)
            rest = [json.loads(line[6:]) for line in lines]
        assert rest[-1]["done"] is True
        assert "runner of model 'smollm2:135m' stopped (killed by SIGKILL)" in rest[-1]["error"]

        assert httpx.get(f"{url}/health").status_code == 200
        assert "smollm2:135m" not in [m["name"] for m in httpx.get(f"{url}/api/ps").json()["models"]]
        gemma_thread.join(120)
        assert gemma_finish[-1] == "length" and len("".join(gemma_text)) > 300, "the other model's stream finished"
        assert gemma.is_running() and runner_of(daemon, "gemma3:270m").pid == gemma.pid

        again = httpx.post(f"{url}/api/chat", json={"model": "smollm2:135m", "stream": False, "options": {"max_tokens": 5},
                                                    "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] > 0
        assert runner_of(daemon, "smollm2:135m").pid != smol.pid, "a fresh runner answered"
    finally:
        daemon.stop()


def test_a_model_that_aborts_llama_cpp_at_load(private_home: Path, smollm2_path: Path, tmp_path: Path) -> None:
    """A GGUF that trips a GGML_ASSERT while loading (an abort no handler can catch) kills its
    runner, not the daemon: the request gets a clear error naming the crash, the model is refused
    for a while instead of being loaded (and crashing) again on every request, and other models
    keep working."""
    bad = write_aborting_gguf(smollm2_path, tmp_path / "aborts.gguf")
    registry = Registry.open(Settings(home=private_home))
    pull(registry, Settings(home=private_home), str(bad), name="aborts")
    registry.close()
    daemon = Daemon(private_home)
    try:
        body = {"model": "aborts", "stream": False, "messages": [{"role": "user", "content": "Hi"}]}
        r = httpx.post(f"{daemon.url}/api/chat", json=body, timeout=60)
        assert r.status_code == 500
        detail = r.json()["detail"]
        assert "llama.cpp crashed while loading 'aborts:latest' (killed by SIGABRT" in detail
        assert "GGML_ASSERT" in detail, "llama.cpp's own words from the runner's stderr"

        started = time.perf_counter()
        again = httpx.post(f"{daemon.url}/api/chat", json=body, timeout=60)
        assert again.status_code == 500
        assert "crashed its runner while loading" in again.json()["detail"]
        assert "not trying again for" in again.json()["detail"]
        assert time.perf_counter() - started < 1, "refused at once, not loaded again"

        v1 = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")
        with pytest.raises(openai.InternalServerError) as info:
            v1.completions.create(model="aborts", prompt="Hi", max_tokens=2)
        assert info.value.body["code"] == "model_crashed"  # type: ignore[index]

        assert httpx.get(f"{daemon.url}/health").status_code == 200
        ok = httpx.post(f"{daemon.url}/api/chat", json={**body, "model": "smollm2:135m", "options": {"max_tokens": 3}}, timeout=60)
        assert ok.status_code == 200
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()


def test_runner_exits_with_the_daemon(private_home: Path) -> None:
    """A daemon killed outright leaves no runner behind holding a model's memory: a runner
    exits when its channel to the daemon closes."""
    daemon = Daemon(private_home)
    httpx.post(f"{daemon.url}/api/chat", json={"model": "smollm2:135m", "stream": False, "options": {"max_tokens": 2},
                                               "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
    runner = runner_of(daemon, "smollm2:135m")
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    runner.wait(10)
    assert not runner.is_running()


def test_a_runner_that_stops_answering_is_restarted(private_home: Path) -> None:
    """A runner that no longer answers (here stopped with SIGSTOP, as one stuck holding its
    interpreter would be) fails its health check: its requests end with an error saying so,
    readiness reports it, and the next request gets a fresh runner."""
    daemon = Daemon(private_home, MYLLM_HEALTH_INTERVAL="0.5")
    try:
        url = daemon.url
        body = {"model": "smollm2:135m", "stream": True, "options": {"temperature": 0, "max_tokens": 900},
                "messages": [{"role": "user", "content": "Write a long story."}]}
        with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            next(lines)
            stuck = runner_of(daemon, "smollm2:135m")
            stuck.suspend()
            events = [json.loads(line[6:]) for line in lines]
        assert events[-1]["done"] is True
        assert "restarted: it did not answer its health check within 1 s" in events[-1]["error"], events[-1]
        stuck.wait(10)
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "smollm2:135m" in health.json()["problems"][0], health.json()
        assert httpx.get(f"{url}/health", params={"ready": 1}, timeout=5).status_code == 503
        again = httpx.post(f"{url}/api/chat", json={**body, "stream": False, "options": {"max_tokens": 3}}, timeout=60)
        assert again.status_code == 200, again.text
        assert runner_of(daemon, "smollm2:135m").pid != stuck.pid
    finally:
        daemon.stop()
