"""The registry's tiers, leases, pinning and deletes, on real stored adapters."""

import asyncio
import gc
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from peft_dirs import LIMITS, fingerprint, make_peft_dir, new_store
from s3_server import s3_server

from adapters.errors import (
    AdapterLoadFailed,
    AdapterNotFound,
    IncompatibleAdapter,
    TooManyAdaptersLoaded,
    TooManyPinned,
)
from adapters.fingerprint import BaseFingerprint
from adapters.localstore import LocalBackend
from adapters.store import AdapterStore
from server.registry import AdapterRegistry, AdapterState


class Recorder:
    """A RegistryMetrics sink that keeps what it is told."""

    def __init__(self) -> None:
        self.loads: list[float] = []
        self.evictions = 0

    def observe_load(self, seconds: float) -> None:
        self.loads.append(seconds)

    def count_eviction(self) -> None:
        self.evictions += 1


def registry_with(tmp_path: Path, peft_dir: Path, names: list[str], max_cpu: int = 2):
    store = new_store(tmp_path / "store")
    for name in names:
        store.put(name, peft_dir)
    unloaded: list[str] = []
    metrics = Recorder()
    registry = AdapterRegistry(store, max_cpu_adapters=max_cpu, on_unload=unloaded.append, metrics=metrics)
    return registry, unloaded, metrics


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_acquire_loads_once_and_shares_concurrent_loads(tmp_path: Path, peft_dir: Path) -> None:
    registry, _, metrics = registry_with(tmp_path, peft_dir, ["a"])

    async def main() -> None:
        leases = await asyncio.gather(*(registry.acquire("a") for _ in range(10)))
        assert {lease.key for lease in leases} == {"a@1"}
        assert len({id(lease.weights) for lease in leases}) == 1
        assert registry.state("a@1") == AdapterState.ACTIVE
        for lease in leases:
            lease.release()
            lease.release()  # idempotent
        assert registry.state("a@1") == AdapterState.ON_CPU
        with await registry.acquire("a@1") as lease:
            assert lease.weights.rank == 4

    asyncio.run(main())
    assert len(metrics.loads) == 1 and metrics.loads[0] > 0
    registry.close()


def test_lru_eviction_spares_leased_adapters(tmp_path: Path, peft_dir: Path) -> None:
    registry, unloaded, metrics = registry_with(tmp_path, peft_dir, ["a", "b", "c"])

    async def main() -> None:
        held = await registry.acquire("a")
        (await registry.acquire("b")).release()
        (await registry.acquire("c")).release()  # over the bound: b is the LRU unleased one
        assert unloaded == ["b@1"] and metrics.evictions == 1
        assert registry.state("a@1") == AdapterState.ACTIVE and registry.state("b@1") == AdapterState.STORED
        held.release()
        (await registry.acquire("b")).release()  # now a is least recently used and free
        assert unloaded == ["b@1", "a@1"] and registry.cpu_adapters == 2

    asyncio.run(main())
    registry.close()


def test_pinned_adapters_stay_and_preload(tmp_path: Path, peft_dir: Path) -> None:
    registry, unloaded, _ = registry_with(tmp_path, peft_dir, ["a", "b", "c", "d"], max_cpu=3)

    async def main() -> None:
        await registry.preload(["a"])
        assert registry.state("a@1") == AdapterState.ON_CPU
        for name in ["b", "c", "d", "b", "c", "d"]:
            (await registry.acquire(name)).release()
        assert "a@1" not in unloaded and registry.state("a@1") == AdapterState.ON_CPU
        registry.pin("b")
        with pytest.raises(TooManyPinned):
            registry.pin("c")
        registry.unpin("a")
        (await registry.acquire("b")).release()  # loads b: a is now the least recently used
        assert unloaded[-1] == "a@1" and registry.state("b@1") == AdapterState.ON_CPU

    asyncio.run(main())
    registry.close()


