"""Tokenizing and chat templates in processes of their own, which the tokenizer pool's threads wait on.

A transformers tokenizer wraps its Rust core in Python, and a chat template is Jinja, which runs in Python: on the
server's threads either held the interpreter lock that the engine thread takes between any two of its launches,
so one client's jobs slowed every stream being decoded. A bounded flood (the pool's two threads busy, every job
within its budget) made a CPU decode step of 4 rows (39-50 ms alone) take 300 ms with chats of 1,024 empty
messages, 4.8 s with the prompt "hi", 22 s with /detokenize of 1,000 ids; in processes 62, 104 and 76 ms
(BENCHMARKS.md). There the work takes no turn of this process's lock, only CPU.

Each worker holds a copy of the tokenizer (pickled once). The pool's threads wait on them, one process per thread,
so that pool's budget and each client's share still bound the work. A worker that dies (killed for memory, say)
fails only the jobs it had; the next job starts the workers anew.
"""

import functools
import json
import multiprocessing
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from loraplex.chat_text import AuthorText, special_tokens, tokenize_pieces
from loraplex.errors import LoraplexError

T = TypeVar("T")
Messages = list[dict[str, Any]]  # ChatMessage.template()'s
SERVER_POLL_S = 1.0  # how often a worker looks whether the server is still there


class InvalidChat(LoraplexError):
    http_status = 422
    code = "invalid_messages"


class TokenizerWorkerLost(LoraplexError):
    """The process doing this request's tokenizer work ended before it answered; the workers were started anew."""

    http_status = 503
    code = "tokenizer_worker_lost"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant


_tokenizer: PreTrainedTokenizerBase | None = None  # a worker's copy


def _load(tokenizer: bytes, server: int) -> None:
    global _tokenizer
    # Ctrl-C in a terminal reaches every process of the server's group: the server ends its workers itself (close(),
    # or _exit_with below), so here it only printed a KeyboardInterrupt traceback per worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    """A job that only makes its worker start (and load the tokenizer) before the first request needs it."""


def _encode(text: str) -> list[int]:
    return _loaded()(text)["input_ids"]


def _chat(
    messages: Messages, add_generation_prompt: bool, tools: list[dict] | None = None
) -> tuple[bool, list[int] | str]:
    """(True, the chat's token ids) or (False, why the template refused it): the template's own exceptions (jinja's,
    ValueError) come back as text, since not every exception class survives pickling. `tools`: OpenAI's tool
    objects, for templates that render them (None: the template is called without).

    Whatever the client writes into the template is text, a special token's spelling too (loraplex.chat_text)."""
    tokenizer = _loaded()
    apart = AuthorText(_special_tokens())
    try:
        chat = [apart.message(_with_argument_objects(m)) for m in messages]
        extra = {"tools": apart.value(tools)} if tools else {}
        rendered = tokenizer.apply_chat_template(
            chat, add_generation_prompt=add_generation_prompt, tokenize=not apart.texts, return_dict=False, **extra
        )
    except Exception as exc:  # templates raise what they like on messages they refuse
        return False, str(exc)
    if not apart.texts:
        return True, list(rendered)
    return True, tokenize_pieces(tokenizer, apart.pieces(rendered))[0]


@functools.cache
def _special_tokens() -> re.Pattern[str]:
    return special_tokens(_loaded())


def _with_argument_objects(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool calls with their arguments as objects, as transformers' chat templates take them
    (OpenAI sends them as JSON text; vLLM reads them so too); arguments that are not a JSON object stay text. Read
    here, in the worker, not on the server's event loop."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    read = []
    for call in calls:
        arguments = call["function"]["arguments"]
        try:
            value = json.loads(arguments)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            call = {**call, "function": {**call["function"], "arguments": value}}
        read.append(call)
    return {**message, "tool_calls": read}


def _offsets(text: str, add_special_tokens: bool) -> list[tuple[int, int, int]]:
    encoded = _loaded()(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return [(i, start, stop) for i, (start, stop) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)]


def _token_strings(ids: list[int]) -> list[str]:
    return _loaded().convert_ids_to_tokens(ids)


def _decode(ids: list[int]) -> str:
    return _loaded().decode(ids)


def _loaded() -> PreTrainedTokenizerBase:
    assert _tokenizer is not None  # _load ran first
    return _tokenizer


class TokenizerWorkers:
    """The tokenizer's work in worker processes; each method blocks its caller (a tokenizer pool thread) until a
    worker has answered."""

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
        for _ in range(self._processes):  # the workers start now, not in the first requests' time
            pool.submit(_started)
        return pool

    def _run(self, job: Callable[..., T], *args: object) -> T:
        pool = self._pool
        try:
            return pool.submit(job, *args).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # the first job to find it broken starts the workers anew
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._start()
            raise TokenizerWorkerLost("the process tokenizing this request ended; retry it") from None

    def encode(self, text: str) -> list[int]:
        """`tokenizer(text)["input_ids"]`."""
        return self._run(_encode, text)

    def chat(
        self, messages: Messages, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        """The chat's token ids as `tokenizer.apply_chat_template` gives them, but for a content that spells a special
        token, which is text (_chat); InvalidChat where the template refuses the messages."""
        done, result = self._run(_chat, messages, add_generation_prompt, tools)
        if not done:
            raise InvalidChat(f"the base model's chat template refused these messages: {result}")
        assert isinstance(result, list)
        return result

    def offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """(token id, start, stop) per token of `text`: offsets into `text`."""
        return self._run(_offsets, text, add_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        """`tokenizer.convert_ids_to_tokens(ids)`."""
        return self._run(_token_strings, ids)

    def decode(self, ids: list[int]) -> str:
        """`tokenizer.decode(ids)`."""
        return self._run(_decode, ids)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)  # a job under way ends first: milliseconds
