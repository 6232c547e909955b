"""What every generation route shares: prompt encoding, adapter resolution with a lease held for the
request's lifetime, submission to the scheduler, metrics, and cancellation when the client goes away."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from loraplex.basemodel import LoadedBase
from loraplex.errors import LoraplexError
from server.engine import GenerationRequest, SamplingParams, TokenEvent
from server.metrics import Metrics
from server.registry import AdapterRegistry
from server.scheduler import Scheduler

T = TypeVar("T")
BASE_LABEL = "-"  # the `adapter` label of base-model requests in metrics
CLIENT_CLOSED = "499"  # nginx's code for "client closed the request": a cancel, not a server failure


class EmptyPrompt(LoraplexError):
    http_status = 422
    code = "empty_prompt"


class InvalidChat(LoraplexError):
    http_status = 422
    code = "invalid_messages"


@dataclass
class Generation:
    """A finished (or cancelled) request, as the non-streaming routes answer it."""

    prompt_tokens: int
    events: list[TokenEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def tokens(self) -> list[TokenEvent]:
        return [e for e in self.events if e.token_id is not None]


class Inference:
    def __init__(self, base: LoadedBase, registry: AdapterRegistry, scheduler: Scheduler, metrics: Metrics,
                 max_seq_len: int) -> None:
        self.base = base
        self.registry = registry
        self.scheduler = scheduler
        self.metrics = metrics
        self.max_seq_len = max_seq_len
        self.eos_ids = scheduler.engine.eos_ids
        self.special_ids = frozenset(base.tokenizer.all_special_ids)

    # ---- prompts -----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids = self.base.tokenizer(text)["input_ids"]
        if not ids:
            raise EmptyPrompt("the prompt encodes to no tokens; send some text")
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            ids = self.base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)
        except Exception as exc:  # templates raise what they like (jinja errors, ValueError) on messages they refuse
            raise InvalidChat(f"the base model's chat template refused these messages: {exc}") from exc
        return list(ids)

    def default_max_new_tokens(self, prompt_ids: list[int], cap: int) -> int:
        """Clients that send no limit get `cap`, or what is left of the request's KV row when that is less."""
        return max(1, min(cap, self.max_seq_len - len(prompt_ids)))

    def adapter_ref(self, model_or_adapter: str | None) -> str | None:
        """None, "" and the base model's served name mean the base model."""
        return None if model_or_adapter in (None, "", self.base.served_name) else model_or_adapter

    # ---- running -------------------------------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], sampling: SamplingParams,
                     adapter: str | None) -> AsyncIterator[TokenEvent]:
        """Events of one request. Errors before the first event (unknown adapter, queue full, prompt too
        long) raise typed errors; leaving early cancels the request in the engine."""
        label = adapter or BASE_LABEL
        try:
            request = GenerationRequest(prompt_ids, sampling)
            self.scheduler.check(request)  # a request refused anyway must not load an adapter or evict one
            lease = await self.registry.acquire(adapter) if adapter is not None else None
            if lease is not None:
                request.adapter_key, request.lora, request.on_finish = lease.key, lease.weights, lease.release
            try:
                token_stream = self.scheduler.submit(request)
            except BaseException:
                if lease is not None:
                    lease.release()  # the engine never took it
                raise
        except LoraplexError as exc:
            self.metrics.requests.labels(label, str(exc.http_status)).inc()
            raise
        self.metrics.prompt_tokens.labels(label).inc(len(prompt_ids))
        status = CLIENT_CLOSED
        generated = self.metrics.generated_tokens.labels(label)
        try:
            async for event in token_stream:
                if event.token_id is not None:
                    generated.inc()
                yield event
            status = "200"
        except LoraplexError as exc:
            status = str(exc.http_status)
            raise
        finally:
            await token_stream.aclose()
            self.metrics.requests.labels(label, status).inc()

    async def open_stream(self, prompt_ids: list[int], sampling: SamplingParams,
                          adapter: str | None) -> AsyncIterator[TokenEvent]:
        """`stream`, started: waits for the first event so that errors before it (unknown adapter, queue
        full, prompt too long) raise here, while a streaming route can still answer with an HTTP error."""
        events = self.stream(prompt_ids, sampling, adapter)
        first = await anext(events)

        async def chained() -> AsyncIterator[TokenEvent]:
            async with aclosing(events):
                yield first
                async for event in events:
                    yield event

        return chained()

    async def generate(self, request: Request, prompt_ids: list[int], sampling: SamplingParams,
                       adapter: str | None) -> Generation:
        """Run to the end; a client that disconnects meanwhile cancels the request at once."""

        async def collect() -> Generation:
            result = Generation(len(prompt_ids))
            async for event in self.stream(prompt_ids, sampling, adapter):
                result.events.append(event)
            return result

        return await until_disconnected(request, collect)


async def until_disconnected(request: Request, work: Callable[[], Awaitable[T]], poll: float = 0.1) -> T:
    """Await `work()`, cancelling it if the HTTP client disconnects first (a non-streaming response has no
    other way to notice)."""
    task = asyncio.ensure_future(work())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()