def test_delete_while_leased(tmp_path: Path, peft_dir: Path) -> None:
    registry, unloaded, _ = registry_with(tmp_path, peft_dir, ["a"])

    async def main() -> None:
        lease = await registry.acquire("a")
        removed = await registry.delete("a")
        assert removed == ["a@1"]
        with pytest.raises(AdapterNotFound):
            await registry.acquire("a")
        assert unloaded == [] and lease.weights.rank == 4  # the running request keeps its weights
        lease.release()
        assert unloaded == ["a@1"] and registry.cpu_bytes == 0

    asyncio.run(main())
    registry.close()


def test_deleted_versions_keep_their_places_in_the_cpu_tier_while_leased(tmp_path: Path, peft_dir: Path) -> None:
    """A version deleted while requests hold it stays in memory until its last lease is released; it left the CPU
    tier's count at once, so uploading, leasing and deleting again and again held any number of adapters in memory
    past --max-cpu-adapters. It keeps its place until then (no new request is served it), and is freed then."""
    registry, unloaded, metrics = registry_with(tmp_path, peft_dir, [], max_cpu=2)

    async def main() -> None:
        leases = []
        for i in range(2):  # the churn: upload, lease, delete
            await registry.put(f"m{i}", peft_dir)
            leases.append(await registry.acquire(f"m{i}"))
            await registry.delete(f"m{i}")
        await registry.put("m2", peft_dir)
        with pytest.raises(TooManyAdaptersLoaded):
            await registry.acquire("m2")
        assert registry.cpu_adapters == 2 and unloaded == []
        with pytest.raises(AdapterNotFound):
            await registry.acquire("m0@1")
        leases[0].release()
        assert unloaded == ["m0@1"] and registry.cpu_adapters == 1
        (await registry.acquire("m2")).release()
        await registry.put("m3", peft_dir)
        (await registry.acquire("m3")).release()  # m1, deleted and leased, holds one place: m2 makes room
        assert unloaded == ["m0@1", "m2@1"] and metrics.evictions == 1 and registry.cpu_adapters == 2
        leases[1].release()
        assert unloaded == ["m0@1", "m2@1", "m1@1"] and registry.cpu_adapters == 1

    asyncio.run(main())
    registry.close()


def test_a_version_deleted_while_it_loads_takes_its_place_once_loaded(tmp_path: Path, peft_dir: Path) -> None:
    """The leases waiting for a load get its weights though the version was deleted meanwhile: they take a place in
    the CPU tier as a version loaded for them does, and an unleased adapter makes room."""
    store = new_store(tmp_path / "store")
    for name in ("x", "y", "a"):
        store.put(name, peft_dir)
    loading, go = threading.Event(), threading.Event()
    go.set()

    def prepare(weights: Any) -> Any:
        if not go.is_set():
            loading.set()
            assert go.wait(10)
        return weights

    unloaded: list[str] = []
    registry = AdapterRegistry(store, max_cpu_adapters=2, on_unload=unloaded.append, prepare=prepare)

    async def main() -> None:
        for name in ("x", "y"):
            (await registry.acquire(name)).release()
        go.clear()
        acquire = asyncio.ensure_future(registry.acquire("a"))
        assert await asyncio.to_thread(loading.wait, 10)
        await registry.delete("a")
        go.set()
        with await acquire as lease:
            assert lease.key == "a@1" and unloaded == ["x@1"] and registry.cpu_adapters == 2
        assert unloaded == ["x@1", "a@1"] and registry.cpu_adapters == 1

    asyncio.run(main())
    registry.close()


def test_new_version_does_not_move_running_leases(tmp_path: Path, peft_dir: Path) -> None:
    registry, _, _ = registry_with(tmp_path, peft_dir, ["a"])

    async def main() -> None:
        old = await registry.acquire("a")
        manifest, created = await registry.put("a", make_peft_dir(tmp_path / "v2", seed=1))
        assert created and manifest.key == "a@2"
        new = await registry.acquire("a")
        assert (old.key, new.key) == ("a@1", "a@2") and old.weights is not new.weights
        old.release()
        new.release()

    asyncio.run(main())
    registry.close()


