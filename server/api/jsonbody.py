"""JSON request bodies of the inference routes parsed off the event loop.

FastAPI parses a body with json.loads on the event loop before any route code runs. A body within --max-request-mb
can hold a million tiny items (token ids, empty messages): 0.1 s of parsing, during which no other client's stream
moved, however early validation then refuses the request. Bodies past PARSE_ON_LOOP_BYTES are parsed on threads of
their own instead; the interpreter lock still changes hands every few milliseconds, so the loop keeps its turns.
Smaller bodies, nearly every honest request, are parsed where they are, without a thread's round trip.
"""

import asyncio
import json
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

PARSE_ON_LOOP_BYTES = 64 << 10  # ~0.3 ms of parsing at worst
PARSE_THREADS = 2  # parsing holds the interpreter lock: more threads would not parse faster
_threads = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="json-body")


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
    """A route whose JSON body, when large, is parsed off the event loop."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_OffLoopRequest(request.scope, request.receive))

        return route
