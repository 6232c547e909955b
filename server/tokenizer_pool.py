"""Tokenizing and chat templating off the event loop, on threads of their own (which wait on the tokenizer's worker
processes: tokenizer_workers.py), with a bounded backlog.

Prompts are tokenized before the waiting queue's bound is checked (a prompt's length decides whether it fits),
and /tokenize is nothing but tokenizing, so any client can make this work without limit. In asyncio's default
pool it had no bound, and shared its threads with everything else sent there (uploads being staged, answers
being rendered): 1,000 concurrent /tokenize requests of 16,000 characters held an honest 4-token request for
3.6-19 s. Here the work waiting or running is bounded, so that an honest prompt waits a fraction of a second at
most: past the budget, a job is a 429 with Retry-After, as a request past the queue's bound is. Each job also
holds one of its client's share of requests under way (--max-requests-per-client) from before it is accepted
until it ends, so that one client cannot fill the backlog and every thread with its jobs alone, and the threads take
the clients' jobs in turn, so that a job taken in waits for one job of each other client, not for a flood's backlog.
The backlog is shared as the engine's queue is (engine/waiting.py): a job that does not fit takes the place of the
newest waiting jobs of the client that has the most work in it (the next, where its jobs all run), while that client
would still have more than the job's own client, and only where they make room for it, so that one client's flood
cannot keep another client's jobs out, nor have another client's jobs withdrawn for nothing (behind one proxy
address, everyone is one client and the whole backlog is theirs).

Work is counted in bytes of UTF-8 text, what a fast tokenizer's time follows whatever the characters (SmolLM2's
BPE: 0.35-0.75 us a byte for English, random words, CJK and astral text alike), plus what no byte of it shows: each
job's own cost, and each message a chat template renders. Counted in characters, an astral character (4 bytes,
1.5-2.2 us) was charged as an ASCII one (0.4-0.5 us), and a chat of 1,024 empty messages (27 ms of templating)
nothing at all.
"""

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import TypeVar

from loraplex.errors import LoraplexError
from server.client_share import ClientShares, current_client
from server.fair_pool import FairPool

T = TypeVar("T")
THREADS = 2  # each waits on a worker process of its own (tokenizer_workers.py): more would take more of the CPU
# ~0.5 s of work on THREADS threads at ~2 M bytes a second each (SmolLM2's BPE, 16,000-byte texts)
BACKLOG_BYTES = 2_000_000
# What a job costs besides its text, in bytes of text that take as long to tokenize (~0.4 us each):
CALL_BYTES = 128  # any job: tokenizing "hi" takes ~35 us
TEMPLATE_BYTES = 384  # rendering a chat template: a chat of one short message takes ~160 us
MESSAGE_BYTES = 64  # each message the template renders, empty or not: ~26 us
MAX_MESSAGES = 1024  # messages a chat may send (the request schema's bound): each is MESSAGE_BYTES of work
MAX_CHAR_BYTES = 4  # UTF-8's longest character


def text_work(text_bytes: int) -> int:
    """Tokenizing a text of `text_bytes` bytes of UTF-8, in bytes."""
    return CALL_BYTES + text_bytes


def chat_work(messages: int, text_bytes: int) -> int:
    """Rendering a chat template of `messages` messages, their content `text_bytes` bytes in all, and tokenizing
    it, in bytes."""
    return CALL_BYTES + TEMPLATE_BYTES + messages * MESSAGE_BYTES + text_bytes


def ids_work(ids: int) -> int:
    """Decoding `ids` token ids (or naming their tokens), in bytes: an id takes ~0.25 us, less than a byte of text."""
    return CALL_BYTES + ids


class TokenizerBusy(LoraplexError):
    http_status = 429
    code = "tokenizer_busy"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant


PLACE_GIVEN = (
    "the tokenizer's backlog was full and this client (its API key, or its address on a server without keys) had more "
    "work waiting in it than any other: this job, its newest, gave its place to another client's. Retry when fewer of "
    "this client's requests wait, or send fewer at once"
)


