"""Server-sent events from an async iterator of Pydantic models; OpenAI-style streams end with [DONE]."""

from collections.abc import AsyncGenerator
from contextlib import aclosing

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _encode(events: AsyncGenerator[BaseModel], done_marker: bool, exclude_none: bool) -> AsyncGenerator[bytes]:
    # When the client disconnects, this generator is cancelled; closing `events` cancels the request.
    async with aclosing(events):
        async for event in events:
            yield b"data: " + event.model_dump_json(exclude_none=exclude_none).encode() + b"\n\n"
        if done_marker:
            yield b"data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """Streams while listening for the client's disconnect, whatever ASGI version the server speaks.

    With ASGI >= 2.4 Starlette only learns of a disconnect when a send fails, and servers may drop sends
    to a closed connection silently: the request would run to its end for nobody.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()  # cancels the body iterator, whose `finally` cancels the request


def sse_response(
    events: AsyncGenerator[BaseModel], *, done_marker: bool = False, exclude_none: bool = True
) -> StreamingResponse:
    """TGI streams: no marker, unset fields left out; OpenAI streams: `[DONE]` and explicit nulls."""
    body = _encode(events, done_marker, exclude_none)
    return EventStreamResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
