"""The adapter registry: which adapters exist (the store) and which are loaded in CPU memory.

Tiers: disk (the store) -> CPU (an LRU of `LoraWeights`, bounded by max_cpu_adapters) -> device slots (the
engine's; it copies a lease's weights into a slot, and `on_unload(key)` tells it to drop one). Requests hold a
`Lease` while they run (queued ones too): a leased adapter is never evicted, and a deleted one is freed when
its last lease is released, keeping its place in the CPU tier until then. Leases never grow the CPU tier past
its bound: when every place in it is leased, loading or pinned, a load for one more adapter is refused (429)
rather than queued requests holding any number of adapters in memory. Loads run in worker threads, never on
the event loop, and concurrent acquires of one adapter share one load. The state lives behind one threading
lock because leases are released from the engine thread as well as from the event loop.
"""

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Protocol

import torch

from adapters.errors import (
    AdapterError,
    AdapterLoadFailed,
    AdapterNotFound,
    IncompatibleAdapter,
    TooManyAdaptersLoaded,
    TooManyPinned,
    reason,
)
from adapters.lora import LoraModule, LoraWeights
from adapters.manifest import Manifest
from adapters.names import parse_ref
from adapters.store import AdapterStore

log = logging.getLogger(__name__)


class AdapterState(StrEnum):
    STORED = "stored"  # on disk only
    LOADING = "loading"  # disk -> CPU in progress
    ON_CPU = "on_cpu"  # in the CPU tier, no request holds it
    ACTIVE = "active"  # leased by at least one request (the engine may hold it in a device slot)
    FAILED = "failed"  # the last load failed; the next acquire retries
    DELETING = "deleting"  # deleted, waiting for its last lease


class RegistryMetrics(Protocol):
    """What the registry reports; the HTTP layer backs it with prometheus-client objects."""

    def observe_load(self, seconds: float) -> None: ...  # one disk -> CPU load

    def count_eviction(self) -> None: ...  # one adapter dropped from the CPU tier to make room


@dataclass(eq=False)
class _Entry:
    manifest: Manifest
    weights: LoraWeights | None = None
    loading: Future[LoraWeights] | None = None
    refs: int = 0
    pinned: bool = False
    deleting: bool = False
    error: str | None = None
    leases: set["Lease"] = field(default_factory=set)


class Lease:
    """A request's hold on one adapter version: `key` ('name@N'), its manifest and CPU weights."""

    def __init__(self, registry: "AdapterRegistry", entry: _Entry, weights: LoraWeights) -> None:
        self._registry = registry
        self._entry = entry
        self.manifest = entry.manifest
        self.key = entry.manifest.key
        self.weights = weights

    def release(self) -> None:
        """Idempotent and thread-safe (the engine thread releases when a request finishes)."""
        self._registry._release(self._entry, self)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()


