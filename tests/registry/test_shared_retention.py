"""Pruning on a store several servers share: a version any of them uses (leased, loading, pinned) stays, as each
keeps a record of what it uses in the store; a record stops counting once it is older than its TTL, by the store's
clock, and one that cannot be read protects nothing."""

import asyncio
import email.utils
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peft_dirs import LIMITS, fingerprint, variants
from s3_server import s3_server

from adapters.errors import AdapterNotFound
from adapters.localstore import LocalBackend
from adapters.store import IN_USE_TTL_S, MAX_IN_USE_BYTES, AdapterStore, InUseRecord
from loraplex.settings import Settings
from server.registry import AdapterRegistry, AdapterState

BUCKET = "loraplex-retention"
_prefixes = itertools.count()


def wait_for(condition: Callable[[], object], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Shared:
    """One store location that several servers open."""

    def open(self, in_use_ttl_s: float = 30.0) -> AdapterStore:
        raise NotImplementedError

    def records(self) -> set[str]:
        """The servers whose in-use records the store holds."""
        raise NotImplementedError

    def put_record(self, server: str, record: bytes) -> None:
        raise NotImplementedError

    def expire(self, reader: AdapterStore) -> None:
        """Have every record there now look older than its TTL to `reader` (their servers died an hour ago)."""
        raise NotImplementedError


class Directory(Shared):
    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, in_use_ttl_s: float = 30.0) -> AdapterStore:
        return AdapterStore(LocalBackend(self.root), fingerprint(), LIMITS, in_use_ttl_s)

    def records(self) -> set[str]:
        return {path.stem for path in (self.root / ".in-use").glob("*.json")}

    def put_record(self, server: str, record: bytes) -> None:
        (self.root / ".in-use" / f"{server}.json").write_bytes(record)

    def expire(self, reader: AdapterStore) -> None:
        for path in (self.root / ".in-use").glob("*.json"):
            then = path.stat().st_mtime - 3600
            os.utime(path, (then, then))


class S3(Shared):
    def __init__(self, cache: Path) -> None:
        self.prefix = f"t{next(_prefixes)}"
        self.cache = cache
        self.opened = itertools.count()

    def open(self, in_use_ttl_s: float = 30.0) -> AdapterStore:
        from adapters.s3store import S3Backend

        backend = S3Backend(f"s3://{BUCKET}/{self.prefix}", self.cache / str(next(self.opened)), 1 << 30)
        return AdapterStore(backend, fingerprint(), LIMITS, in_use_ttl_s)

    @staticmethod
    def client() -> Any:
        import boto3

        return boto3.client("s3")

    def records(self) -> set[str]:
        root = f"{self.prefix}/in-use/"
        listed = self.client().list_objects_v2(Bucket=BUCKET, Prefix=root).get("Contents", [])
        return {obj["Key"].removeprefix(root) for obj in listed}

    def put_record(self, server: str, record: bytes) -> None:
        self.client().put_object(Bucket=BUCKET, Key=f"{self.prefix}/in-use/{server}", Body=record)

    def expire(self, reader: AdapterStore) -> None:
        def an_hour_later(parsed: dict[str, Any], **_: Any) -> None:
            headers = parsed["ResponseMetadata"]["HTTPHeaders"]
            headers["date"] = email.utils.formatdate(time.time() + 3600, usegmt=True)

        reader.backend._s3.meta.events.register("after-call.s3.ListObjectsV2", an_hour_later)


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    with s3_server(BUCKET) as env:
        yield env


