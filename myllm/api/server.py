"""Running the daemon under uvicorn."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn

from myllm.api.app import create_app
from myllm.settings import Settings


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown, so the process dies by the
    signal. A daemon that shut down cleanly should exit 0."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(settings: Settings, host: str | None = None, port: int | None = None, log_level: str = "info") -> None:
    config = uvicorn.Config(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level=log_level,
    )
    _Server(config).run()
