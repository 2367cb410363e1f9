"""Running the daemon under uvicorn."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from myllm.api.app import create_app
from myllm.errors import ShuttingDown
from myllm.settings import Settings


def _log_with_rich(level: str) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logger = logging.getLogger("myllm")
    if not logger.handlers:
        console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
        logger.addHandler(RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False))
        logger.propagate = False
    logger.setLevel(level.upper())


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Server(uvicorn.Server):
    """Graceful shutdown: on SIGTERM/Ctrl-C stop accepting, let in-flight requests run for
    `grace` seconds, then abort them so each stream ends with its API's error event (rather
    than a cut connection), and exit 0 once the lifespan has closed the runtime and database.
    (uvicorn itself would re-raise the signal after shutting down, dying by it.)"""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.app = app
        self.grace = grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

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


def serve(settings: Settings, host: str | None = None, port: int | None = None, log_level: str = "info") -> None:
    bind = host or settings.host
    _log_with_rich(log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=bind, port=port or settings.port, log_level=log_level,
        access_log=False,  # myllm's own access line has the model and tokens
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,  # a backstop after our own abort
    )
    if not app.state.auth_required and not _loopback(bind):
        # uvicorn's logger: configured by Config, so the warning shows beside its own lines.
        logging.getLogger("uvicorn.error").warning(
            "listening on %s without API keys: anyone who can reach this port can use it "
            "(set MYLLM_API_KEYS or MYLLM_API_KEYS_FILE)", bind)
    _Server(config, app, settings.shutdown_grace).run()