@pytest.fixture(params=["directory", "s3"])
def shared(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Shared:
    if request.param == "directory":
        return Directory(tmp_path / "store")
    for key, value in request.getfixturevalue("s3_env").items():  # read by boto3 itself, as in production
        monkeypatch.setenv(key, value)
    return S3(tmp_path / "caches")


def test_a_version_another_server_uses_survives_pruning_until_its_record_expires(
    shared: Shared, tmp_path: Path, peft_dir: Path
) -> None:
    """Server B pinned and leased bot@1 when server A, keeping one version, stored bot@2: A deleted bot@1, B
    dropped its pin at its next refresh, and every later request for bot@1 got 404, on every server."""
    a = AdapterRegistry(shared.open(), max_cpu_adapters=4, pin_memory=False, keep_versions=1)
    b = AdapterRegistry(shared.open(), max_cpu_adapters=4, pin_memory=False)
    dirs = variants(peft_dir, tmp_path / "variants", 3)

    async def scenario() -> None:
        await a.put("bot", dirs[0])
        b.pin("bot@1")  # --preload bot@1
        held = await b.acquire("bot@1")
        wait_for(lambda: shared.records() == {b.store.server})
        await a.put("bot", dirs[1])
        assert [m.version for m in a.store.versions("bot")] == [1, 2]
        b.store.refresh()
        assert b.state("bot@1") == AdapterState.ACTIVE
        held.release()
        (await b.acquire("bot@1")).release()  # a later request there is served it
        b.unpin("bot@1")
        # B's record names bot@1 until its next rewrite: B stops here without removing it, and an hour passes
        shared.expire(a.store)
        await a.put("bot", dirs[2])
        assert [m.version for m in a.store.versions("bot")] == [3]
        assert shared.records() == set()  # the expired record is gone
        b.store.refresh()
        with pytest.raises(AdapterNotFound):
            await b.acquire("bot@1")

    try:
        asyncio.run(scenario())
    finally:
        a.close()
        b.close()


def test_unreadable_records_protect_nothing_and_stop_no_prune(
    shared: Shared, tmp_path: Path, peft_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record is in a shared store, written by any server: one too large or malformed is ignored with a warning,
    neither failing the prune nor keeping what it names; a live record of another server keeps its versions."""
    store = shared.open()
    for path in variants(peft_dir, tmp_path / "variants", 3):
        store.put("bot", path)
    huge = InUseRecord(keys=["bot@1"] + [f"{'x' * 64}@{i}" for i in range(MAX_IN_USE_BYTES // 60)])
    shared.put_record("huge", huge.model_dump_json().encode())
    shared.put_record("cut", b'{"keys": ["bot@1"')
    shared.put_record("typed", b'{"keys": "bot@1"}')
    shared.put_record("other", InUseRecord(keys=["bot@2", "cat@9"]).model_dump_json().encode())
    if isinstance(shared, Directory):  # what a directory may hold besides files: nothing to follow or wait on
        outside = tmp_path / "outside.json"
        outside.write_bytes(InUseRecord(keys=["bot@1"]).model_dump_json().encode())
        (shared.root / ".in-use" / "link.json").symlink_to(outside)
        os.mkfifo(shared.root / ".in-use" / "fifo.json")
        (shared.root / ".in-use" / "dir.json").mkdir()
    with caplog.at_level(logging.WARNING, logger="adapters.store"):
        assert store.prune("bot", 1, lambda keys: set()) == ["bot@1"]
    ignored = [r.getMessage() for r in caplog.records if "is ignored: it protects no version" in r.getMessage()]
    assert len(ignored) == 3 and all(any(f"'{s}'" in m for m in ignored) for s in ("huge", "cut", "typed"))
    assert [m.version for m in store.versions("bot")] == [2, 3]
    store.close()


def test_a_server_writes_its_record_once_for_each_version_newly_in_use(tmp_path: Path, peft_dir: Path) -> None:
    """A request's lease of a version the record names costs no write to the store (nor does its release): only a
    version newly in use does."""
    shared = Directory(tmp_path / "store")
    store = shared.open()
    for path in variants(peft_dir, tmp_path / "variants", 2):
        store.put("bot", path)
    writes: list[bytes | None] = []  # each write to the store: a record, or None for a delete
    write, delete = store.backend.write_in_use, store.backend.delete_in_use

    def written(server: str, record: bytes) -> None:
        write(server, record)
        writes.append(record)

    def deleted(server: str) -> None:
        delete(server)
        writes.append(None)

    store.backend.write_in_use = written  # type: ignore[method-assign]
    store.backend.delete_in_use = deleted  # type: ignore[method-assign]
    registry = AdapterRegistry(store, max_cpu_adapters=4, pin_memory=False)

    async def scenario() -> None:
        (await registry.acquire("bot@1")).release()
        wait_for(lambda: "bot@1" in store._recorded)
        for _ in range(50):
            (await registry.acquire("bot@1")).release()
        await asyncio.sleep(0.7)  # past the gap after a write: one due would be made by now
        assert len(writes) == 1
        held = await registry.acquire("bot@2")
        wait_for(lambda: len(writes) == 2)
        assert writes[-1] is not None and InUseRecord.model_validate_json(writes[-1]).keys == ["bot@2"]
        held.release()

    try:
        asyncio.run(scenario())
    finally:
        registry.close()


def test_the_record_goes_when_nothing_is_in_use_and_when_the_server_stops(tmp_path: Path, peft_dir: Path) -> None:
    shared = Directory(tmp_path / "store")
    store = shared.open(in_use_ttl_s=0.3)  # rewritten every 0.1 s
    store.put("bot", peft_dir)
    registry = AdapterRegistry(store, max_cpu_adapters=4, pin_memory=False)

    async def scenario() -> None:
        held = await registry.acquire("bot")
        wait_for(lambda: shared.records() == {store.server})
        held.release()
        wait_for(lambda: shared.records() == set() and store._recorder is None)  # no writes while idle
        registry.pin("bot@1")
        wait_for(lambda: shared.records() == {store.server})

    try:
        asyncio.run(scenario())
    finally:
        registry.close()
    assert shared.records() == set()


def test_the_stores_default_in_use_ttl_is_the_servers():
    """A store opened by a tool or a test keeps its record as long as a server does by default."""
    assert Settings.model_fields["store_in_use_ttl_s"].default == IN_USE_TTL_S
