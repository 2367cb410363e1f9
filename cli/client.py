"""Talking to the daemon over HTTP, where `myllm serve` listens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from myllm.settings import Settings


class DaemonError(Exception):
    """One line for the user: what went wrong talking to the daemon; `status` is the HTTP
    status, None when the daemon could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, host: str | None = None, port: int | None = None) -> None:
        settings = Settings()
        host = host or settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        self.base = f"http://{host}:{port or settings.port}"
        key = settings.api_keys.get_secret_value().split(",")[0].strip() if settings.api_keys else None
        self.http = httpx.Client(base_url=self.base, timeout=httpx.Timeout(10, read=None),
                                 headers={"Authorization": f"Bearer {key}"} if key else {})

    def _check(self, response: httpx.Response) -> Any:
        if response.is_success:
            return response.json()
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = None
        raise DaemonError(detail or f"the daemon answered {response.status_code}", response.status_code)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return self._check(self.http.request(method, path, **kwargs))
        except httpx.ConnectError:
            raise DaemonError(f"myllm is not running at {self.base}; start it with `myllm serve`") from None

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, json=body or {})

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The native API's SSE events, as dicts; closing the iterator drops the connection,
        which cancels generation in the daemon."""
        try:
            with self.http.stream("POST", path, json=body) as response:
                if not response.is_success:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except httpx.ConnectError:
            raise DaemonError(f"myllm is not running at {self.base}; start it with `myllm serve`") from None
