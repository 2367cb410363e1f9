"""What a load balancer in front of several daemons reads: every response names the replica
that answered (`X-MyLLM-Replica`) and, for a turn of a stored session, the session
(`X-MyLLM-Session`); a request may name its session in that header instead of its body, so a
balancer can hash on the header and send a conversation back to the replica holding its KV."""

from __future__ import annotations

import socket

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from myllm.api.http.middleware import HttpMiddleware
from myllm.settings import Settings

SESSION_HEADER = "x-myllm-session"
SESSION_STATE = "myllm_session"


def replica_id(settings: Settings) -> str:
    return settings.replica_id or f"{socket.gethostname()}:{settings.port}"


def session_of(request: Request, in_body: str | None) -> str | None:
    """The session a request names: its body's `session_id`, else the header."""
    return in_body or request.headers.get(SESSION_HEADER) or None


def answered_for(request: Request, session_id: str) -> None:
    """Name `session_id` in this response's headers."""
    setattr(request.state, SESSION_STATE, session_id)


class ReplicaHeadersMiddleware(HttpMiddleware):
    def __init__(self, app: ASGIApp, replica: str) -> None:
        super().__init__(app)
        self.replica = replica.encode()

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-myllm-replica", self.replica))
                session = scope.get("state", {}).get(SESSION_STATE)
                if session:
                    headers.append((b"x-myllm-session", session.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)
