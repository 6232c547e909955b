"""Adapter mixing per request, as LoRAX's `merged_adapters` with merge_strategy "linear": the mix is the
weighted sum of the adapters' deltas, sum_j w_j s_j B_j A_j, which is exactly ONE LoRA of rank sum_j r_j:
A stacked [sum r, in], B stacked [out, sum r] with each adapter's weight and scaling folded into its columns
(PEFT's add_weighted_adapter "cat"; PEFT's "linear" combines A and B separately, which is not the sum of the
deltas). The base model is never touched: the derived adapter goes into a device slot like any other, so a
mixed request runs in the same batch as the rest.

Derived adapters are keyed by their components' resolved versions and weights, built off the event loop, and
kept in a small LRU (each is as large as its components together); one dropped from it frees its slot. Mix
weights are any floats, so clients can ask for endless distinct mixes: the mixes alive at once (cached, held by
a request, or being built) are bounded, and a new one past the bound is a 429 until one is released.

The mixes requests hold are shared between clients (an API key, or a peer address: client_share.current_client).
A client refused a new mix for want of a place waits for one for a few seconds (a client retrying after its
Retry-After keeps waiting); meanwhile a free place goes first to the clients that have waited longer than the asker
and hold no more mixes than it does: a place that frees goes to a client that waits, not back to the client that
holds every other one. Nor does a place stay taken for a client's new requests on its mix while others wait with no
free place for them: a client overlapping its requests on one mix would never free its place."""

import asyncio
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from adapters.bounds import MAX_GAIN, excess_magnitude
from adapters.lora import LoraModule, LoraWeights
from loraplex.errors import LoraplexError
from server.client_share import current_client, current_request

MAX_MIX_ADAPTERS = 8
MAX_MIX_WEIGHT = 100.0  # |weight|: beyond it a delta swamps the base model's output anyway
MAX_CACHED_MIXES = 8
# Each mix is up to a max_lora_rank adapter in host memory: requests may hold this many beyond the cache's.
MAX_LIVE_MIXES = 2 * MAX_CACHED_MIXES
MIX_PREFIX = "mix:"  # engine keys of derived adapters: never a stored name (which has no ":")
# How long a client refused a mix place counts as waiting for one: past its Retry-After (1 s), for a retry to come
MIX_WAIT_S = 3.0


class InvalidMix(LoraplexError):
    http_status = 422
    code = "invalid_adapter_mix"


class TooManyMixes(LoraplexError):
    http_status = 429
    code = "too_many_adapter_mixes"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant


@dataclass(frozen=True)
class AdapterMix:
    """A request's mix: adapter refs (`name` or `name@N`) and their weights, as the client sent them."""

    refs: tuple[str, ...]
    weights: tuple[float, ...]


def mix_key(keys: list[str], weights: tuple[float, ...]) -> str:
    """Deterministic, from resolved versions: `mix:a@1*0.5+b@2*0.5` (the same mix, the same slot)."""
    return MIX_PREFIX + "+".join(f"{key}*{weight!r}" for key, weight in zip(keys, weights, strict=True))


def mix_lora(components: list[tuple[LoraWeights, float]]) -> LoraWeights:
    """One LoRA equal to sum_j w_j * delta_j, module by module (a module only some adapters target takes only
    theirs). Scaling 1: each adapter's scaling is folded into its B columns."""
    names = list(dict.fromkeys(name for lora, _ in components for name in lora.modules))
    modules = {}
    for name in names:
        parts = [(lora.modules[name], w) for lora, w in components if name in lora.modules]
        a = torch.cat([m.a.float() for m, _ in parts], dim=0)  # [sum r, in]
        b = torch.cat([m.b.float() * (w * m.scaling) for m, w in parts], dim=1)  # [out, sum r]
        modules[name] = LoraModule(a, b, 1.0)
    return LoraWeights(modules)


