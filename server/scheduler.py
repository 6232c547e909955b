"""The asyncio facade over the engine thread: bounded queue (and each adapter's share of it), token streams,
cancellation, latency hooks.

Nothing here runs or waits on the device: the engine thread hands events over through a mailbox that wakes the
event loop once per burst (a step's events), and leaving a stream early cancels its request in the engine. The
events waiting in a stream's queue count on its connection's backlog (backlog.py), on the event loop.
"""

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

from server.backlog import Backlog, EventSizes, current_backlog, score_shapes
from server.client_share import ClientShares
from server.engine import Engine, GenerationRequest, TokenEvent
from server.engine.errors import EngineError

LatencyHook = Callable[[float], None]  # seconds
EventSize = Callable[[TokenEvent], int]  # an event's estimated bytes once rendered (backlog.py)


@dataclass(frozen=True)
class LatencyHooks:
    """Where the API layer plugs its Prometheus histograms."""

    time_to_first_token: LatencyHook | None = None
    inter_token: LatencyHook | None = None


class GenerationFailed(EngineError):
    """The engine ended a request with an error (e.g. the device ran out of memory); `__cause__` is why."""


class Mailbox:
    """Events from the engine thread to streams on one event loop. Each `call_soon_threadsafe` is a lock and a
    write to the loop's self-pipe, paid by the engine thread between steps: one per burst of events (a step
    delivers one per running request) instead of one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._events: deque[tuple[asyncio.Queue[TokenEvent], TokenEvent]] = deque()
        self._scheduled = False

    def post(self, queue: "asyncio.Queue[TokenEvent]", event: TokenEvent) -> None:
        """From any thread: `event` goes into `queue` on the loop, after everything posted before it."""
        with self._lock:
            self._events.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:  # cleared first: an event posted after the swap schedules the next delivery
            self._scheduled = False
            events, self._events = self._events, deque()
        for queue, event in events:
            queue.put_nowait(event)


class BacklogQueue(asyncio.Queue[TokenEvent]):
    """A stream's events waiting for it to read them, their estimated bytes counted on `backlog` (a running total:
    O(1) an event, on the event loop, where the mailbox delivers). Once closed it takes no more, and what it held no
    longer counts."""

    def __init__(self, backlog: Backlog, sizes: EventSize) -> None:
        super().__init__()
        self._backlog = backlog
        self._estimate = sizes
        self._sizes: deque[int] = deque()  # each waiting event's estimate, in the queue's order
        self._closed = False

    def _put(self, event: TokenEvent) -> None:  # asyncio.Queue's hook, as LifoQueue's
        if self._closed:  # the stream has left: nobody reads it (its get loops while the queue is empty)
            return
        size = self._estimate(event)
        self._sizes.append(size)
        self._backlog.add(size)
        super()._put(event)

    def _get(self) -> TokenEvent:
        self._backlog.add(-self._sizes.popleft())
        return super()._get()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._backlog.add(-sum(self._sizes))
            self._sizes.clear()
            self._queue.clear()  # type: ignore[attr-defined]


class TokenStream:
    """Async iterator of one request's TokenEvents; the last has finish_reason set.

    Leaving it early (`aclose()`, or the consuming task being cancelled) cancels the request in the engine.
    An engine-side error is raised as GenerationFailed from the iterator; one that is the request's own fault
    (a 4xx EngineError) is raised as itself.
    """

    def __init__(
        self,
        engine: Engine,
        request: GenerationRequest,
        hooks: LatencyHooks,
        mailbox: Mailbox,
        sizes: EventSize,
        backlog: Backlog | None = None,
    ) -> None:
        """A stream for `request`, which the caller submits to `engine` with `sink` as its events' sink; the events
        waiting for it count on `backlog` (None: not counted) at their `sizes`."""
        self.request_id = request.request_id
        self._engine = engine
        self._hooks = hooks
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue() if backlog is None else BacklogQueue(backlog, sizes)
        self._done = False
        self._submitted = time.perf_counter()
        self._last: float | None = None
        self.sink = partial(mailbox.post, self._queue)

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
            if isinstance(event.error, EngineError) and event.error.http_status < 500:  # the request's own fault:
                raise event.error  # the client hears it as such (a grammar that dead-ends), not as a server error
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
        if isinstance(self._queue, BacklogQueue):
            self._queue.close()


class Scheduler:
    """What the HTTP layer holds: `submit` (raises at once) or `generate` (an async generator).

    At most `max_queue` requests wait, and at most `max_queue_per_adapter` of them for one adapter (the base model
    counts as one), each shared between clients (engine/waiting.py): past that share an adapter's requests get 429
    while other adapters' are still queued. At most `max_requests_per_client` wait or run for one
    client (client_share.current_client), whatever adapters they name, counted with its jobs on the tokenizer's
    threads (`client_shares`, which the tokenizer holds too). None: no share.

    Made off the event loop: it decodes the vocabulary once, for the estimate of its streams' backlogs."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int,
        hooks: LatencyHooks | None = None,
        max_queue_per_adapter: int | None = None,
        max_requests_per_client: int | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.max_queue_per_adapter = max_queue_per_adapter
        self.client_shares = ClientShares(max_requests_per_client)
        self.hooks = hooks or LatencyHooks()
        self._mailbox: Mailbox | None = None
        self.event_sizes = EventSizes.of(engine.tokenizer, engine.model.get_output_embeddings().out_features)

    @property
    def queue_depth(self) -> int:
        return self.engine.num_waiting

    @property
    def running(self) -> int:
        return self.engine.num_running

    def _hold_client_share(self, request: GenerationRequest) -> Callable[[], None]:
        """Count `request` against its client's share (ClientShareFull past it) until it leaves the engine (its
        on_finish, wrapped); returns the release for a request the engine never took."""
        release = self.client_shares.hold()  # the engine thread releases it as the request leaves
        finish = request.on_finish

        def on_finish() -> None:
            release()
            if finish is not None:
                finish()

        request.on_finish = on_finish
        return release

    def check(self, request: GenerationRequest) -> None:
        """Raise QueueFull, ClientShareFull or PromptTooLong now: callers check before they load the request's
        adapter. The adapter's share of the queue is checked by `submit`, once the adapter's name has resolved to
        its key; refusing there loads nothing, as an adapter at its share is held by its waiting requests already."""
        self.engine.check_room(request.client, request.adapter_key, self.max_queue)
        self.client_shares.check()
        self.engine.validate(request)

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Start a request. Raises QueueFull, AdapterQueueFull, PromptTooLong, AdapterTooLarge, EngineStopped or
        ValueError before anything runs (then `request.on_finish` is not called: the caller still owns its
        hold)."""
        release = self._hold_client_share(request)
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        try:
            backlog = current_backlog.get()
            sizes = partial(self.event_sizes, shapes=score_shapes.get())  # its prompt's scores, as its answer has them
            stream = TokenStream(self.engine, request, self.hooks, self._mailbox, sizes, backlog)
            # last, as it may take another request's place (engine/waiting.py): the engine takes one only with the
            # request queued
            self.engine.submit(request, stream.sink, self.max_queue, self.max_queue_per_adapter)
            return stream
        except BaseException:
            release()  # the engine never took it: its on_finish will not run
            raise

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        stream = self.submit(request)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()
