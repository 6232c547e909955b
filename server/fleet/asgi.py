"""One HTTP request carried as plain data to a process that runs the FastAPI app in-process, and its answer
carried back as a stream: the response start, then body chunks as the app sends them. This is how a router
in front of the replicas reuses the whole app (auth, limits, errors, SSE streams) instead of re-implementing
its routes. Pure asyncio: no Ray."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message

log = logging.getLogger("loraplex")

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class ForwardedRequest:
    """What the app needs of a request; picklable, so it crosses processes."""

    method: str
    path: str
    query_string: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: Headers


async def call_app(
    app: ASGIApp, request: ForwardedRequest, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> AsyncIterator[ResponseStart | bytes]:
    """Run `request` through `app`: one ResponseStart (with `extra_headers` added), then the body's chunks.
    Closing the iterator early is the client going away: the app receives `http.disconnect` and is cancelled,
    which cancels its request in the engine."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": request.headers,
        "client": request.client,
        "server": None,
        "state": {},
    }
    # unbounded: the app sends tokens as the engine makes them, a bounded amount per request
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    pending_body = [{"type": "http.request", "body": request.body, "more_body": False}]

    async def receive() -> Message:
        if pending_body:
            return pending_body.pop()
        await gone.wait()  # the app's SSE responses listen here for the client's disconnect
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # Starlette has already answered 500 (or cut the stream short); the log keeps why
            log.exception("request %s %s failed", request.method, request.path)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    complete = False
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [*message.get("headers", []), *extra_headers])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    complete = True
                    break
    finally:
        gone.set()
        if not complete:  # closed early: the client left, or the app died before it finished
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
