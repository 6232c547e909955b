"""A stream's backlog: the events the engine has made for a request that its connection has not written yet.

A client that reads its stream slowly holds about one event in its connection's write buffer; the rest of its
answer waits here, as events in its request's queue, made at the engine's speed (with top_logprobs 20, 8 choices of
2,047 tokens are tens of MB). The API layer counts each connection's backlog against the budget of answers waiting
for their clients (--max-unsent-mb, connections.py), as it counts the bytes in its write buffer: it sets
`current_backlog` for each request, and the scheduler adds each event's estimated bytes as it is queued for the
stream and takes them off as the stream reads it.

An event's bytes are estimated, not rendered (rendering is what the stream does once its client reads): a fixed part
for the event's own fields, each character of its text, and each top-logprob entry (the generated token's and, on
the first event, every prompt token's with its alternatives), each at the size it has in the largest protocol's
shape, OpenAI's chat chunk (`{"token": ..., "logprob": ..., "bytes": [...]}`), for a token of up to 16 bytes of text.
It errs high: on a vocabulary of one-byte tokens it is about 2.4 times the bytes of chat chunks with 20 top
logprobs (and of prompt scores), 6 times those of legacy completions' chunks, whose entries are smaller
(tests/api/test_backlog.py checks the bounds). An entry of a longer token renders larger than its estimate: an event
whose every entry is one of a vocabulary's longest tokens (128 bytes in some) renders to about 3 times its estimate,
at most."""

from contextvars import ContextVar
from typing import Protocol

from server.engine import TokenEvent

# an event's fields besides its text and top logprobs, in the largest shape (a chat chunk: its id, model name of up
# to 256 characters, index, finish reason, usage and the token's own logprob entry)
EVENT_BYTES = 512
TEXT_BYTES = 8  # a character of the event's text: itself (up to 4 bytes) and its `bytes` list in a logprob entry
ENTRY_BYTES = 160  # a top-logprob entry: its token's text, logprob and `bytes` list, for a token of <= 16 bytes


class Backlog(Protocol):
    """Where a request's waiting events are counted: its connection's."""

    def add(self, nbytes: int) -> None:
        """`nbytes` more bytes of the answer wait for the client (fewer where negative)."""


# The backlog of the connection an HTTP request came on (the API layer sets it as the request starts); None: not
# counted (a request made in the process, a test's client)
current_backlog: ContextVar[Backlog | None] = ContextVar("current_backlog", default=None)


def event_bytes(event: TokenEvent) -> int:
    """An estimate of `event`'s bytes once rendered (see above), in O(1) but for the prompt's scores (one event a
    request)."""
    size = EVENT_BYTES + TEXT_BYTES * len(event.text) + ENTRY_BYTES * len(event.top_logprobs)
    if event.prompt_logprobs:  # every prompt token, each with as many alternatives as the first scored one
        alternatives = max((len(token.top) for token in event.prompt_logprobs[1:2]), default=0)
        size += ENTRY_BYTES * len(event.prompt_logprobs) * (1 + alternatives)
    return size