class TokenizerPool:
    def __init__(self, max_text_chars: int, shares: ClientShares, threads: int = THREADS) -> None:
        """`max_text_chars`: the longest text a request may send (in a chat: all its messages' content); as many of
        the costliest jobs as threads always fit. `shares`: each client's share, held by every job."""
        costliest = chat_work(MAX_MESSAGES, MAX_CHAR_BYTES * max_text_chars)
        self.budget_bytes = max(BACKLOG_BYTES, threads * costliest)
        self._shares = shares
        # the clients in turn (fair_pool.py): a job taken into a backlog one client's flood fills runs after a job of
        # each client waiting, not after the whole flood (~0.5 s)
        self._executor = FairPool(threads, "tokenize")
        # reentrant: a job that gives its place is settled under it, and its done callback takes it again
        self._lock = threading.RLock()
        self._bytes = 0  # of the jobs submitted and not yet done (or cancelled before they ran)
        self._per_client: dict[str | None, int] = {}  # the same, per client; a client with none has no entry
        self._works: dict[Future, int] = {}  # each job's work, until it is done

    async def run(self, work: int, fn: Callable[..., T], *args: object) -> T:
        """fn(*args), a job of `work` bytes (text_work, chat_work, ids_work), on a tokenizer thread; TokenizerBusy
        when it would take the backlog past its budget, ClientShareFull when its client's share is used up."""
        client = current_client.get()
        with self._lock:
            self._make_room(client, work)
            release = self._shares.hold()
            self._bytes += work
            self._per_client[client] = self._per_client.get(client, 0) + work
            job = self._executor.submit(client, partial(fn, *args))
            self._works[job] = work
        # counted until it ends, whether or not its request still waits for it: a client that leaves cancels
        # the job if it has not started, and a started one still holds its thread
        job.add_done_callback(partial(self._done, client, work, release))
        return await asyncio.wrap_future(job)

    def _make_room(self, client: str | None, work: int) -> None:
        """Room for `client`'s job of `work` bytes: free, or made of the newest waiting jobs of one client with more
        work in the backlog than `client` would have, the one with the most first, each taken while that client still
        has more (they end with TokenizerBusy); TokenizerBusy if none can make it, and then no job gives its place (it
        would for a job refused anyway). The caller holds the lock."""
        needed = self._bytes + work - self.budget_bytes
        if needed <= 0:
            return
        mine = self._per_client.get(client, 0) + work
        # the client holding the most may have nothing waiting (its jobs run): the next may make room
        for holder, held in sorted(self._per_client.items(), key=lambda item: item[1], reverse=True):
            if held <= mine:
                break
            withdrawn = self._executor.withdraw(holder, partial(self._places, held, mine, needed))
            for future in withdrawn:
                with contextlib.suppress(InvalidStateError):  # cancelled (its client left): uncounted already
                    future.set_exception(TokenizerBusy(PLACE_GIVEN))  # its done callback uncounts it
            if withdrawn:
                return
        raise TokenizerBusy(
            f"{self._bytes} bytes of work are waiting for the tokenizer, up to {self.budget_bytes}; retry shortly"
        )

    def _places(self, held: int, mine: int, needed: int, waiting: list[Future]) -> int:
        """How many of a client's waiting jobs (newest first) give their places: the fewest that free `needed` bytes,
        each while the client holds more than `mine`; 0 if they cannot. Its held bytes: `held`."""
        freed = 0
        for taken, future in enumerate(waiting):
            if freed >= needed:
                return taken
            if held - freed <= mine:
                return 0
            freed += self._works.get(future, 0)  # 0: cancelled, uncounted already
        return len(waiting) if freed >= needed else 0

    def _done(self, client: str | None, work: int, release: Callable[[], None], job: Future) -> None:
        release()
        with self._lock:
            del self._works[job]
            self._bytes -= work
            left = self._per_client[client] - work
            if left:
                self._per_client[client] = left
            else:
                del self._per_client[client]

    @property
    def backlog_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        self._executor.shutdown()
