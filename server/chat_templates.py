"""Chat templates rendered and tokenized in processes of their own.

A chat template is Jinja, which runs in Python: on the tokenizer's threads it held the interpreter lock that the
engine thread takes between any two of its launches, so chats being templated slowed every stream being decoded.
One client's flood of chats of 1,024 empty messages, bounded as it is (the tokenizer's two threads), made a CPU
decode step of 4 rows 5.7x as long (51 -> 293 ms; in processes 61 ms, BENCHMARKS.md): there the rendering takes
no turn of this process's lock, only CPU.

Each worker holds a copy of the tokenizer (pickled once) and turns a chat into token ids. The tokenizer pool's
threads wait on them, one process per thread, so that pool's budget and each client's share still bound the work.
A worker that dies (killed for memory, say) fails only the chats it had; the next chat starts the workers anew.
"""

import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from transformers import PreTrainedTokenizerBase

from loraplex.errors import LoraplexError

Messages = list[dict[str, str]]
SERVER_POLL_S = 1.0  # how often a worker looks whether the server is still there


class InvalidChat(LoraplexError):
    http_status = 422
    code = "invalid_messages"


class TemplateWorkerLost(LoraplexError):
    """The process rendering this chat ended before it answered; the workers were started anew."""

    http_status = 503
    code = "template_worker_lost"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant


_tokenizer: PreTrainedTokenizerBase | None = None  # a worker's copy


def _load(tokenizer: bytes, server: int) -> None:
    global _tokenizer
    _tokenizer = pickle.loads(tokenizer)
    threading.Thread(target=_exit_with, args=(server,), daemon=True).start()


def _exit_with(server: int) -> None:
    """End this worker once the server process `server` has ended: one killed (for memory, say) never shuts its
    pool down, and a worker waits on its queue forever."""
    while True:
        time.sleep(SERVER_POLL_S)
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            os._exit(0)


def _started() -> None:
    """A job that only makes its worker start (and load the tokenizer) before the first chat needs it."""


def _ids(messages: Messages, add_generation_prompt: bool) -> tuple[bool, list[int] | str]:
    """(True, the chat's token ids) or (False, why the template refused it): the template's own exceptions (jinja's,
    ValueError) come back as text, since not every exception class survives pickling."""
    assert _tokenizer is not None  # _load ran first
    try:
        ids = _tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    except Exception as exc:  # templates raise what they like on messages they refuse
        return False, str(exc)
    return True, list(ids)


class TemplateWorkers:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, processes: int) -> None:
        self._tokenizer = pickle.dumps(tokenizer)
        self._processes = processes
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # Forked from a server process started once (with this module and transformers loaded), not from this
        # process, which runs threads: a fork copies their locks in whatever state they are.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        pool = ProcessPoolExecutor(self._processes, context, initializer=_load, initargs=(self._tokenizer, os.getpid()))
        for _ in range(self._processes):  # the workers start now, not in the first chats' time
            pool.submit(_started)
        return pool

    def ids(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """The chat's token ids as `tokenizer.apply_chat_template` gives them, from a worker (blocks until then);
        InvalidChat where the template refuses the messages."""
        pool = self._pool
        try:
            done, result = pool.submit(_ids, messages, add_generation_prompt).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # the first chat to find it broken starts the workers anew
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._start()
            raise TemplateWorkerLost("the process templating this chat ended; retry it") from None
        if not done:
            raise InvalidChat(f"the base model's chat template refused these messages: {result}")
        assert isinstance(result, list)
        return result

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)  # a chat being templated ends first: tens of milliseconds
