"""JSON request bodies of the inference routes: their items bounded before they are parsed, and large ones parsed
off the event loop.

json.loads is C code that keeps the interpreter lock until it returns, and pydantic-core's validation of what it
returns is Rust code that keeps it too: neither hands the lock to another thread while it works, on the event loop
or off it. A body within --max-request-mb can hold a million tiny items (0.3 s of parsing, every client's stream
held that long, however early validation then refuses it), so its items are counted first, at the speed of a byte
search, and a body past what an honest request holds is refused unparsed (jsonitems.py); parsing and validation
then cost at most a few milliseconds.

Bodies past PARSE_ON_LOOP_BYTES are counted and parsed on threads of their own, two at a time, so that the event
loop takes its turns between such calls; smaller bodies, nearly every honest request, are counted (when they could
hold too many items at all) and parsed where they are, without a thread's round trip.
"""

import asyncio
import json
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.api.jsonitems import check_items

PARSE_ON_LOOP_BYTES = 64 << 10  # ~0.3 ms of parsing at worst
READ_ON_LOOP_BYTES = 4 << 10  # a body whose readings (read_where_cheapest) stay on the loop
PARSE_THREADS = 2  # parsing holds the interpreter lock: more threads would not parse faster
_threads = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="json-body")
T = TypeVar("T")


async def read_off_loop(read: Callable[[], T]) -> T:
    """`read()` on the body's threads: a reading of what a parsed body holds whose work follows its items, as parsing
    does (a chat's tools: each schema walked and dumped, ~0.03 s for 128 tools within the item bound), so that the
    event loop takes its turns meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(_threads, read)


async def read_where_cheapest(request: Request, read: Callable[[], T]) -> T:
    """`read()` (as read_off_loop's) on the event loop for a body of at most READ_ON_LOOP_BYTES, which it reads in
    well under a millisecond (nearly every request: no thread's round trip), and on the body's threads past it (a
    JSON schema near the grammar's bound: ~4 ms of walks and its compact dump)."""
    if len(await request.body()) <= READ_ON_LOOP_BYTES:  # the body as received: already read, kept by the request
        return read()
    return await read_off_loop(read)


class _OffLoopRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) <= PARSE_ON_LOOP_BYTES:
                self._json = json.loads(body)
            else:  # json.JSONDecodeError propagates as from Request.json: FastAPI's 422
                self._json = await asyncio.get_running_loop().run_in_executor(_threads, json.loads, body)
        return self._json


class OffLoopJsonRoute(APIRoute):
    """A route whose JSON body is refused past max_json_items items, and, when large, is parsed off the event
    loop."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            request = _OffLoopRequest(request.scope, request.receive)
            body = await request.body()
            max_seq_len: int = request.app.state.settings.max_seq_len
            if len(body) <= PARSE_ON_LOOP_BYTES:
                check_items(body, max_seq_len)
            else:  # TooManyJsonItems propagates to the error handlers: the body is never parsed
                await asyncio.get_running_loop().run_in_executor(_threads, check_items, body, max_seq_len)
            return await handler(request)

        return route
