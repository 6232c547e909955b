"""Tokenizing and chat templating off the event loop, on threads of their own, with a bounded backlog.

Prompts are tokenized before the waiting queue's bound is checked (a prompt's length decides whether it fits),
and /tokenize is nothing but tokenizing, so any client can make this work without limit. In asyncio's default
pool it had no bound, and shared its threads with everything else sent there (uploads being staged, answers
being rendered): 1,000 concurrent /tokenize requests of 16,000 characters held an honest 4-token request for
3.6-19 s. Here the work waiting or running is bounded in characters (a text's tokenizing time grows with its
length; a burst of short prompts costs next to nothing), so that an honest prompt waits a fraction of a second
at most: past the budget, a job is a 429 with Retry-After, as a request past the queue's bound is.
"""

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from loraplex.errors import LoraplexError

T = TypeVar("T")
THREADS = 2  # fast tokenizers encode in Rust; more threads would take turns of the interpreter lock from the engine
# ~0.3 s of work on THREADS threads at ~3.5 M characters a second each (SmolLM2's BPE, 16,000-character texts)
BACKLOG_CHARS = 2_000_000


class TokenizerBusy(LoraplexError):
    http_status = 429
    code = "tokenizer_busy"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant


class TokenizerPool:
    def __init__(self, max_text_chars: int, threads: int = THREADS) -> None:
        """`max_text_chars`: the longest text a request may send; as many of them as threads always fit."""
        self.budget_chars = max(BACKLOG_CHARS, threads * max_text_chars)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        self._lock = threading.Lock()
        self._chars = 0  # of the jobs submitted and not yet done (or cancelled before they ran)

    async def run(self, chars: int, fn: Callable[..., T], *args: object) -> T:
        """fn(*args), a job of `chars` characters, on a tokenizer thread; TokenizerBusy when it would take the
        backlog past its budget."""
        with self._lock:
            if self._chars + chars > self.budget_chars:
                raise TokenizerBusy(
                    f"{self._chars} characters are waiting for the tokenizer, up to {self.budget_chars}; retry shortly"
                )
            self._chars += chars
        job = self._executor.submit(fn, *args)
        # counted until it ends, whether or not its request still waits for it: a client that leaves cancels
        # the job if it has not started, and a started one still holds its thread
        job.add_done_callback(partial(self._done, chars))
        return await asyncio.wrap_future(job)

    def _done(self, chars: int, _: Future) -> None:
        with self._lock:
            self._chars -= chars

    @property
    def backlog_chars(self) -> int:
        return self._chars

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
