"""The request guard: an ASGI middleware in front of every route. FastAPI reads and parses a JSON body before
any dependency runs, so the key check and the body limit cannot be dependencies: here a request without a
valid key gets its 401 before one byte of its body is read, and a body over the limit gets its 413 as soon
as it passes the limit, never buffered whole."""

from collections.abc import Collection

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.errors import LoraplexError
from loraplex.settings import Settings
from server.api.auth import authenticate
from server.api.errors import error_response
from server.api.intake import read_body


class AmbiguousLength(LoraplexError):
    """Both Content-Length and Transfer-Encoding: a proxy in front that reads the length one way and this server the
    other would split the connection's bytes into different requests (request smuggling). RFC 9112 6.3: refuse it,
    or take Transfer-Encoding alone, and close the connection after the answer either way."""

    http_status = 400
    code = "malformed_http"
    headers = {"Connection": "close"}  # noqa: RUF012 - read-only class constant


class RequestGuard:
    """`open_paths` need no key (probes, docs); routes under `own_limit` read their bodies themselves,
    against their own limit (the adapter upload: --max-adapter-mb)."""

    def __init__(
        self, app: ASGIApp, settings: Settings, open_paths: Collection[str], own_limit: tuple[str, ...]
    ) -> None:
        self.app = app
        self.settings = settings
        self.open_paths = frozenset(open_paths)
        self.own_limit = own_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = Headers(scope=scope)
        try:
            if "transfer-encoding" in headers and "content-length" in headers:
                raise AmbiguousLength(
                    "the request has both Content-Length and Transfer-Encoding: send one of them (the connection is "
                    "closed after this answer)"
                )
            if path not in self.open_paths:
                authenticate(self.settings, headers)
            if not path.startswith(self.own_limit):
                receive = await self._read_body(scope, receive)
        except LoraplexError as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body, at most --max-request-mb of it (the route would buffer it all anyway), and hand the
        app a `receive` that replays it (or the client's disconnect), then listens on for the client's disconnect."""
        pending = [await read_body(scope, receive, self.settings.max_request_mb)]

        async def replayed() -> Message:
            return pending.pop() if pending else await receive()

        return replayed
