"""Server-sent events from an async iterator of Pydantic models, in the TGI, the OpenAI or OpenAI's Responses
protocol.

The 200 goes out before the first event, so an error after it cannot change the status: the stream ends with
one last event that says what went wrong, in the protocol's shape, which its clients raise on (TGI's and
LoRAX's `{"error", "error_type"}`; OpenAI's `{"error": {"message", "type", "code"}}` then `[DONE]`, as vLLM; the
Responses API's `error` event)."""

import json
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from http import HTTPStatus

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Message, Receive, Scope, Send

from loraplex.errors import LoraplexError
from server.api.errors import error_body
from server.backlog import Backlog, current_backlog

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
log = logging.getLogger("loraplex")


@dataclass(frozen=True)
class SseProtocol:
    done_marker: bool  # a last `data: [DONE]`, after an error event too
    exclude_none: bool  # unset fields left out, or sent as explicit nulls
    error_event: Callable[[LoraplexError], dict]  # the last event of a failed stream
    named: bool = False  # each event has an `event:` line: its `type`


# the message and code a non-streaming answer would carry, in each protocol's shape
TGI = SseProtocol(False, True, lambda error: {"error": str(error), "error_type": error.code})
OPENAI = SseProtocol(True, False, lambda error: error_body(str(error), error.error_type, error.code))
RESPONSES = SseProtocol(
    False,
    False,
    lambda error: {"type": "error", "code": error.code, "message": str(error), "param": None},
    named=True,
)


# An event rendered off the event loop by its route: its JSON, or (a named protocol's) its name and its JSON
Rendered = bytes | tuple[str, bytes]


def _event(payload: bytes, name: str | None = None) -> bytes:
    head = b"" if name is None else b"event: " + name.encode() + b"\n"
    return head + b"data: " + payload + b"\n\n"


def _stream_error(exc: Exception) -> LoraplexError:
    """What the client hears of an error raised mid-stream: its own message and code, or for an error not raised
    on purpose, what an unhandled error answers (no internals). No exception handler sees it, so a server fault is
    logged here; a 4xx is the request's own, not logged (as in a non-streaming answer)."""
    error = exc if isinstance(exc, LoraplexError) else LoraplexError(HTTPStatus.INTERNAL_SERVER_ERROR.phrase)
    if error.http_status >= 500:
        log.error("a stream ended with an error: %s", exc, exc_info=exc)
    return error


async def _encode(events: AsyncGenerator[BaseModel | Rendered], protocol: SseProtocol) -> AsyncGenerator[bytes]:
    # When the client disconnects, this generator is cancelled; closing `events` cancels the request.
    # Cancellation is no Exception: it goes through, and no error event is written to a client that left.
    # A Rendered event was rendered off the event loop by its route (a large one: render.py).
    async with aclosing(events):
        try:
            async for event in events:
                if isinstance(event, bytes):
                    yield _event(event)
                    continue
                if isinstance(event, tuple):
                    yield _event(event[1], event[0])
                    continue
                name = getattr(event, "type", None) if protocol.named else None
                yield _event(event.model_dump_json(exclude_none=protocol.exclude_none).encode(), name)
        except Exception as exc:  # raised on, it would drop the connection mid-body: a broken stream, no reason
            yield failed_stream_end(protocol, _stream_error(exc))
            return
    if protocol.done_marker:
        yield DONE


def failed_stream_end(protocol: SseProtocol, error: LoraplexError) -> bytes:
    """The last bytes of a stream that failed after its 200: the protocol's error event, then its done marker."""
    name = "error" if protocol.named else None
    return _event(json.dumps(protocol.error_event(error)).encode(), name) + (DONE if protocol.done_marker else b"")


class EventStreamResponse(StreamingResponse):
    """Streams while listening for the client's disconnect, whatever ASGI version the server speaks.

    With ASGI >= 2.4 Starlette only learns of a disconnect when a send fails, and servers may drop sends
    to a closed connection silently: the request would run to its end for nobody.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (backlog := current_backlog.get()) is not None:
            send = _counted(send, backlog)
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()  # cancels the body iterator, whose `finally` cancels the request


def _counted(send: Send, backlog: Backlog) -> Send:
    """`send`, each body counted on the connection's backlog until it is written: a rendered event waits for the
    connection's writes to resume (the write buffer counts it once written)."""

    async def counted(message: Message) -> None:
        size = len(message.get("body", b""))
        backlog.add(size)
        try:
            await send(message)
        finally:
            backlog.add(-size)

    return counted


def sse_response(events: AsyncGenerator[BaseModel | Rendered], protocol: SseProtocol) -> StreamingResponse:
    return EventStreamResponse(_encode(events, protocol), media_type="text/event-stream", headers=SSE_HEADERS)
