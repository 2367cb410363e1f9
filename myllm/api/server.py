"""Running the daemon under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import signal
from types import FrameType

import uvicorn

from myllm.api.app import create_app
from myllm.api.auth import load_keys
from myllm.settings import Settings


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown, so the process dies by the
    signal. A daemon that shut down cleanly should exit 0."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(settings: Settings, host: str | None = None, port: int | None = None, log_level: str = "info") -> None:
    bind = host or settings.host
    config = uvicorn.Config(create_app(settings), host=bind, port=port or settings.port, log_level=log_level)
    if not load_keys(settings) and not _loopback(bind):
        # uvicorn's logger: configured by Config, so the warning shows beside its own lines.
        logging.getLogger("uvicorn.error").warning(
            "listening on %s without API keys: anyone who can reach this port can use it "
            "(set MYLLM_API_KEYS or MYLLM_API_KEYS_FILE)", bind)
    _Server(config).run()
