"""How request bodies come in, on a server and at a fleet's ingress alike (neither loads torch for it): a JSON body
whole, within its bound (--max-request-mb) and its deadline; an adapter upload within its bound (--max-adapter-mb)
and at its least rate; and the slots that bound how many uploads are read at once."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope

from adapters.errors import AdapterTooLarge, ClientUploadShareFull, TooManyUploads
from loraplex.errors import LoraplexError
from server.client_share import ClientShares

FORM_OVERHEAD = 64 << 10  # an upload's multipart boundaries and headers around its files

# A JSON body (at most --max-request-mb) arrives whole within this: one sent a byte at a time, or shorter than its
# Content-Length, would hold its connection for as long as its client likes
BODY_TIMEOUT_S = 60.0
# An upload body has no whole-body deadline (512 MiB over a slow honest link takes minutes), but each
# UPLOAD_WINDOW_BYTES of it must arrive within UPLOAD_WINDOW_S of the previous ones (nginx's client_body_timeout
# is the wait between two reads, which a byte a time never trips): 17 KiB/s at the least, or the upload ends with
# 408 and frees its slot. Without it, --max-concurrent-uploads trickled uploads held every slot forever.
UPLOAD_WINDOW_S = 60.0
UPLOAD_WINDOW_BYTES = 1 << 20


class RequestTooLarge(LoraplexError):
    http_status = 413
    code = "request_too_large"


class RequestTimeout(LoraplexError):
    http_status = 408
    code = "request_timeout"
    # the rest of a body that stalled is never read: the connection ends
    headers = {"Connection": "close"}  # noqa: RUF012 - read-only class constant


async def read_body(scope: Scope, receive: Receive, max_mb: int) -> Message:
    """The request's whole body as one `http.request` message, at most `max_mb` MiB of it (--max-request-mb;
    RequestTooLarge past it, before reading where Content-Length says so), within BODY_TIMEOUT_S (RequestTimeout);
    or the `http.disconnect` of a client that left first."""
    max_bytes = max_mb << 20
    too_large = (
        f"the request body is over this server's limit of {max_mb} MiB (--max-request-mb): send a shorter prompt "
        "or fewer messages"
    )
    declared = Headers(scope=scope).get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLarge(too_large)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return message
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > max_bytes:
                    raise RequestTooLarge(too_large)
                if not message.get("more_body", False):
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {BODY_TIMEOUT_S:g} s ({size} bytes came): send it whole, "
            "with a Content-Length that matches it"
        ) from None


class UploadSlots:
    """Uploads in progress, at most `limit` at once: each keeps copies of its files on disk until it ends (the
    parsed form's, the staged directory, the store's checked copy), each up to --max-adapter-mb, so unbounded
    concurrent uploads could fill the disk. At most `per_client` of them one client's (current_client; None: no
    share), so that one client cannot hold every slot while others wait. The slots are taken on the event loop only:
    a plain counter."""

    def __init__(self, limit: int, per_client: int | None) -> None:
        self.limit = limit
        self.taken = 0
        self.shares = ClientShares(per_client, ClientUploadShareFull)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """A slot for the block, held by the current client, freed however it ends; ClientUploadShareFull or
        TooManyUploads at once when none is free to it."""
        with self.shares.holding():
            if self.taken >= self.limit:
                raise TooManyUploads(
                    f"{self.taken} adapter uploads are in progress, the most this server takes at once "
                    "(--max-concurrent-uploads): retry when one has finished"
                )
            self.taken += 1
            try:
                yield
            finally:
                self.taken -= 1


async def limited(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """The request body, cut off as soon as it passes the limit (Content-Length is not trusted), or as soon as it
    falls behind the least rate (UPLOAD_WINDOW_BYTES per UPLOAD_WINDOW_S). Either way the parser closes the files
    it spooled so far, which removes them: nothing of the upload is left."""
    loop = asyncio.get_running_loop()
    chunks = aiter(stream)
    seen = 0
    window_seen = 0
    window_end = loop.time() + UPLOAD_WINDOW_S
    while True:
        try:
            # only the wait for the client is timed: a cancellation while the parser writes a chunk to disk, between
            # two yields, would not be turned into this timeout's TimeoutError
            async with asyncio.timeout_at(window_end):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(
                f"the upload sent less than {UPLOAD_WINDOW_BYTES >> 10} KiB in {UPLOAD_WINDOW_S:g} s "
                f"({seen} bytes came in all): send it at {UPLOAD_WINDOW_BYTES / UPLOAD_WINDOW_S / 1024:.0f} KiB/s "
                "at the least"
            ) from None
        seen += len(chunk)
        if seen > max_bytes:
            raise AdapterTooLarge(
                f"the upload is over the server's limit of {max_bytes / 2**20:.1f} MiB (--max-adapter-mb)"
            )
        window_seen += len(chunk)
        if window_seen >= UPLOAD_WINDOW_BYTES:
            window_seen = 0
            window_end = loop.time() + UPLOAD_WINDOW_S
        yield chunk