class MixCache:
    """Derived adapters by key, least recently used first out; `on_drop(key)` frees the device slot of one that
    leaves. `prepare` turns a built mix into what the engine activates (its packed form). A request holds its mix
    from `acquire` until it calls the release it was given."""

    def __init__(
        self,
        max_lora_rank: int,
        prepare: Callable[[LoraWeights], LoraWeights],
        on_drop: Callable[[str], None],
        capacity: int = MAX_CACHED_MIXES,
        max_live: int = MAX_LIVE_MIXES,
        max_in_use: int = MAX_LIVE_MIXES,
    ) -> None:
        self.max_lora_rank = max_lora_rank
        self._prepare = prepare
        self._on_drop = on_drop
        self._capacity = capacity
        self._max_live = max_live
        # distinct mixes requests hold (or are building) at once: each running one takes a device slot, so the
        # server keeps this under its slots, or mixes alone (any inference key can make new ones) could hold
        # every slot and keep each stored adapter waiting for a whole request
        self._max_in_use = max_in_use
        self._mixes: OrderedDict[str, LoraWeights] = OrderedDict()
        self._held: Counter[str] = Counter()  # requests holding each mix, cached, being built, or neither
        # each held mix's requests by client and HTTP request (client_share.current_request)
        self._holders: dict[str, Counter[tuple[str | None, object | None]]] = {}
        # clients refused a place: (when they first were while waiting, when they last were)
        self._waiting: dict[str | None, tuple[float, float]] = {}
        # mixes being built, each once, however many requests wait for it (the choices of one request with n > 1
        # among them): a build runs to its end in a worker thread, its result cached, whoever stopped waiting
        self._builds: dict[str, Future[LoraWeights]] = {}
        self._lock = threading.Lock()

    async def acquire(
        self, key: str, components: list[tuple[str, LoraWeights, float]]
    ) -> tuple[LoraWeights, Callable[[], None]]:
        """The mix of (resolved key, weights, mix weight) components, built in a worker thread on a miss (one build
        a key, shared by the requests asking for it meanwhile), and the call that releases the caller's hold on it
        (once)."""
        client, request = current_client.get(), current_request.get()
        with self._lock:
            mixed = self._mixes.get(key)
            new_place = key not in self._held and key not in self._builds  # a mix no request holds or waits for
            if new_place:
                self._check_place(client)
                live = len(self._mixes.keys() | self._held.keys() | self._builds.keys())
                if mixed is None and live >= self._max_live:
                    raise TooManyMixes(
                        f"{live} adapter mixes are in use, the most this server keeps at once: retry when requests "
                        "finish, or reuse the weights of a mix in use"
                    )
            elif request is None or all(r is not request for _, r in self._holders.get(key, ())):
                self._check_join(client)  # the runs of a request holding the mix (its choices) join it freely
            build = None
            if mixed is not None:
                self._mixes.move_to_end(key)
            elif key in self._builds:
                build = self._builds[key]
            else:
                build = self._builds[key] = Future()
                asyncio.get_running_loop().run_in_executor(None, self._build_into, key, components, build)
            self._held[key] += 1
            self._holders.setdefault(key, Counter())[client, request] += 1
            if new_place:
                self._waiting.pop(client, None)
        release = self._release_of(key, (client, request))
        if build is not None:
            try:  # shielded: one waiter's cancellation is not the build's, which others may wait for
                mixed = await asyncio.shield(asyncio.wrap_future(build))
            except BaseException:
                release()
                raise
        return mixed, release

    def _check_place(self, client: str | None) -> None:
        """Raise TooManyMixes unless `client` may take a place for a new mix (under the lock): there is one, and
        more than the other clients ahead of it (waiting since before it, holding no more mixes than it does)."""
        free, since, now = self._free_places(client)
        if free <= 0:
            self._waiting[client] = (since, now)
            raise TooManyMixes(
                f"{self._max_in_use} adapter mixes are held by requests, the most this server runs at once (half "
                "its adapter slots, --max-active-adapters, so that stored adapters keep the rest): retry when "
                "requests finish, or reuse the weights of a mix in use"
            )
        holding, ahead = self._ahead(client, since)
        if len(ahead) >= free:
            self._waiting[client] = (since, now)
            raise TooManyMixes(
                f"this client (its API key, or its address on a server without keys) holds {holding[client]} "
                f"adapter mixes, and other clients holding no more wait for the free places ({len(ahead)} of them "
                f"for {free}): retry when they have theirs or when this client's requests finish, or reuse the "
                "weights of a mix it holds"
            )

    def _check_join(self, client: str | None) -> None:
        """Raise TooManyMixes where `client`, joining a held mix (under the lock), would keep its place taken while
        clients ahead of it wait with no free place for each: the place frees when its requests end."""
        free, since, _ = self._free_places(client)
        holding, ahead = self._ahead(client, since)
        if len(ahead) > free:
            raise TooManyMixes(
                f"this client (its API key, or its address on a server without keys) holds {holding[client]} "
                f"adapter mixes, and {len(ahead)} other clients holding no more wait for a place ({free} free): a "
                "new request on a mix in use would keep its place from them; retry when they have theirs"
            )

    def _free_places(self, client: str | None) -> tuple[int, float, float]:
        """(free places, since when `client` waits, now), the clients waiting past MIX_WAIT_S forgotten."""
        free = self._max_in_use - len(self._held.keys() | self._builds.keys())
        now = time.monotonic()
        self._waiting = {c: times for c, times in self._waiting.items() if now - times[1] < MIX_WAIT_S}
        return free, self._waiting.get(client, (now, now))[0], now

    def _ahead(self, client: str | None, since: float) -> tuple[Counter[str | None], list[str | None]]:
        """(client -> mixes it holds, the clients ahead of `client`: waiting since before it, holding no more)."""
        holding = Counter(c for holders in self._holders.values() for c in {c for c, _ in holders})
        ahead = [c for c, (at, _) in self._waiting.items() if at < since and holding[c] <= holding[client]]
        return holding, ahead

    def _build_into(self, key: str, components: list[tuple[str, LoraWeights, float]], build: Future) -> None:
        """Build the mix of `key` (in a worker thread), cache it and hand it (or why it cannot be built) to `build`."""
        try:
            self._check_rank(components)
            built = self._build(components)
        except BaseException as exc:
            with self._lock:
                del self._builds[key]
            build.set_exception(exc)
            return
        with self._lock:
            del self._builds[key]
            self._mixes[key] = built
            dropped = [self._mixes.popitem(last=False)[0] for _ in range(len(self._mixes) - self._capacity)]
        try:  # the mixes it displaced are dropped before anyone is handed it: the cache's bound holds when they are
            for old in dropped:
                self._on_drop(old)
        finally:
            build.set_result(built)

    def _release_of(self, key: str, holder: tuple[str | None, object | None]) -> Callable[[], None]:
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._held[key] -= 1
                    if not self._held[key]:
                        del self._held[key]
                    holders = self._holders[key]
                    holders[holder] -= 1
                    if not holders[holder]:
                        del holders[holder]
                    if not holders:
                        del self._holders[key]

        return release

    def _build(self, components: list[tuple[str, LoraWeights, float]]) -> LoraWeights:
        mixed = mix_lora([(lora, w) for _, lora, w in components])
        # Each component is within the upload bound, but weights multiply its lora_B: up to 8 adapters at |100|
        # reach 800 times it. The derived adapter is held to the same bound, which keeps the kernels finite.
        excess = excess_magnitude(mixed)
        if excess is not None:
            described = " + ".join(f"{weight:g} * {key}" for key, _, weight in components)
            raise InvalidMix(
                f"the mix {described} reaches {excess.value:g} in module {excess.module!r} "
                f"({excess.quantity}, with each adapter's weight folded into its lora_B; the largest row sum of "
                f"absolute values), over the bound of {MAX_GAIN:g} every adapter is held to: lower the weights' "
                "magnitudes, or mix fewer adapters"
            )
        return self._prepare(mixed)

    def _check_rank(self, components: list[tuple[str, LoraWeights, float]]) -> None:
        ranks: dict[str, int] = {}
        for _, lora, _ in components:
            for name, module in lora.modules.items():
                ranks[name] = ranks.get(name, 0) + module.rank
        rank = max(ranks.values(), default=0)
        if rank > self.max_lora_rank:
            described = ", ".join(f"{key} (rank {lora.rank})" for key, lora, _ in components)
            raise InvalidMix(
                f"the mix of {described} has rank {rank}, over max_lora_rank {self.max_lora_rank}: "
                "mix fewer or lower-rank adapters, or start the server with a larger --max-lora-rank"
            )
