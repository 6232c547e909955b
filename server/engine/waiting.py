"""The engine's waiting queue, shared fairly between clients and, within a client's share, between adapters.

Admission order: round-robin over the clients with requests waiting (client: an API key's digest, or a peer
address on a server without keys), the one admitted least recently first, and in each client's turns
round-robin over its adapters (the base model is one more), likewise. So one client's flood delays another
client's request by a row at most, not by the flood, and one adapter's flood delays the same client's request
for another adapter by a row at most. Behind one proxy address every request is one client's: the adapters'
turns alone, as before clients were told apart.

A full queue is shared too: a request of a client that would hold fewer waiting requests than the client that
holds the most takes the place of that client's newest, which ends with 429 queue_full. A flood then holds the
whole queue only while no other client asks for any of it, and can push no other client below an equal share.
Without it, one client sending max_queue requests got every other client's refused until its flood drained. An
adapter's share of the queue (max_queue_per_adapter; the base model is one more) is shared between clients the same
way, by their requests for that adapter: without it, one client's flood of the base model kept every other client's
base-model request out (429 adapter_queue_full) however the queue itself was shared.

Not thread-safe: the engine calls it under its lock.
"""

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from itertools import chain
from typing import TypeVar

from server.engine.errors import AdapterPlaceGiven, AdapterQueueFull, EngineError, QueueFull, QueuePlaceGiven
from server.engine.requests import GenerationRequest, TokenEvent

T = TypeVar("T")
EventSink = Callable[[TokenEvent], None]
Waiting = tuple[GenerationRequest, EventSink]

# Admission turns remembered (client or adapter -> its last admission): one forgotten counts as never admitted,
# so it goes first in its next pass, as it would after that many others were admitted since. Bounds the memory
# that a client cycling through adapter names (or a crowd of addresses) could otherwise grow.
TURNS_KEPT = 4096


class Turns:
    """When each key (a client, an adapter) was last admitted; engine thread only."""

    def __init__(self) -> None:
        self._turns: dict[Hashable, int] = {}  # oldest turn first, so the first to forget comes first
        self._next = 0

    def order(self, groups: dict[Hashable, T]) -> list[T]:
        """`groups`' values, the key admitted least recently first (sorted is stable: ties keep `groups`' order)."""
        return [group for _, group in sorted(groups.items(), key=lambda item: self._turns.get(item[0], -1))]

    def served(self, keys: Iterable[Hashable]) -> None:
        """`keys` were admitted, in this order."""
        for key in keys:
            self._turns.pop(key, None)  # re-inserted: the dict stays in turn order
            self._turns[key] = self._next
            self._next += 1
        while len(self._turns) > TURNS_KEPT:
            del self._turns[next(iter(self._turns))]


