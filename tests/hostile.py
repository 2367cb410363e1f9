"""The hostile suite's daemon and its watch (issue 27).

Each hostile case runs against a real `myllm serve` process (both listeners, keys on) while a
second client, Bob, keeps asking `/health` and a one-token chat with his own inference key. The
case passes only if every probe answered within `PROBE_TIMEOUT` ("not frozen": a bound, not a
speed target) and the daemon with its runners stayed under `MEMORY_CAP`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.conftest import writable_home
from tests.server import Daemon, free_port, tree_rss

ADMIN, ALICE, BOB = "admin-secret", "alice-secret", "bob-secret"
"""An admin key, the attacker's inference key and the bystander's inference key."""
MODEL = "smollm2:135m"
PROBE_TIMEOUT = 5.0
MEMORY_CAP = int(1.5 * 1024**3)


def key(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@dataclass
class Hostile:
    """A daemon under attack: its main URL, its Ollama URL and the process (for its memory)."""

    daemon: Daemon
    url: str
    ollama: str
    home: Path

    def chat(self, secret: str = BOB, timeout: float = PROBE_TIMEOUT) -> httpx.Response:
        """One token of chat: what a bystander asks while an attack runs."""
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                "options": {"max_tokens": 1}}  # the native API's name (Ollama's is num_predict)
        return httpx.post(f"{self.url}/api/chat", json=body, headers=key(secret), timeout=timeout)

    def rss(self) -> int:
        return tree_rss(psutil.Process(self.daemon.proc.pid))


@contextmanager
def hostile_daemon(models_home: Path, home: Path, **env: str) -> Iterator[Hostile]:
    """`myllm serve` over a writable copy of the test models' home, with an admin key and two
    inference keys, the Ollama listener on, a small context (so the runner's memory is small
    beside the cap). `env` adds or overrides settings."""
    ollama_port = free_port()
    settings = {
        "MYLLM_API_KEYS": ADMIN, "MYLLM_INFERENCE_KEYS": f"{ALICE},{BOB}", "MYLLM_OLLAMA_PORT": str(ollama_port),
        "MYLLM_NUM_CTX": "1024", "MYLLM_NUM_PARALLEL": "2", "MYLLM_NUM_THREADS": "1", **env,
    }
    daemon = Daemon(writable_home(models_home, home), **settings)
    try:
        hostile = Hostile(daemon, daemon.url, f"http://127.0.0.1:{ollama_port}", home)
        first = hostile.chat(timeout=120)  # the bystander's model is loaded before any case
        assert first.status_code == 200, first.text
        yield hostile
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(30)


@dataclass
class Watch:
    """What the bystander saw: each failed or slow probe, the number of rounds, the peak memory."""

    failures: list[str] = field(default_factory=list)
    rounds: int = 0
    peak_rss: int = 0


@contextmanager
def still_answering(hostile: Hostile, min_rounds: int = 1) -> Iterator[Watch]:
    """Run the body (the attack) while a thread probes the daemon as a bystander: `/health` and
    Bob's one-token chat, each within `PROBE_TIMEOUT`, and the daemon's memory with its runners.
    On exit, fails the test if any probe failed, memory passed `MEMORY_CAP`, or fewer than
    `min_rounds` rounds of probes completed while the attack ran."""
    watch = Watch()
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            for name, call in (("/health", lambda: httpx.get(f"{hostile.url}/health", timeout=PROBE_TIMEOUT)),
                               ("Bob's chat", hostile.chat)):
                started = time.monotonic()
                try:
                    status = call().status_code
                except httpx.HTTPError as e:
                    watch.failures.append(f"{name}: {type(e).__name__} after {time.monotonic() - started:.1f} s")
                    continue
                if status != 200:
                    watch.failures.append(f"{name}: status {status}")
            try:
                watch.peak_rss = max(watch.peak_rss, hostile.rss())
            except psutil.Error:
                watch.failures.append("the daemon is gone")
                return
            watch.rounds += 1
            done.wait(0.2)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        done.set()
        thread.join(2 * PROBE_TIMEOUT + 5)
    assert not watch.failures, f"the bystander was not served while the attack ran: {watch.failures[:5]}"
    assert watch.rounds >= min_rounds, f"only {watch.rounds} rounds of probes ran during the attack"
    assert watch.peak_rss < MEMORY_CAP, f"the daemon reached {watch.peak_rss / 2**20:.0f} MiB"
    assert hostile.daemon.proc.poll() is None, "the daemon died"
