"""Running the daemon under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import signal
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from myllm.api.app import create_app, create_ollama_app
from myllm.errors import ShuttingDown
from myllm.settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's `fields` (a
    request line's api, route, model, tokens, latency, key hash) as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters that end a line or drive a terminal (ANSI escapes start with ESC, 0x1b)."""


def escape_controls(text: str) -> str:
    """`text` with its control characters written as escapes (`\\n`, `\\x1b`)."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class EscapeControls(logging.Filter):
    """For the text log: what a line interpolates (a request's path, a model's name, a runner's
    last words, anything a client or a model file controls) cannot start a forged line with a
    newline nor rewrite the terminal with ANSI escapes. The format strings, which are the
    code's own, keep their newlines. (The JSON log needs none of this: json escapes them.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._escaped(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: self._escaped(arg) for key, arg in record.args.items()}
        return True

    @staticmethod
    def _escaped(arg: object) -> object:
        if isinstance(arg, (int, float, bool)) or arg is None:
            return arg
        text = str(arg)
        return escape_controls(text) if _CONTROLS.search(text) else arg


def _log_setup(level: str, log_format: str) -> None:
    """myllm's own log: Rich lines for people at a terminal, plain lines for a file or a service
    manager's journal (Rich there only pads lines, and costs the daemon ~1.5 MB), or JSON
    lines (`MYLLM_LOG_FORMAT=json`) for a log collector."""
    logger = logging.getLogger("myllm")
    if not logger.handlers:
        if log_format == "json":
            handler: logging.Handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JsonFormatter())
        elif sys.stderr.isatty():
            from rich.console import Console
            from rich.logging import RichHandler

            handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False, rich_tracebacks=False)
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s %(message)s"))
        if log_format != "json":  # lines for people: control characters escaped
            handler.addFilter(EscapeControls())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def proxy_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's handling of X-Forwarded-For/-Proto: believed only from `MYLLM_TRUSTED_PROXIES`.
    (uvicorn's own default believes them from 127.0.0.1, so any local client could pose as any
    address and slip past the per-address rate limits.)"""
    trusted = [p.strip() for p in (settings.trusted_proxies or "").split(",") if p.strip()]
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None}


class _Server(uvicorn.Server):
    """Graceful shutdown: on SIGTERM/Ctrl-C stop accepting, let in-flight requests run for
    `grace` seconds, then abort them so each stream ends with its API's error event (rather
    than a cut connection), and exit 0 once the lifespan has closed the runtime and database.
    (uvicorn itself would re-raise the signal after shutting down, dying by it.)"""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float, siblings: list[uvicorn.Server]) -> None:
        super().__init__(config)
        self.app = app
        self.grace = grace
        self.siblings = siblings
        """Other listeners of this daemon (the Ollama port): they stop when this one does."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
        for sibling in self.siblings:
            sibling.should_exit = True
            sibling.force_exit = self.force_exit

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app.state.ready = False
        aborter = asyncio.create_task(self._abort_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            aborter.cancel()

    async def _abort_after_grace(self) -> None:
        await asyncio.sleep(self.grace)
        services = getattr(self.app.state, "services", None)
        if services is not None:
            logging.getLogger("myllm").info("grace period over: cancelling in-flight requests")
            services.runtime.abort_all(ShuttingDown("the server is shutting down"))


class Sibling(uvicorn.Server):
    """A second listener in the same process and event loop; the main server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def ollama_socket(host: str, port: int) -> socket.socket | None:
    """The Ollama listener's socket, bound now so a port already taken (a real Ollama running)
    costs one log line, not the daemon."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        logging.getLogger("uvicorn.error").warning(
            "Ollama API not served: port %d is taken (%s; is Ollama running?); serving on the main port only",
            port, exc.strerror or exc)
        return None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, host: str | None = None, port: int | None = None, log_level: str = "info") -> None:
    bind = host or settings.host
    _log_setup(log_level, settings.log_format)
    app = create_app(settings)
    common = {
        "host": bind, "log_level": log_level,
        "access_log": False,  # myllm's own access line has the model and tokens
        "ws": "none",  # no WebSocket routes: uvicorn would import a WebSocket library for nothing
        "timeout_graceful_shutdown": int(settings.shutdown_grace) + 5,  # a backstop after our own abort
        **proxy_options(settings),
    }
    config = uvicorn.Config(app, port=port or settings.port, **common)
    if not app.state.auth_required and not _loopback(bind):
        # uvicorn's logger: configured by Config, so the warning shows beside its own lines.
        logging.getLogger("uvicorn.error").warning(
            "listening on %s without API keys: anyone who can reach this port can use it "
            "(set MYLLM_API_KEYS or MYLLM_API_KEYS_FILE)", bind)
    siblings: list[tuple[uvicorn.Server, socket.socket]] = []
    sock = ollama_socket(bind, settings.ollama_port) if settings.ollama_port else None
    if sock is not None:
        app.state.ollama_port = settings.ollama_port
        side = Sibling(uvicorn.Config(create_ollama_app(app, settings), port=settings.ollama_port, **common))
        siblings.append((side, sock))
    main = _Server(config, app, settings.shutdown_grace, [side for side, _ in siblings])

    async def run_all() -> None:
        await asyncio.gather(main.serve(), *(side.serve(sockets=[s]) for side, s in siblings))

    # uvicorn.run's own choice of loop (uvloop, a dependency):
    # asyncio.run here would fall back to the pure-Python selector loop every request and token
    # goes through
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(run_all())


def main(argv: list[str] | None = None) -> None:
    """`python -m myllm.api.server`: what `myllm serve` execs, so that the daemon, which runs
    for days, holds nothing of the CLI (Typer, Click, the CLI's modules: ~2 MB). Settings come
    from the environment (`MYLLM_*`), as for `myllm serve`; `myllm serve --help` lists them."""
    import argparse

    parser = argparse.ArgumentParser(prog="myllm serve", description="Start the daemon.")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    serve(Settings(), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