def _pinned_copy(weights: LoraWeights) -> LoraWeights:
    # page-locked host memory makes the engine's host -> device slot copies asynchronous
    return LoraWeights(
        {name: LoraModule(m.a.pin_memory(), m.b.pin_memory(), m.scaling) for name, m in weights.modules.items()}
    )


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        *,
        max_cpu_adapters: int,
        on_unload: Callable[[str], None] | None = None,
        metrics: RegistryMetrics | None = None,
        pin_memory: bool | None = None,
        prepare: Callable[[LoraWeights], LoraWeights] | None = None,
        load_workers: int = 2,
        lookup_workers: int = 4,
        keep_versions: int | None = None,
    ) -> None:
        """`on_unload(key)` is called (outside any lock) whenever an adapter leaves the CPU tier, so the
        engine can free its device slot; `pin_memory` defaults to whether CUDA is available; `prepare(weights)`
        runs on the load worker after each disk -> CPU load and returns what the CPU tier keeps instead (the
        engine packs adapters there, off the request path, and hands back views of the pack); `keep_versions`: after
        each upload, delete the name's oldest versions beyond that many that no request here uses (None: keep all)."""
        self.store = store
        self.keep_versions = keep_versions
        self.max_cpu_adapters = max_cpu_adapters
        self._on_unload = on_unload
        self._metrics = metrics
        self._pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._prepare = prepare
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}  # every adapter the registry holds anything about
        self._cpu: OrderedDict[str, _Entry] = OrderedDict()  # loaded ones, least recently used first
        # deleted versions that leases still hold, out of the index (no new request is served them) but in memory
        # until their last release: they keep their places in the CPU tier, or churn (upload, lease, delete, again)
        # would hold any number of adapters past its bound
        self._deleted: set[_Entry] = set()
        self._executor = ThreadPoolExecutor(load_workers, thread_name_prefix="adapter-load")
        # Loads that fetch from a remote store (S3) have workers of their own: a store that stops answering holds
        # each such load for minutes (botocore's timeouts and retries), and two of them held every load of versions
        # this server keeps on its own disk behind them.
        self._fetches = ThreadPoolExecutor(load_workers, thread_name_prefix="adapter-fetch")
        # Lookups of names the index lacks go to the store, a remote one for S3, and any client may name adapters
        # that exist nowhere: they get threads of their own, so that a flood of them on a slow store waits on
        # itself, not in the event loop's default pool where every prompt is tokenized.
        self._lookups = ThreadPoolExecutor(lookup_workers, thread_name_prefix="adapter-lookup")
        # deletes through this server and those found in the shared store take one path: _forget
        store.on_removed(self._forget)
        # the versions in use here are kept by prunes through other servers too
        store.share_in_use(self._used)

    # -- serving ------------------------------------------------------------------------------------

    async def acquire(self, ref: str) -> Lease:
        """Resolve 'name' (newest version) or 'name@N', load it to CPU if needed, and lease it."""
        manifest = await self.resolve(ref)
        try:
            return await self._acquire(manifest)
        except AdapterNotFound:
            # 'name' meant a version another server has deleted since this one last looked (a rollback there), which
            # its lease found gone, taking it out of the index: the name means its newest version left now
            if parse_ref(ref)[1] is not None or self.store.contains(manifest.name, manifest.version):
                raise
            return await self._acquire(await self.resolve(ref))

    async def _acquire(self, manifest: Manifest) -> Lease:
        with self._lock:
            entry = self._entry_locked(manifest)
            if entry.weights is None and entry.loading is None:
                self._admit_load_locked(entry)  # before the reservation: a refused acquire reserves nothing
            entry.refs += 1  # reserved from here on: never evicted while loading
            self.store.note_in_use(manifest.key)
            if entry.weights is not None:
                self._cpu.move_to_end(manifest.key)
                return self._lease_locked(entry, entry.weights)
            if entry.loading is None:
                workers = self._executor if self.store.local(manifest) else self._fetches
                entry.loading = workers.submit(self._load, entry)
            loading = entry.loading
        try:
            # shielded: one waiter's cancellation must not cancel the load the others share
            weights = await asyncio.shield(asyncio.wrap_future(loading))
        except BaseException:
            self._release(entry, None)
            raise
        with self._lock:
            return self._lease_locked(entry, weights)

    async def resolve(self, ref: str) -> Manifest:
        """The manifest `ref` means now. From the index; a name or version not in it is looked for in the
        store (off the event loop: the store may be remote), so what another server stored is found."""
        try:
            return self.store.resolve(ref, recheck=False)
        except AdapterNotFound:
            return await asyncio.get_running_loop().run_in_executor(self._lookups, self.store.resolve, ref)

    def _entry_locked(self, manifest: Manifest) -> _Entry:
        entry = self._entries.get(manifest.key)
        if entry is not None:
            return entry
        # checked under the lock: a delete removes the version from the store before it takes this lock
        if not self.store.contains(manifest.name, manifest.version):
            raise AdapterNotFound(f"adapter {manifest.key} was deleted")
        mismatch = self.store.base.mismatch(manifest.base)
        if mismatch:
            raise IncompatibleAdapter(f"adapter {manifest.key} does not fit the served base model: {mismatch}")
        entry = self._entries[manifest.key] = _Entry(manifest)
        return entry

    def _admit_load_locked(self, entry: _Entry) -> None:
        """Refuse a new load when the CPU tier has no place left that eviction could free: each place is
        held by a leased adapter (loaded or loading) or reserved by a pin. Refused at once, not waited for, so
        a client queueing requests for many adapters holds at most --max-cpu-adapters of them."""
        if entry.pinned:
            return  # pin() keeps pins under the bound, so a pinned adapter always has its place
        held = sum(
            e.pinned or bool(e.refs and (e.weights is not None or e.loading))
            for e in itertools.chain(self._entries.values(), self._deleted)
        )
        if held < self.max_cpu_adapters:
            return
        self._forget_if_idle_locked(entry)
        raise TooManyAdaptersLoaded(
            f"cannot load adapter {entry.manifest.key}: all {self.max_cpu_adapters} places in the CPU tier "
            "(--max-cpu-adapters) hold adapters that requests are using; retry when some finish, or raise "
            "--max-cpu-adapters"
        )

    def _lease_locked(self, entry: _Entry, weights: LoraWeights) -> Lease:
        lease = Lease(self, entry, weights)
        entry.leases.add(lease)
        return lease

    def _load(self, entry: _Entry) -> LoraWeights:
        """Worker thread: disk -> CPU. Any failure, typed or not (the engine's packing of weights it cannot
        take), ends in FAILED with a typed error: never LOADING for good."""
        start = time.perf_counter()
        try:
            weights = self.store.read_weights(entry.manifest)
            if self._pin_memory:
                weights = _pinned_copy(weights)
            if self._prepare is not None:
                weights = self._prepare(weights)
        except Exception as exc:
            # the files went away under the load: a delete takes the version out of the store's index before it
            # removes them, and tells this registry (`deleting`) only after
            deleted = not self.store.contains(entry.manifest.name, entry.manifest.version)
            with self._lock:
                entry.loading = None
                entry.error = str(exc)
                if entry.deleting or deleted:
                    raise AdapterNotFound(f"adapter {entry.manifest.key} was deleted") from exc
            if isinstance(exc, AdapterError):
                raise
            raise AdapterLoadFailed(
                f"adapter {entry.manifest.key} could not be loaded ({reason(exc)}); delete it and upload it again"
            ) from exc
        if self._metrics is not None:
            self._metrics.observe_load(time.perf_counter() - start)
        with self._lock:
            entry.loading = None
            entry.error = None
            entry.weights = weights
            if not entry.deleting:  # leases that started before the delete still get it; freed on release
                self._cpu[entry.manifest.key] = entry
            unloaded = self._evict_locked()
        self._unload(unloaded)
        return weights

    def _release(self, entry: _Entry, lease: Lease | None) -> None:
        with self._lock:
            if lease is not None:
                if lease not in entry.leases:
                    return  # released before
                entry.leases.discard(lease)
            entry.refs -= 1
            if entry.refs:
                return
            if entry.deleting:
                self._deleted.discard(entry)
                unloaded = [entry.manifest.key] if entry.weights is not None else []
                entry.weights = None
            else:
                unloaded = self._evict_locked()
                self._forget_if_idle_locked(entry)
        self._unload(unloaded)

    def _evict_locked(self) -> list[str]:
        """Drop least recently used, unleased, unpinned adapters until the CPU tier fits. Leased ones stay
        even over the bound (only pins made while it is full of leases take it there: loads for leases are
        admitted only under it) and come back under it when released."""
        unloaded = []
        room = self.max_cpu_adapters - len(self._deleted_loaded_locked())  # theirs until their last release
        for key, entry in list(self._cpu.items()):
            if len(self._cpu) <= room:
                break
            if entry.refs or entry.pinned:
                continue
            del self._cpu[key]
            entry.weights = None
            self._forget_if_idle_locked(entry)
            unloaded.append(key)
            if self._metrics is not None:
                self._metrics.count_eviction()
        return unloaded

    def _deleted_loaded_locked(self) -> list[_Entry]:
        return [e for e in self._deleted if e.weights is not None]

    def _forget_if_idle_locked(self, entry: _Entry) -> None:
        # keep the index of held entries small with thousands of adapters on disk
        idle = not (entry.refs or entry.pinned or entry.weights is not None or entry.loading or entry.error)
        if idle and self._entries.get(entry.manifest.key) is entry:
            del self._entries[entry.manifest.key]

    def _unload(self, keys: Iterable[str]) -> None:
        if self._on_unload is not None:
            for key in keys:
                self._on_unload(key)

    # -- pinning ------------------------------------------------------------------------------------

    def pin(self, ref: str) -> str:
        """Keep an adapter version ('name' pins the newest now) in the CPU tier; returns its key. It is
        loaded by the next acquire (or `preload`) and never evicted until unpinned."""
        manifest = self.store.resolve(ref)
        with self._lock:
            pinned = sum(e.pinned for e in self._entries.values())
            entry = self._entry_locked(manifest)
            if not entry.pinned and pinned + 1 >= self.max_cpu_adapters:
                self._forget_if_idle_locked(entry)
                raise TooManyPinned(
                    f"cannot pin {manifest.key}: {pinned} adapters are pinned and the CPU tier holds "
                    f"{self.max_cpu_adapters} (--max-cpu-adapters); unpin one or raise the limit"
                )
            entry.pinned = True
            self.store.note_in_use(manifest.key)
        return manifest.key

    def unpin(self, ref: str) -> None:
        manifest = self.store.resolve(ref)
        with self._lock:
            entry = self._entries.get(manifest.key)
            if entry is None or not entry.pinned:
                return
            entry.pinned = False
            unloaded = self._evict_locked()
            self._forget_if_idle_locked(entry)
        self._unload(unloaded)

    async def preload(self, refs: Iterable[str]) -> None:
        """Start-up (Settings.preload): pin each adapter and load it now."""
        for ref in refs:
            self.pin(ref)
            (await self.acquire(ref)).release()

    # -- managing -----------------------------------------------------------------------------------

    async def put(self, name: str, src: Path) -> tuple[Manifest, bool]:
        """Validate and store a PEFT directory as the next version of `name` (see AdapterStore.put), then, with
        `keep_versions`, delete its oldest versions beyond that many, except those in use (`prune`)."""
        return await asyncio.to_thread(self._put, name, src)

    def _put(self, name: str, src: Path) -> tuple[Manifest, bool]:
        stored = self.store.put(name, src)
        if self.keep_versions is not None:
            try:
                self.prune(name, self.keep_versions)
            except Exception:  # the upload is stored either way; the next one prunes again
                log.warning("pruning the old versions of %s failed", name, exc_info=True)
        return stored

    def prune(self, name: str, keep: int) -> list[str]:
        """Blocking: delete the oldest versions of `name` beyond its newest `keep`, except any this server or another
        sharing the store is using (leased by a request, running or queued, loading, or pinned): those stay, and go
        at a later prune once free. A request that takes a version while it is pruned finishes on it, as after a
        delete. Returns the removed keys."""
        return self.store.prune(name, keep, lambda keys: self._used().intersection(keys))

    def _used(self) -> set[str]:
        """The keys of the versions in use here: leased, loading or pinned (at most the CPU tier's bound)."""
        with self._lock:
            return {key for key, e in self._entries.items() if e.refs or e.pinned or e.loading is not None}

    async def delete(self, ref: str) -> list[str]:
        """Delete 'name' (all versions, unreadable ones included) or 'name@N'; return the removed keys. New
        acquires get AdapterNotFound at once; a leased version is freed (and `on_unload` called) when its
        last lease is released."""
        return await asyncio.to_thread(self.store.delete, ref)

    def _forget(self, removed: list[str]) -> None:
        """The store no longer has these versions (deleted here or by another server): no new lease, and
        each is freed once its last lease is released."""
        unloaded = []
        gone = set(removed)
        with self._lock:
            # the held entries are few (the CPU tier, leases, pins, failures), the removed versions any number (a
            # name deleted whole): the lock is held for the smaller of the two
            held = [key for key in self._entries if key in gone] if len(gone) > len(self._entries) else gone
            for key in held:
                entry = self._entries.pop(key, None)
                if entry is None:
                    continue
                entry.deleting = True
                entry.pinned = False
                self._cpu.pop(key, None)
                if entry.refs:
                    self._deleted.add(entry)
                elif entry.weights is not None:
                    entry.weights = None
                    unloaded.append(key)
        self._unload(unloaded)

    def state(self, key: str) -> AdapterState:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return AdapterState.STORED
            if entry.deleting:
                return AdapterState.DELETING
            if entry.loading is not None:
                return AdapterState.LOADING
            if entry.weights is not None:
                return AdapterState.ACTIVE if entry.refs else AdapterState.ON_CPU
            return AdapterState.FAILED if entry.error else AdapterState.STORED

    @property
    def cpu_adapters(self) -> int:
        with self._lock:
            return len(self._cpu) + len(self._deleted_loaded_locked())

    @property
    def cpu_bytes(self) -> int:
        """Bytes of LoRA weights held in the CPU tier (what max_cpu_adapters bounds)."""
        with self._lock:
            held = [*self._cpu.values(), *self._deleted_loaded_locked()]
            return sum(e.weights.nbytes for e in held if e.weights is not None)

    def close(self) -> None:
        """Stop the load workers, drop the CPU tier and close the store (server shutdown)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._fetches.shutdown(wait=True, cancel_futures=True)
        self._lookups.shutdown(wait=True, cancel_futures=True)
        self.store.close()
        with self._lock:
            unloaded = list(self._cpu)
            for entry in self._cpu.values():
                entry.weights = None
            self._cpu.clear()
            self._entries.clear()
        self._unload(unloaded)
