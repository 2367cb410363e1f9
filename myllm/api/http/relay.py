"""The one loop from the runtime's events to an answer: a streamed answer's frames (`relay`) or
a whole answer's end (`collect`). Each API supplies only its frames (`Frames`); what every
stream needs is done here once: the access log counts it, any error after the first byte is
an in-band error event in the API's shape followed by a clean end of the body (never a cut
connection), and the runtime's stream is closed however the answer ended. A client that
leaves cancels the loop (`CancelOnDisconnectMiddleware`), which closes the stream and so stops
the generation within one token."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable
from typing import ClassVar

from fastapi.responses import StreamingResponse
from starlette.requests import Request

from myllm.api.http import sse
from myllm.api.http.access_log import track
from myllm.api.http.errors import ApiError, in_band
from myllm.runtime.service import DoneEvent, GenerationStream, TokenEvent


class Frames(ABC):
    """One streamed answer's frames in one API's shape (SSE events, or NDJSON lines when
    `ndjson`). An object per answer, so it may keep what its frames need between events (the
    content block open, the events' numbering). Each function returns the frames to write, in
    order."""

    ndjson: ClassVar[bool] = False

    def start(self, stream: GenerationStream) -> Iterable[str]:
        """Before a stream's first event (a stream per prompt when a request has several)."""
        return ()

    @abstractmethod
    def token(self, event: TokenEvent) -> Iterable[str]:
        """A piece of the reply (its text may be empty: a character still incomplete)."""

    async def settle(self, done: DoneEvent) -> None:
        """What must happen before the reply's last frames go out (its turn stored): an error
        here is the answer's error."""

    @abstractmethod
    def done(self, done: DoneEvent) -> Iterable[str]:
        """The reply's end: tool calls (the stream's `tool_calls`), why it stopped, its usage."""

    @abstractmethod
    def error(self, err: ApiError) -> Iterable[str]:
        """The in-band error event: what failed after the answer started."""

    def end(self) -> Iterable[str]:
        """The last frames, after the end or after an error (OpenAI's `data: [DONE]`)."""
        return ()


def relay(request: Request, stream: GenerationStream, frames: Frames, *,
          more: AsyncIterator[GenerationStream] | None = None, after: Callable[[], None] | None = None) -> StreamingResponse:
    """`stream` answered as `frames`, then each stream of `more` (started as the one before it
    ends); `after` runs once they are over, however they ended (a session's turn released)."""
    track(request, stream)
    chunks = _frames(request, stream, frames, more, after)
    return sse.ndjson(chunks) if frames.ndjson else sse.response(chunks)


async def _frames(request: Request, first: GenerationStream, frames: Frames,
                  more: AsyncIterator[GenerationStream] | None, after: Callable[[], None] | None) -> AsyncIterator[str]:
    stream = first
    try:
        while True:
            for frame in frames.start(stream):
                yield frame
            async for event in stream:
                if isinstance(event, TokenEvent):
                    for frame in frames.token(event):
                        yield frame
                elif event.finish_reason != "cancelled":  # called off: nobody reads the end
                    await frames.settle(event)
                    for frame in frames.done(event):
                        yield frame
            following = await anext(more, None) if more is not None else None
            if following is None:
                break
            stream = following
            track(request, stream)
    except Exception as exc:  # a cancelled request (its client left) is no error: it goes on up
        for frame in frames.error(in_band(exc)):
            yield frame
    finally:
        await stream.aclose()
        if after is not None:
            after()
    for frame in frames.end():
        yield frame


async def collect(request: Request, stream: GenerationStream, each: Callable[[TokenEvent], None] | None = None) -> DoneEvent:
    """A whole answer: `stream` read to its end, each token shown to `each`, counted in the
    request's log line. An error goes on up, to be answered with a status code."""
    track(request, stream)
    async with stream:
        async for event in stream:
            if each is not None and isinstance(event, TokenEvent):
                each(event)
    assert stream.done is not None
    return stream.done
