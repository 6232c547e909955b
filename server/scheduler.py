"""The asyncio facade over the engine thread: bounded queue, token streams, cancellation, latency hooks.

Nothing here touches torch or waits on the device: the engine thread hands events over with
`loop.call_soon_threadsafe`, and leaving a stream early cancels its request in the engine.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from server.engine import Engine, GenerationRequest, QueueFull, TokenEvent
from server.engine.errors import EngineError

LatencyHook = Callable[[float], None]  # seconds


@dataclass(frozen=True)
class LatencyHooks:
    """Where the API layer plugs its Prometheus histograms."""

    time_to_first_token: LatencyHook | None = None
    inter_token: LatencyHook | None = None


class GenerationFailed(EngineError):
    """The engine ended a request with an error (e.g. the device ran out of memory); `__cause__` is why."""


class TokenStream:
    """Async iterator of one request's TokenEvents; the last has finish_reason set.

    Leaving it early (`aclose()`, or the consuming task being cancelled) cancels the request in the engine.
    An engine-side error is raised as GenerationFailed from the iterator.
    """

    def __init__(self, engine: Engine, request: GenerationRequest, hooks: LatencyHooks) -> None:
        self.request_id = request.request_id
        self._engine = engine
        self._hooks = hooks
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._done = False
        self._submitted = time.perf_counter()
        self._last: float | None = None
        loop = asyncio.get_running_loop()
        engine.submit(request, lambda event: loop.call_soon_threadsafe(self._queue.put_nowait, event))

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        self._observe(event)
        if event.finish_reason is not None:
            self._done = True
        if event.error is not None:
            raise GenerationFailed(f"generation failed: {event.error}") from event.error
        return event

    def _observe(self, event: TokenEvent) -> None:
        if event.token_id is None:
            return
        now = time.perf_counter()
        hook = self._hooks.time_to_first_token if self._last is None else self._hooks.inter_token
        if hook is not None:
            hook(now - (self._submitted if self._last is None else self._last))
        self._last = now

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.cancel(self.request_id)


class Scheduler:
    """What the HTTP layer holds: `submit` (raises at once) or `generate` (an async generator)."""

    def __init__(self, engine: Engine, max_queue: int, hooks: LatencyHooks | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.hooks = hooks or LatencyHooks()

    @property
    def queue_depth(self) -> int:
        return self.engine.num_waiting

    @property
    def running(self) -> int:
        return self.engine.num_running

    def _ensure_room(self) -> None:
        if self.engine.num_waiting >= self.max_queue:
            raise QueueFull(self.max_queue)

    def check(self, request: GenerationRequest) -> None:
        """Raise QueueFull or PromptTooLong now: callers check before they load the request's adapter."""
        self._ensure_room()
        self.engine.validate(request)

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Start a request. Raises QueueFull, PromptTooLong, AdapterTooLarge, EngineStopped or ValueError
        before anything runs (then `request.on_finish` is not called: the caller still owns its hold)."""
        self._ensure_room()
        return TokenStream(self.engine, request, self.hooks)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        stream = self.submit(request)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()