def test_failed_load_is_reported_and_retried(tmp_path: Path, peft_dir: Path) -> None:
    registry, _, _ = registry_with(tmp_path, peft_dir, ["a"])
    weights = tmp_path / "store" / "a" / "1" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])  # damaged behind the server's back

    async def main() -> None:
        with pytest.raises(AdapterLoadFailed, match="delete and upload it again") as failed:
            await registry.acquire("a")
        assert str(tmp_path) not in str(failed.value)  # what a client reads names no server path
        assert registry.state("a@1") == AdapterState.FAILED
        weights.unlink()  # an OSError, whose message names the file
        with pytest.raises(AdapterLoadFailed, match="No such file or directory") as failed:
            await registry.acquire("a")
        assert str(tmp_path) not in str(failed.value)
        weights.write_bytes(good)
        (await registry.acquire("a")).release()
        assert registry.state("a@1") == AdapterState.ON_CPU

    asyncio.run(main())
    registry.close()


def test_a_load_whose_version_is_deleted_under_it_is_a_404(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete takes the version out of the store's index, removes its files, and only then tells the registry: a
    load failing in between (its files gone) was a 500 that said to upload the adapter again."""
    registry, _, _ = registry_with(tmp_path, peft_dir, ["a"])
    store = registry.store
    read = store._read

    def read_during_delete(manifest, path):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(store, "_notify", lambda removed: None)  # the registry hears of it later
        store.delete("a")  # the files go once the version's directory was opened
        return read(manifest, path)

    monkeypatch.setattr(store, "_read", read_during_delete)

    async def main() -> None:
        with pytest.raises(AdapterNotFound, match="no adapter named 'a'"):  # 'a' looked up again: none left
            await registry.acquire("a")

    asyncio.run(main())
    registry.close()


def test_cancelled_acquire_does_not_break_the_shared_load(tmp_path: Path, peft_dir: Path) -> None:
    registry, _, _ = registry_with(tmp_path, peft_dir, ["a"])

    async def main() -> None:
        first = asyncio.create_task(registry.acquire("a"))
        second = asyncio.create_task(registry.acquire("a"))
        await asyncio.sleep(0)
        first.cancel()
        lease = await second
        assert lease.weights.rank == 4
        lease.release()
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(main())
    registry.close()


def test_adapters_for_another_base_are_refused(tmp_path: Path, peft_dir: Path) -> None:
    new_store(tmp_path / "store").put("a", peft_dir)
    other = BaseFingerprint(architecture="MistralForCausalLM", modules=fingerprint().modules)
    store = AdapterStore(LocalBackend(tmp_path / "store"), other, new_store.__defaults__[0])
    registry = AdapterRegistry(store, max_cpu_adapters=2)
    with pytest.raises(IncompatibleAdapter, match="MistralForCausalLM"):
        asyncio.run(registry.acquire("a"))
    registry.close()


def test_200_load_delete_cycles_do_not_leak(tmp_path: Path) -> None:
    # rank 16 on every projection: ~128 KB per adapter, so a leak of 200 shows in RSS
    big = make_peft_dir(tmp_path / "big", r=16, target_modules="all-linear")
    registry, unloaded, _ = registry_with(tmp_path, big, [], max_cpu=8)

    async def cycle(i: int) -> None:
        await registry.put(f"m{i}", big)
        lease = await registry.acquire(f"m{i}")
        assert lease.weights.nbytes > 100_000
        lease.release()
        await registry.delete(f"m{i}")

    async def main() -> None:
        for i in range(20):  # warm up allocator pools and caches before measuring
            await cycle(i)
        gc.collect()
        start = rss_bytes()
        for i in range(20, 220):
            await cycle(i)
        gc.collect()
        assert registry.cpu_bytes == 0 and registry.cpu_adapters == 0
        assert len(unloaded) == 220 and len(registry.store) == 0
        assert rss_bytes() - start < 16 << 20

    asyncio.run(main())
    registry.close()


def test_thousand_adapters_list_and_serve_round_robin(tmp_path: Path, peft_dir: Path) -> None:
    root = tmp_path / "store"
    first, _ = new_store(root).put("adapter-0000", peft_dir)
    for i in range(1, 1000):  # clone on disk, as a server restarting over a large store finds them
        name = f"adapter-{i:04d}"
        shutil.copytree(root / first.name, root / name)
        (root / name / "1" / "manifest.json").write_text(first.model_copy(update={"name": name}).model_dump_json())

    started = time.perf_counter()
    store = new_store(root)
    names, cursor = [], None
    while True:
        page, cursor = store.page(100, cursor)
        names += [m.name for m in page]
        if cursor is None:
            break
    assert time.perf_counter() - started < 5
    assert len(names) == 1000 and names == sorted(names)

    unloaded: list[str] = []
    registry = AdapterRegistry(store, max_cpu_adapters=8, on_unload=unloaded.append)

    async def round_robin() -> None:
        for name in names:
            leases = [await registry.acquire(name)]
            leases.append(await registry.acquire(name))  # a second request on the same adapter
            for lease in leases:
                lease.release()
            assert registry.cpu_adapters <= 8

    asyncio.run(round_robin())
    gc.collect()
    rss = rss_bytes()
    asyncio.run(round_robin())
    gc.collect()
    assert registry.cpu_adapters == 8 and registry.cpu_bytes == 8 * 7168
    assert len(unloaded) == 2000 - 8
    assert rss_bytes() - rss < 16 << 20
    registry.close()


def test_a_load_that_fails_in_any_way_ends_failed_not_loading(tmp_path: Path, peft_dir: Path) -> None:
    """The engine's packing (`prepare`) or pinning can fail on weights the store accepted: the adapter must
    show FAILED and each acquire answer a typed error, never hang in LOADING."""

    def prepare(weights):
        raise RuntimeError("Promotion for Float8 types is not supported")

    store = new_store(tmp_path / "store")
    store.put("a", peft_dir)
    registry = AdapterRegistry(store, max_cpu_adapters=2, prepare=prepare)

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(AdapterLoadFailed, match="Float8"):
                await registry.acquire("a")
            assert registry.state("a@1") == AdapterState.FAILED

    asyncio.run(main())
    registry.close()


def test_another_servers_uploads_and_deletes_reach_the_registry(tmp_path: Path, peft_dir: Path) -> None:
    """A second store on the same directory stands for another server: what it stores is served here at
    once; what it deletes starts no new request here after a refresh, while running ones keep their lease."""
    registry, unloaded, _ = registry_with(tmp_path, peft_dir, [])
    other = new_store(tmp_path / "store")

    async def main() -> None:
        other.put("a", peft_dir)
        lease = await registry.acquire("a")  # never seen here: looked up in the store, not a 404
        assert lease.key == "a@1"
        other.delete("a")
        registry.store.refresh()
        with pytest.raises(AdapterNotFound):
            await registry.acquire("a")
        assert registry.state("a@1") == AdapterState.STORED and lease.weights.rank == 4 and unloaded == []
        lease.release()
        assert unloaded == ["a@1"] and registry.cpu_adapters == 0

    asyncio.run(main())
    registry.close()


def test_a_rollback_through_another_server_serves_the_version_left(tmp_path: Path, peft_dir: Path) -> None:
    """Another server deletes the newest version (a rollback): 'name' here still meant it until the next refresh,
    and a request for 'name' that had to load it found its files gone and got 404 adapter_not_found ("bot@2 was
    deleted") though bot@1 is stored. It is served bot@1; a request for bot@2 itself still gets the 404."""
    registry, _, _ = registry_with(tmp_path, peft_dir, ["bot"])
    other = new_store(tmp_path / "store")
    other.put("bot", make_peft_dir(tmp_path / "v2", seed=1))
    assert registry.store.resolve("bot@2").key == "bot@2"  # seen here: 'bot' means it
    other.delete("bot@2")

    async def main() -> None:
        with await registry.acquire("bot") as lease:
            assert lease.key == "bot@1"
        with pytest.raises(AdapterNotFound, match="no version 2"):
            await registry.acquire("bot@2")

    asyncio.run(main())
    registry.close()


def test_the_refresh_thread_follows_the_store(tmp_path: Path, peft_dir: Path) -> None:
    registry, unloaded, _ = registry_with(tmp_path, peft_dir, ["a"])
    registry.store.start_refresh(0.05)
    asyncio.run(registry.acquire("a")).release()
    new_store(tmp_path / "store").delete("a")
    deadline = time.monotonic() + 5
    while unloaded != ["a@1"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert unloaded == ["a@1"]
    registry.close()


def test_lookups_of_names_stored_nowhere_hold_up_no_other_work(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request naming an adapter the index lacks looks it up in the store, a remote one for an S3 store, and
    any inference client can send names that exist nowhere. On a store slow to list (0.2 s here), 40 such
    lookups took every thread of the event loop's default pool, where each prompt is tokenized: honest requests
    waited behind all of them (1.4 s on two cores)."""
    from adapters.s3store import S3Backend

    with s3_server("lookups") as env:
        for key, value in env.items():  # read by boto3 itself, as in production
            monkeypatch.setenv(key, value)
        store = AdapterStore(S3Backend("s3://lookups/p", tmp_path / "cache", 1 << 30), fingerprint(), LIMITS)
        store.put("real", peft_dir)
        store.backend._s3.meta.events.register("before-send.s3.ListObjectsV2", lambda **_: time.sleep(0.2))
        registry = AdapterRegistry(store, max_cpu_adapters=2)

        async def main() -> float:
            lookups = [asyncio.create_task(registry.resolve(f"nowhere-{i}")) for i in range(40)]
            await asyncio.sleep(0.05)  # every lookup has started or is queued
            started = time.perf_counter()
            await asyncio.to_thread(int)  # what a prompt's tokenization waits for
            waited = time.perf_counter() - started
            assert (await registry.resolve("real")).key == "real@1"  # in the index: no lookup
            for lookup in lookups:
                with pytest.raises(AdapterNotFound):
                    await lookup
            return waited

        try:
            assert asyncio.run(main()) < 0.1
        finally:
            registry.close()


def test_a_store_that_stops_answering_holds_up_no_load_of_a_version_kept_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3 store that stops answering holds each load fetching from it for minutes (botocore's 60 s timeouts,
    retried, for each of its calls). Loads shared two workers, so two such loads held every other load behind them,
    those of versions this server keeps on its own disk, which need no call to the store, included."""
    from adapters.s3store import S3Backend

    with s3_server("fetches") as env:
        for key, value in env.items():  # read by boto3 itself, as in production
            monkeypatch.setenv(key, value)
        uploader = AdapterStore(S3Backend("s3://fetches/p", tmp_path / "up", 1 << 30), fingerprint(), LIMITS)
        for i in range(3):
            uploader.put(f"a{i}", make_peft_dir(tmp_path / f"p{i}", seed=i))
        store = AdapterStore(S3Backend("s3://fetches/p", tmp_path / "cache", 1 << 30), fingerprint(), LIMITS)
        store.read_weights(store.resolve("a0"))  # a copy on this server's disk
        answering = threading.Event()

        def hang(request: Any, **_: Any) -> None:
            if "/a1/" in request.url or "/a2/" in request.url:
                answering.wait(30)

        store.backend._s3.meta.events.register("before-send.s3", hang)
        registry = AdapterRegistry(store, max_cpu_adapters=8, pin_memory=False)

        async def main() -> None:
            hung = [asyncio.create_task(registry.acquire(f"a{i}")) for i in (1, 2)]
            await asyncio.sleep(0.2)  # both fetches are waiting on the store
            (await asyncio.wait_for(registry.acquire("a0"), 5)).release()
            answering.set()
            for lease in await asyncio.gather(*hung):
                lease.release()

        try:
            asyncio.run(main())
        finally:
            answering.set()
            registry.close()
