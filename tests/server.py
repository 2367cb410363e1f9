"""A real uvicorn serving the daemon's app on a free loopback port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI

from myllm.api.app import create_app
from myllm.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


LAST_APP: FastAPI | None = None
"""The app of the most recent `running_server`, for tests that look inside the runtime."""


@contextmanager
def running_server(settings: Settings) -> Iterator[str]:
    global LAST_APP
    port = free_port()
    LAST_APP = create_app(settings)
    config = uvicorn.Config(LAST_APP, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, thread.is_alive)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
