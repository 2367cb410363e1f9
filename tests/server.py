"""A real uvicorn serving the daemon's app on a free loopback port, in a background thread."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import uvicorn
from fastapi import FastAPI

from myllm.api.app import create_app, create_ollama_app
from myllm.api.server import Sibling, proxy_options
from myllm.settings import Settings


def _ephemeral() -> range:
    """The kernel's range for outgoing connections' source ports (Linux's default if unreadable)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


_CHOOSER = random.Random()  # its own state: a test seeding `random` does not make ports repeat


def _bind_free(sock: socket.socket) -> int:
    """Bind `sock` to a loopback port free now, chosen outside the ephemeral range: a port the
    kernel hands out (bind to 0) can be taken as the source port of any outgoing connection (a
    runner's, a client's) before a server binds it, which failed a CI run's server start."""
    ephemeral = _ephemeral()
    while True:
        port = _CHOOSER.randrange(10000, 65536)
        if port in ephemeral:
            continue
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:  # taken: the socket stays unbound, so the next port can be tried on it
            continue
        return port


def free_port() -> int:
    """A port for a server this process does not bind itself (a daemon process, PostgreSQL)."""
    with socket.socket() as s:
        return _bind_free(s)


def bound_socket() -> socket.socket:
    """A listening loopback socket for an in-process uvicorn: bound here and handed over, so no
    other process can take its port in between."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _bind_free(sock)
    sock.listen(128)
    return sock


def wait_until_healthy(url: str, alive: Callable[[], bool], timeout: float = 60) -> None:
    """Poll `/health` until it answers 200; fail early if the server died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} did not start")
        time.sleep(0.05)


T = TypeVar("T")
LAST_APP: FastAPI | None = None
"""The app of the most recent `running_server`, for tests that look inside the runtime."""
LAST_LOOP: asyncio.AbstractEventLoop | None = None
"""Its event loop, where `in_server` runs coroutines (the runtime's objects belong to it)."""


def in_server(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    """Run `coro` on the most recent server's event loop and return its result."""
    assert LAST_LOOP is not None
    return asyncio.run_coroutine_threadsafe(coro, LAST_LOOP).result(timeout)


@contextmanager
def running_servers(settings: Settings) -> Iterator[tuple[str, str]]:
    """The daemon's app and its Ollama listener, each a real uvicorn on a free loopback port,
    in one event loop as `myllm serve` runs them: (main URL, Ollama URL)."""
    global LAST_APP, LAST_LOOP
    sockets = [bound_socket(), bound_socket()]
    port, ollama_port = (int(sock.getsockname()[1]) for sock in sockets)
    settings = settings.model_copy(update={"ollama_port": ollama_port})
    LAST_APP = create_app(settings)
    LAST_APP.state.ollama_port = ollama_port
    servers = [
        uvicorn.Server(uvicorn.Config(LAST_APP, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                      **proxy_options(settings))),
        Sibling(uvicorn.Config(create_ollama_app(LAST_APP, settings), host="127.0.0.1", port=ollama_port,
                               log_level="warning", lifespan="off", **proxy_options(settings))),
    ]
    loop = LAST_LOOP = asyncio.new_event_loop()

    async def serve_all() -> None:
        await asyncio.gather(*(server.serve([sock]) for server, sock in zip(servers, sockets)))

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve_all()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, thread.is_alive)
    try:
        yield url, f"http://127.0.0.1:{ollama_port}"
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(30)
        loop.close()
        for sock in sockets:
            sock.close()


@contextmanager
def running_server(settings: Settings) -> Iterator[str]:
    """The daemon's main listener (its Ollama listener runs too, on a free port)."""
    with running_servers(settings) as (url, _):
        yield url


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and all its descendants (the daemon and its runners)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited meanwhile
            pass
    return total


MYLLM = str(Path(sys.executable).parent / "myllm")


class Daemon:
    """`myllm serve` as a process of its own (for tests that signal or kill it), its output kept."""

    def __init__(self, home: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [MYLLM, "serve", "--port", str(self.port)],
            env={**os.environ, "MYLLM_HOME": str(home), "MYLLM_NUM_THREADS": "1", "MYLLM_OLLAMA_PORT": "0", **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        wait_until_healthy(self.url, lambda: self.proc.poll() is None)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)
