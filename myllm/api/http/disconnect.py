"""Work stops when its client leaves. A streamed answer notices on its next write, but a
non-streamed one (a whole chat completion, a prompt being rendered) would run to its end for
nobody: this middleware waits for the client's disconnect beside the route and cancels the
route when it comes first. Cancelling reaches the runtime as it would for a stream: the
prompt's rendering is called off and the runner stops the generation within one token."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import Message, Receive, Scope, Send

from myllm.api.http.middleware import HttpMiddleware

CLIENT_GONE = "myllm_client_gone"
"""Set in the scope's state when the route was cancelled because its client left."""


class CancelOnDisconnectMiddleware(HttpMiddleware):
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_read = asyncio.Event()
        gone = asyncio.Event()
        answered = False

        async def receiving() -> Message:
            if body_read.is_set():  # the watcher owns the channel now: wait with it
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def sending(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        async def watch() -> None:
            await body_read.wait()
            # The server answers this once the client disconnects (or the response is complete).
            if (await receive())["type"] == "http.disconnect" and not answered:
                gone.set()

        route = asyncio.create_task(self.app(scope, receiving, sending))
        watcher = asyncio.create_task(watch())
        left = asyncio.create_task(gone.wait())
        try:
            await asyncio.wait({route, left}, return_when=asyncio.FIRST_COMPLETED)
            if not route.done():
                scope.setdefault("state", {})[CLIENT_GONE] = True
                route.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await route
        finally:
            for task in (watcher, left, route):
                task.cancel()
