"""A stream's backlog: the events the engine has made for a request that its connection has not written yet.

A client that reads its stream slowly holds about one event in its connection's write buffer; the rest of its
answer waits here, as events in its request's queue, made at the engine's speed (with top_logprobs 20, 8 choices of
2,047 tokens are tens of MB). The API layer counts each connection's backlog against the budget of answers waiting
for their clients (--max-unsent-mb, connections.py), as it counts the bytes in its write buffer: it sets
`current_backlog` for each request, and the scheduler adds each event's estimated bytes as it is queued for the
stream and takes them off as the stream reads it.

An event's bytes are estimated, not rendered (rendering is what the stream does once its client reads): a fixed part
for the event's own fields, each character of its text, and a logprob entry for each token it names (its own, its
top logprobs' and, on the first event, every prompt token's with its alternatives), each at the size it has in the
largest protocol's shape, OpenAI's chat chunk (`{"token": ..., "logprob": ..., "bytes": [...]}`), for that token's
own text: an entry is looked up by token id in a table made once from the vocabulary, so a vocabulary of long tokens
(128 bytes in some) is counted at its length. It errs high: on a vocabulary of one-byte tokens it is about 1.4 times
the bytes of chat chunks with 20 top logprobs, 3.8 times those of legacy completions' chunks, whose entries are smaller
(tests/api/test_backlog.py checks the bounds)."""

from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the API's streams import this module, and so does a fleet's ingress, which loads no torch
    from transformers import PreTrainedTokenizerBase

    from server.engine import TokenEvent

# an event's fields besides its text and logprob entries, in the largest shape (a chat chunk: its id, model name of
# up to 256 characters, index, finish reason and usage)
EVENT_BYTES = 512
TEXT_BYTES = 8  # a character of the event's text: itself (up to 4 bytes) and its `bytes` list in a logprob entry
ENTRY_BYTES = 64  # a logprob entry's own fields: `{"token": "", "logprob": -1.2345678901234567e-05, "bytes": []},`
# each byte of an entry's token: in its text (up to 6, as a `\u00XX` escape) and in its `bytes` list (up to 4)
TOKEN_BYTE_BYTES = 10


class Backlog(Protocol):
    """Where a request's waiting events are counted: its connection's."""

    def add(self, nbytes: int) -> None:
        """`nbytes` more bytes of the answer wait for the client (fewer where negative)."""


# The backlog of the connection an HTTP request came on (the API layer sets it as the request starts); None: not
# counted (a request made in the process, a test's client)
current_backlog: ContextVar[Backlog | None] = ContextVar("current_backlog", default=None)


class EventSizes:
    """The estimate of an event's bytes once rendered (see above): O(1) and a table lookup per token it names, ~1 us
    an event with 20 top logprobs on this event loop, ~2 ms for the scores of a 2,047-token prompt with 20
    alternatives each (a small part of what rendering them takes)."""

    def __init__(self, token_bytes: Sequence[int]) -> None:
        """`token_bytes[i]`: the UTF-8 bytes of token i's text as logprobs report it."""
        self._entry = [ENTRY_BYTES + TOKEN_BYTE_BYTES * n for n in token_bytes]

    @classmethod
    def of(cls, tokenizer: "PreTrainedTokenizerBase", vocab_size: int) -> "EventSizes":
        """Sizes for the ids a model of `vocab_size` rows may name, each token decoded alone as logprobs report it
        (~0.3 s for 50,000 tokens); ids past the tokenizer's (a model's padding rows) have no text."""
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        return cls([len(text.encode()) for text in texts] + [0] * max(0, vocab_size - len(texts)))

    def __call__(self, event: "TokenEvent") -> int:
        entry = self._entry
        size = EVENT_BYTES + TEXT_BYTES * len(event.text) + sum(entry[i] for i, _ in event.top_logprobs)
        if event.token_id is not None:
            size += entry[event.token_id]
        if (scores := event.prompt_logprobs) is not None:  # every scored prompt token and its alternatives
            size += sum(entry[i] for i in scores.prompt[1:])
            size += sum(entry[i] for ids in scores.tops() for i in ids.flatten().tolist())
        return size
