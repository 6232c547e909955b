"""Leases cannot hold more adapters in CPU memory than --max-cpu-adapters: every queued request holds one,
so without a bound one client queueing requests for many adapters could hold any number of them."""

import asyncio
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from peft_dirs import new_store

from adapters.errors import TooManyAdaptersLoaded
from server.api.errors import install_error_handlers
from server.registry import AdapterRegistry, AdapterState, Lease

NAMES = [f"a{i}" for i in range(12)]


def full_registry(tmp_path: Path, peft_dir: Path) -> AdapterRegistry:
    store = new_store(tmp_path / "store")
    for name in NAMES:
        store.put(name, peft_dir)
    return AdapterRegistry(store, max_cpu_adapters=2)


async def acquire_all(registry: AdapterRegistry, refs: list[str]) -> tuple[list[Lease], list[BaseException]]:
    results = await asyncio.gather(*(registry.acquire(ref) for ref in refs), return_exceptions=True)
    leases = [r for r in results if isinstance(r, Lease)]
    errors = [r for r in results if isinstance(r, BaseException)]
    return leases, errors


def test_concurrent_leases_of_many_adapters_stay_within_the_cpu_tier(tmp_path: Path, peft_dir: Path) -> None:
    registry = full_registry(tmp_path, peft_dir)

    async def main() -> None:
        # a0 twice: concurrent acquires of one adapter share its load and its place
        leases, errors = await acquire_all(registry, ["a0", "a0", *NAMES[1:]])
        assert sorted(lease.key for lease in leases) == ["a0@1", "a0@1", "a1@1"]
        assert len(errors) == len(NAMES) - 2
        assert all(isinstance(e, TooManyAdaptersLoaded) for e in errors), errors
        assert "--max-cpu-adapters" in str(errors[0])
        assert registry.cpu_adapters == 2
        assert all(registry.state(f"{name}@1") == AdapterState.STORED for name in NAMES[2:])

        # the loaded ones are still leased while the tier is full of leases
        again = await registry.acquire("a1")
        assert again.weights is leases[-1].weights
        again.release()
        for lease in leases[:2]:  # a0's place frees once its last lease goes
            lease.release()
        with await registry.acquire("a2") as lease:
            assert lease.key == "a2@1"
        assert registry.cpu_adapters == 2 and registry.state("a0@1") == AdapterState.STORED
        leases[-1].release()

        # released, the tier serves every adapter in turn
        for name in NAMES:
            (await registry.acquire(name)).release()
        assert registry.cpu_adapters == 2

    asyncio.run(main())
    registry.close()


def test_the_refusal_is_a_429_that_says_to_retry(tmp_path: Path, peft_dir: Path) -> None:
    registry = full_registry(tmp_path, peft_dir)
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/acquire/{ref}")
    async def acquire(ref: str) -> dict[str, str]:
        return {"key": (await registry.acquire(ref)).key}  # held: as a queued request's lease

    with TestClient(app) as client:
        assert client.get("/acquire/a0").status_code == 200
        assert client.get("/acquire/a1").status_code == 200
        refused = client.get("/acquire/a2")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "too_many_adapters_loaded"
        assert "retry" in error["message"] and "--max-cpu-adapters" in error["message"]
        assert client.get("/acquire/a0").status_code == 200
    registry.close()


def test_a_pinned_adapter_keeps_its_place_when_leases_fill_the_rest(tmp_path: Path, peft_dir: Path) -> None:
    store = new_store(tmp_path / "store")
    for name in NAMES[:4]:
        store.put(name, peft_dir)
    registry = AdapterRegistry(store, max_cpu_adapters=3)
    registry.pin("a0")  # not loaded yet: its place is reserved all the same

    async def main() -> None:
        leases, errors = await acquire_all(registry, ["a1", "a2", "a3"])
        assert [lease.key for lease in leases] == ["a1@1", "a2@1"]
        assert [type(e) for e in errors] == [TooManyAdaptersLoaded]
        with await registry.acquire("a0") as pinned:
            assert pinned.key == "a0@1"
        assert registry.cpu_adapters == 3
        for lease in leases:
            lease.release()

    asyncio.run(main())
    registry.close()