class WaitingQueue:
    def __init__(self) -> None:
        self._items: deque[Waiting] = deque()
        # waiting requests per adapter key (None: the base model), per client, and per client of each adapter: read
        # for every request, where counting the queue would cost O(waiting)
        self.per_adapter: dict[str | None, int] = {}
        self._per_client: dict[str | None, int] = {}
        self._per_adapter_client: dict[str | None, dict[str | None, int]] = {}
        # requests that gave their place (make_room), still in _items: id -> the error each ends with
        self._leaving: dict[str, EngineError] = {}
        self.clients = Turns()
        self.adapters = Turns()

    @property
    def has_items(self) -> bool:
        """Anything for the engine thread to admit or end (requests that gave their place included)."""
        return bool(self._items)

    def __len__(self) -> int:
        """Requests waiting, those that gave their place not counted."""
        return len(self._items) - len(self._leaving)

    def add(self, waiting: Waiting) -> None:
        self._items.append(waiting)
        self._count(waiting[0], 1)

    def remove(self, request_ids: set[str]) -> list[Waiting]:
        """Take the requests of `request_ids` out of the queue; returns those it held."""
        kept: deque[Waiting] = deque()
        removed: list[Waiting] = []
        for waiting in self._items:
            request_id = waiting[0].request_id
            if request_id not in request_ids:
                kept.append(waiting)
                continue
            removed.append(waiting)
            if self._leaving.pop(request_id, None) is None:  # else uncounted when it gave its place
                self._count(waiting[0], -1)
        self._items = kept
        return removed

    def take_leaving(self) -> list[tuple[GenerationRequest, EventSink, EngineError]]:
        """Take out the requests that gave their place, each with the error to end it with."""
        if not self._leaving:
            return []
        errors = dict(self._leaving)
        return [(request, sink, errors[request.request_id]) for request, sink in self.remove(set(errors))]

    def clear(self) -> list[Waiting]:
        items, self._items = self._items, deque()
        self.per_adapter.clear()
        self._per_client.clear()
        self._per_adapter_client.clear()
        self._leaving.clear()
        return list(items)

    def make_room(
        self, client: str | None, adapter_key: str | None, bound: int, share: int | None, *, take: bool
    ) -> None:
        """Room for a request of `client` for `adapter_key` in a queue of at most `bound`, and at most `share` for
        one adapter (None: no share): free, or where another client holds more of it (the queue's, or the
        adapter's requests) than `client` would with it. With `take`, that client's newest request (for the adapter,
        where its share is full) is marked to give its place (`take_leaving`). Raises AdapterQueueFull or QueueFull
        where neither. O(clients + waiting) when full, O(1) otherwise."""
        # (the client giving a place, the adapter of the request it gives: _ANY for any, what that request hears)
        given: list[tuple[str | None, object, EngineError]] = []
        if share is not None and self.per_adapter.get(adapter_key, 0) >= share:
            holder = _heavier(self._per_adapter_client.get(adapter_key, {}), client)
            if not holder:
                raise AdapterQueueFull(adapter_key, share, bound)
            given.append((holder[0], adapter_key, AdapterPlaceGiven(adapter_key, share)))
        if len(self) - len(given) >= bound:
            holder = _heavier(self._per_client, client)
            if not holder:
                raise QueueFull(bound)
            given.append((holder[0], _ANY, QueuePlaceGiven()))
        if take:
            for holder_client, adapter, error in given:
                self._give_place(holder_client, adapter, error)

    def _give_place(self, client: str | None, adapter_key: object, error: EngineError) -> None:
        """Mark `client`'s newest request (for `adapter_key`, unless _ANY) that has not given its place yet."""
        for request, _ in reversed(self._items):
            if request.client != client or request.request_id in self._leaving:
                continue
            if adapter_key is _ANY or request.adapter_key == adapter_key:
                self._leaving[request.request_id] = error
                self._count(request, -1)
                return

    @property
    def clients_waiting(self) -> set[str | None]:
        """The clients with a request waiting."""
        return set(self._per_client)

    def in_turn(self, ahead: Mapping[str | None, Iterable[T]] | None = None) -> Iterator[Waiting | T]:
        """The requests waiting, in admission order (the module's docstring), each client's items in `ahead` (the
        engine's paused rows) before its requests. Snapshot taken at the call; the iterator may be read without
        the lock."""
        ahead = ahead or {}
        # each client's (items ahead, requests by adapter), in the order of its items ahead, then of its oldest request
        clients: dict[str | None, tuple[Iterable[T], dict[str | None, list[Waiting]]]] = {
            client: (items, {}) for client, items in ahead.items()
        }
        for waiting in self._items:
            request = waiting[0]
            if request.request_id not in self._leaving:
                adapters = clients.setdefault(request.client, ((), {}))[1]
                adapters.setdefault(request.adapter_key, []).append(waiting)
        turns = [
            chain(items, round_robin(self.adapters.order(adapters))) for items, adapters in self.clients.order(clients)
        ]
        return round_robin(turns)

    def _count(self, request: GenerationRequest, delta: int) -> None:
        clients = self._per_adapter_client.setdefault(request.adapter_key, {})
        for counts, key in (
            (self.per_adapter, request.adapter_key),
            (self._per_client, request.client),
            (clients, request.client),
        ):
            left = counts.get(key, 0) + delta
            if left:
                counts[key] = left
            else:
                del counts[key]
        if not clients:
            del self._per_adapter_client[request.adapter_key]


_ANY = object()  # _give_place: a request for any adapter


def _heavier(held: dict[str | None, int], client: str | None) -> tuple[str | None, ...]:
    """(the client holding the most of `held`,) where it holds more than `client` would with one more (it gives
    that place), else (): None is a client (one of its own)."""
    if not held:
        return ()
    heaviest, most = max(held.items(), key=lambda item: item[1])
    return (heaviest,) if most > held.get(client, 0) + 1 else ()


def round_robin(groups: Iterable[Iterable[T]]) -> Iterator[T]:
    """The first item of each group in turn, then the second of each, and so on: O(items) in all, as each round
    visits only the groups that still have an item left. Groups are read lazily, one item at a time."""
    rounds = deque(iter(group) for group in groups)
    while rounds:
        items = rounds.popleft()
        for item in items:  # its next item, if any; the group goes to the back for the one after
            yield item
            rounds.append(items)
            break
