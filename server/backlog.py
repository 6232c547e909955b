"""A stream's backlog: the events the engine has made for a request that its connection has not written yet.

A client that reads its stream slowly holds about one event in its connection's write buffer; the rest of its
answer waits here, as events in its request's queue, made at the engine's speed (with top_logprobs 20, 8 choices of
2,047 tokens are tens of MB). The API layer counts each connection's backlog against the budget of answers waiting
for their clients (--max-unsent-mb, connections.py), as it counts the bytes in its write buffer: it sets
`current_backlog` for each request, and the scheduler adds each event's estimated bytes as it is queued for the
stream and takes them off as the stream reads it.

An event's bytes are estimated, not rendered (rendering is what the stream does once its client reads): a fixed part
for the event's own fields, each character of its text, and a logprob entry for each token it names (its own and its
top logprobs'), each at the size it has in the largest protocol's shape, OpenAI's chat chunk (`{"token": ...,
"logprob": ..., "bytes": [...]}`), for that token's own text: an entry is looked up by token id in a table made once
from the vocabulary, so a vocabulary of long tokens (128 bytes in some) is counted at its length. It errs high: on a
vocabulary of one-byte tokens it is about 1.4 times the bytes of chat chunks with 20 top logprobs, 3.8 times those of
legacy completions' chunks, whose entries are smaller (tests/api/test_backlog.py checks the bounds).

A first event's prompt scores (every prompt token with its alternatives: megabytes for a long prompt) are counted in
the shapes its answer renders them in (`score_shapes`, which the API layer sets), each entry at its shape's size
around its token's text as JSON writes it. Counted as chat chunks' entries, `bytes` lists and all, an echoed prompt's
legacy logprobs were ~6 times their bytes, and a prompt of tokens of long words ~5 times."""

import enum
import json
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the API's streams import this module, and so does a fleet's ingress, which loads no torch
    from transformers import PreTrainedTokenizerBase

    from server.engine import PromptScores, TokenEvent

# an event's fields besides its text and logprob entries, in the largest shape (a chat chunk: its id, model name of
# up to 256 characters, index, finish reason and usage)
EVENT_BYTES = 512
TEXT_BYTES = 8  # a character of the event's text: itself (up to 4 bytes) and its `bytes` list in a logprob entry
ENTRY_BYTES = 64  # a logprob entry's own fields: `{"token": "", "logprob": -1.2345678901234567e-05, "bytes": []},`
# each byte of an entry's token: in its text (up to 6, as a `\u00XX` escape) and in its `bytes` list (up to 4)
TOKEN_BYTE_BYTES = 10
# A prompt score's entries, besides their token's text: vLLM's prompt_logprobs entry `"<id>":{"logprob":<float>,
# "rank":<rank>,"decoded_token":"<text>"},` (ids and ranks of up to 6 digits, floats of up to 24 characters) in a
# position's `{},` (the first's `null,`)...
PROMPT_ENTRY_BYTES = 43 + 6 + 24 + 6
PROMPT_POSITION_BYTES = 5
# ... and an echoed prompt's legacy logprobs: a top entry `"<text>":<float>,`, and each position's token `"<text>",`,
# its logprob, its text offset (up to 7 digits) and its top entries' `{},`
ECHO_ENTRY_BYTES = 4 + 24
ECHO_POSITION_BYTES = 3 + 25 + 8 + 3


class ScoreShapes(enum.Flag):
    """The shapes an answer renders its prompt's scores in."""

    PROMPT_LOGPROBS = enum.auto()  # vLLM's prompt_logprobs (TGI's details.prefill is smaller)
    ECHOED = enum.auto()  # the legacy logprobs of a completion's echoed prompt, beside its text


class Backlog(Protocol):
    """Where a request's waiting events are counted: its connection's."""

    def add(self, nbytes: int) -> None:
        """`nbytes` more bytes of the answer wait for the client (fewer where negative)."""


# The backlog of the connection an HTTP request came on (the API layer sets it as the request starts); None: not
# counted (a request made in the process, a test's client)
current_backlog: ContextVar[Backlog | None] = ContextVar("current_backlog", default=None)
# The shapes the answer of an HTTP request renders its prompt's scores in (the API layer sets it where they are not
# the default's)
score_shapes: ContextVar[ScoreShapes] = ContextVar("score_shapes", default=ScoreShapes.PROMPT_LOGPROBS)


class EventSizes:
    """The estimate of an event's bytes once rendered (see above): O(1) and a table lookup per token it names, ~1 us
    an event with 20 top logprobs on this event loop; a few torch calls per step's chunk of a prompt's scores, ~0.3 ms
    for a 2,047-token prompt with 20 alternatives each (a small part of what rendering them takes)."""

    def __init__(self, texts: Sequence[str]) -> None:
        """`texts[i]`: token i's text as logprobs report it."""
        import torch  # here, not above: a fleet's ingress imports this module, and loads no torch

        self._entry = [ENTRY_BYTES + TOKEN_BYTE_BYTES * len(text.encode()) for text in texts]
        # [V] int64: each token's text as a JSON string holds it, in bytes (a control character's escape is 6)
        self._json = torch.tensor([len(json.dumps(text, ensure_ascii=False).encode()) - 2 for text in texts])

    @classmethod
    def of(cls, tokenizer: "PreTrainedTokenizerBase", vocab_size: int) -> "EventSizes":
        """Sizes for the ids a model of `vocab_size` rows may name, each token decoded alone as logprobs report it
        (~0.3 s for 50,000 tokens); ids past the tokenizer's (a model's padding rows) have no text."""
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        return cls(texts + [""] * max(0, vocab_size - len(texts)))

    def __call__(self, event: "TokenEvent", shapes: ScoreShapes = ScoreShapes.PROMPT_LOGPROBS) -> int:
        """`shapes`: those its prompt's scores are rendered in, if it carries them."""
        entry = self._entry
        size = EVENT_BYTES + TEXT_BYTES * len(event.text) + sum(entry[i] for i, _ in event.top_logprobs)
        if event.token_id is not None:
            size += entry[event.token_id]
        if event.prompt_logprobs is not None:
            size += self._scores(event.prompt_logprobs, shapes)
        return size

    def _scores(self, scores: "PromptScores", shapes: ScoreShapes) -> int:
        # index_select, not indexing: under a loaded CPU, indexing waited milliseconds a call for torch's threads
        texts = self._json.index_select
        prompt = texts(0, self._json.new_tensor(scores.prompt))  # [T] each prompt token's text
        entries, named = len(prompt) - 1, int(prompt[1:].sum())  # each scored token's own entry
        for ids in scores.tops():  # [count, keep] each: its positions' alternatives
            entries += ids.numel()
            named += int(texts(0, ids.flatten()).sum())
        size = 0
        if ScoreShapes.PROMPT_LOGPROBS in shapes:
            size += len(prompt) * PROMPT_POSITION_BYTES + entries * PROMPT_ENTRY_BYTES + named
        if ScoreShapes.ECHOED in shapes:  # every prompt token's text twice more: the tokens' list, the echoed text
            size += len(prompt) * ECHO_POSITION_BYTES + 2 * int(prompt.sum()) + entries * ECHO_ENTRY_BYTES + named
        return size
