"""API keys, of two kinds. With keys configured every route but `/health`, the docs and the
Ollama probes needs `Authorization: Bearer KEY` or `x-api-key: KEY` (the header Anthropic's
clients send); a missing or wrong key gets 401 in the route's own error shape.

- Admin keys (`MYLLM_API_KEYS`, `MYLLM_API_KEYS_FILE`): every route.
- Inference keys (`MYLLM_INFERENCE_KEYS`, `MYLLM_INFERENCE_KEYS_FILE`): generation, chat,
  embeddings, probabilities and read-only listings; what changes the registry or other users'
  state (pull, create, copy, delete, blob upload, unload, switching the legacy default model)
  asks `require_admin` and gets 403.

Only the keys' sha256 hashes are kept in memory; a presented key is hashed and compared with
each in constant time. The hash is also who owns a stored conversation (`Caller.key_hash`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from myllm.api.http.errors import ApiError, ErrorRouter
from myllm.api.http.middleware import HttpMiddleware
from myllm.errors import Forbidden
from myllm.registry.sessions import Viewer
from myllm.runtime.placement.leases import ExtendOnly, KeepAlive
from myllm.settings import Settings

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
CALLER = "myllm_caller"
"""Where the middleware leaves the request's `Caller` (the scope's state)."""


@dataclass(frozen=True)
class Caller:
    admin: bool
    key_hash: str | None
    """sha256 of the key presented; None while keys are off (then every caller is an admin)."""

    @property
    def viewer(self) -> Viewer:
        """Whose stored conversations this caller may see."""
        return Viewer(self.key_hash, self.admin)


NO_KEYS = Caller(admin=True, key_hash=None)


def _hash(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _read(inline: SecretStr | None, file: Path | None) -> frozenset[bytes]:
    """Keys given inline (comma-separated) and as lines of a file ('#' starts a comment), hashed."""
    keys: list[str] = inline.get_secret_value().split(",") if inline else []
    if file:
        keys += [line for line in Path(file).expanduser().read_text().splitlines() if not line.lstrip().startswith("#")]
    return frozenset(_hash(k.strip().encode()) for k in keys if k.strip())


@dataclass(frozen=True)
class KeyRing:
    admin: frozenset[bytes]
    inference: frozenset[bytes]

    @classmethod
    def load(cls, settings: Settings) -> KeyRing:
        """Read once, when the app is built: requests never touch the files, so a key added or
        removed there counts after a restart."""
        return cls(_read(settings.api_keys, settings.api_keys_file),
                   _read(settings.inference_keys, settings.inference_keys_file))

    def __bool__(self) -> bool:
        return bool(self.admin or self.inference)

    def identify(self, presented: list[bytes]) -> Caller | None:
        """The caller a request's keys make it, or None. Every stored hash is compared (no early
        exit), each in constant time."""
        for key in presented:
            digest = _hash(key)
            admin = inference = False
            for known in self.admin:
                admin |= hmac.compare_digest(digest, known)
            for known in self.inference:
                inference |= hmac.compare_digest(digest, known)
            if admin or inference:
                return Caller(admin=admin, key_hash=digest.hex())
        return None


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The keys a request presents: a Bearer token and an `x-api-key` value, each if sent."""
    found = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                found.append(token.strip())
        elif name == b"x-api-key":
            found.append(value.strip())
    return found


def caller_of(scope: Scope) -> Caller:
    return scope.get("state", {}).get(CALLER, NO_KEYS)  # type: ignore[no-any-return]


def reloading_key(request: Request) -> str | None:
    """Whose loads count against MYLLM_RELOADS_PER_KEY: an inference key's hash. None (not
    limited) for admin keys, who may unload any model anyway, and while keys are off."""
    caller = caller_of(request.scope)
    return None if caller.admin else caller.key_hash


def viewer(request: Request) -> Viewer:
    return caller_of(request.scope).viewer


def keep_alive_of(request: Request, value: str | float | None) -> KeepAlive:
    """A request's `keep_alive` as the runtime takes it: an admin's as given, an inference key's
    only to lengthen the model's stay (a shared model is not unloaded or cut short by one user)."""
    return value if value is None or caller_of(request.scope).admin else ExtendOnly(value)


def require_admin(request: Request, what: str) -> None:
    """Refuse `what` to an inference key (403 in the route's shape)."""
    if not caller_of(request.scope).admin:
        raise Forbidden(f"{what} needs an admin key; this key may only run models")


class ApiKeyMiddleware(HttpMiddleware):
    def __init__(self, app: ASGIApp, keys: KeyRing, errors: ErrorRouter, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        super().__init__(app)
        self.keys = keys
        self.errors = errors
        self.open_paths = open_paths

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.keys:
            await self.app(scope, receive, send)
            return
        caller = self.keys.identify(presented_keys(scope["headers"]))
        if caller is not None:
            scope.setdefault("state", {})[CALLER] = caller
        if caller is not None or scope["method"] == "OPTIONS" or scope["path"] in self.open_paths:
            # CORS preflights carry no credentials; open paths answer anyone.
            await self.app(scope, receive, send)
            return
        message = "missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
        response = self.errors.render(Request(scope), ApiError(401, message, "unauthorized"))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
