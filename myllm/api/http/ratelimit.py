"""Rate limits: a token bucket per caller (`MYLLM_RATE_LIMIT`, e.g. `120/minute`), and a cap on
how many generations one caller runs at once (`MYLLM_MAX_CONCURRENT_PER_KEY`), so one client
cannot take every slot of a model. A caller is its API key (by hash), or its address while keys
are off. Past either, 429 with `Retry-After` in the route's own shape; `/health` is never limited.
Wrong keys have a budget of their own per address (`MYLLM_AUTH_FAILURES`), checked before the
key is: an address that spent it gets 429 for every request until it refills, so guessing keys
costs time whatever the guesser's keys (and `X-Forwarded-For` is believed only from
`MYLLM_TRUSTED_PROXIES`: uvicorn, `api/server.py`)."""

from __future__ import annotations

import collections
import math
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from myllm.api.http.auth import caller_of, presented_keys
from myllm.api.http.errors import ApiError, ErrorRouter
from myllm.api.http.middleware import HttpMiddleware
from myllm.runtime.placement.reloads import Rate
from myllm.settings import Settings

UNLIMITED_PATHS = frozenset({"/health", "/"})
MAX_CALLERS = 10_000
"""Buckets kept; the least recently seen caller's goes first (a full bucket is what a new one gets)."""


class Buckets:
    """Token buckets: `requests` at once, refilled at `requests / period` per second."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, caller: str, now: float) -> float:
        """0 when the caller may go on (a token is spent), else the seconds until it may."""
        tokens, wait = self._now(caller, now)
        self._buckets.pop(caller, None)
        self._buckets[caller] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self._buckets) > MAX_CALLERS:
            self._buckets.popitem(last=False)
        return wait

    def wait(self, caller: str, now: float) -> float:
        """The seconds until the caller has a token, spending none."""
        return self._now(caller, now)[1]

    def _now(self, caller: str, now: float) -> tuple[float, float]:
        """The caller's tokens refilled up to `now`, and the seconds until it has one."""
        capacity, refill = float(self.rate.requests), self.rate.requests / self.rate.period
        tokens, since = self._buckets.get(caller, (capacity, now))
        tokens = min(capacity, tokens + (now - since) * refill)
        return tokens, 0.0 if tokens >= 1 else (1 - tokens) / refill


class Limits:
    """The counts both listeners share: a caller's requests are one budget on either port."""

    def __init__(self, rate: Rate | None, max_concurrent: int, auth_failures: Rate | None = None) -> None:
        self.buckets = Buckets(rate) if rate else None
        self.max_concurrent = max_concurrent
        self.running: collections.Counter[str] = collections.Counter()
        self.failures = Buckets(auth_failures) if auth_failures else None
        """Wrong keys per client address."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        failures = settings.auth_failures
        return cls(Rate.parse(settings.rate_limit, "rate_limit") if settings.rate_limit else None, settings.max_concurrent_per_key,
                   Rate.parse(failures, "auth_failures") if failures and failures.strip() else None)


def address(scope: Scope) -> str:
    """The client's address: the peer's, or what a trusted proxy said it was."""
    return str((scope.get("client") or ("?", 0))[0])


class RateLimitMiddleware(HttpMiddleware):
    def __init__(self, app: ASGIApp, limits: Limits, errors: ErrorRouter, generation_paths: frozenset[str]) -> None:
        """`generation_paths`: the listener's routes that occupy a model while they run (its
        documents say which), counted against `MYLLM_MAX_CONCURRENT_PER_KEY`."""
        super().__init__(app)
        self.limits = limits
        self.errors = errors
        self.generation_paths = generation_paths

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in UNLIMITED_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        caller = caller_of(scope)
        who = caller.key_hash or f"address:{address(scope)}"
        buckets, running = self.limits.buckets, self.limits.running
        if buckets is not None and (wait := buckets.take(who, time.monotonic())) > 0:
            await self._refuse(scope, receive, send, f"rate limit reached ({buckets.rate.requests} requests per "
                               f"{int(buckets.rate.period)} s); retry in {math.ceil(wait)} s", math.ceil(wait))
            return
        cap = self.limits.max_concurrent
        generating = cap > 0 and scope["method"] == "POST" and scope["path"] in self.generation_paths
        if generating and running[who] >= cap:
            await self._refuse(scope, receive, send, f"{running[who]} requests of this caller are already "
                               "generating (MYLLM_MAX_CONCURRENT_PER_KEY); retry when one finishes", 1)
            return
        if generating:
            running[who] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if generating:
                running[who] -= 1
                if running[who] <= 0:
                    del running[who]

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, message: str, retry_after: int) -> None:
        response = self.errors.render(Request(scope), ApiError(429, message, "rate_limited", retry_after=retry_after))
        await response(scope, receive, send)


class AuthFailureMiddleware(HttpMiddleware):
    """Outside the key check: refuses an address whose wrong-key budget is spent before its key
    is looked at, and spends one token of it for each request the key check answers 401 while
    it presented a key (a request without one guesses nothing)."""

    def __init__(self, app: ASGIApp, limits: Limits, errors: ErrorRouter) -> None:
        super().__init__(app)
        self.limits = limits
        self.errors = errors

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        failures = self.limits.failures
        if failures is None or scope["path"] in UNLIMITED_PATHS or not presented_keys(scope["headers"]):
            await self.app(scope, receive, send)
            return
        who = address(scope)
        if (wait := failures.wait(who, time.monotonic())) > 0:
            message = (f"too many requests with a wrong API key from this address ({failures.rate.requests} per "
                       f"{int(failures.rate.period)} s, MYLLM_AUTH_FAILURES); retry in {math.ceil(wait)} s")
            response = self.errors.render(Request(scope), ApiError(429, message, "rate_limited",
                                                                   retry_after=math.ceil(wait)))
            await response(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                failures.take(who, time.monotonic())
            await send(message)

        await self.app(scope, receive, sending)
