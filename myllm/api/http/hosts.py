"""The Host allow-list: a request must name this daemon in its `Host` header. A web page on
another site can make a browser send requests to `127.0.0.1` by pointing its own name there
(DNS rebinding, how any page could drive a local Ollama: CVE-2024-28224); such requests carry
the page's name as their Host, which is not on the list, so they get 403 before any route runs."""

from __future__ import annotations

import ipaddress
import socket

import psutil
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from myllm.api.http.errors import ApiError, ErrorRouter
from myllm.api.http.middleware import HttpMiddleware
from myllm.settings import Settings

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The names a request's Host may give (lower case, no port); None: any (`*`, unsafe).
    Beyond loopback, the machine's own names and addresses are added: that is how clients on
    the network reach it."""
    extra = [name.strip().lower() for name in (settings.allowed_hosts or "").split(",") if name.strip()]
    if "*" in extra:
        return None
    names = set(LOCAL_NAMES) | set(extra)
    if not _loopback(settings.host):
        if settings.host not in ANY_ADDRESS:
            names.add(settings.host.lower())
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        if settings.host in ANY_ADDRESS:
            names |= {a.address.split("%")[0].lower() for addrs in psutil.net_if_addrs().values() for a in addrs
                      if a.family in (socket.AF_INET, socket.AF_INET6)}
    return frozenset(names)


def host_name(header: str) -> str:
    """The name in a Host header, without its port or an IPv6 address's brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostAllowListMiddleware(HttpMiddleware):
    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None, errors: ErrorRouter) -> None:
        super().__init__(app)
        self.allowed = allowed
        self.errors = errors

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = dict(scope["headers"]).get(b"host")
        name = host_name(header.decode("latin-1")) if header is not None else None
        if self.allowed is None or name is None or name in self.allowed:
            await self.app(scope, receive, send)
            return
        message = (f"Host '{name}' is not one of this server's names; add it to MYLLM_ALLOWED_HOSTS if clients "
                   "reach the server by it")
        await self.errors.render(Request(scope), ApiError(403, message, "forbidden_host"))(scope, receive, send)
