"""The S3 backend against an S3-compatible server on loopback: versions, numbers owned by conditional writes,
deletes and tombstones, the local cache checked against the manifest, and two stores as two servers."""

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peft_dirs import LIMITS, fingerprint, make_peft_dir, variants
from s3_server import s3_server
from test_parse_bounds import empty_tensors, weights_bytes

from adapters.errors import AdapterLoadFailed, AdapterNotFound, AdapterStoreUnavailable
from adapters.store import AdapterStore

BUCKET = "loraplex-test"
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    with s3_server(BUCKET) as env:
        yield env


@pytest.fixture
def url(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in s3_env.items():  # read by boto3 itself, as in production
        monkeypatch.setenv(key, value)
    return f"s3://{BUCKET}/t{next(_prefixes)}"


def s3_store(url: str, cache: Path, cache_bytes: int = 1 << 30) -> AdapterStore:
    from adapters.s3store import S3Backend

    return AdapterStore(S3Backend(url, cache, cache_bytes), fingerprint(), LIMITS)


def client():
    import boto3

    return boto3.client("s3")


def test_versions_deletes_and_numbers_never_reissued(url: str, tmp_path: Path, peft_dir: Path) -> None:
    store = s3_store(url, tmp_path / "cache")
    first, created = store.put("bot", peft_dir)
    assert created and first.key == "bot@1" and store.put("bot", peft_dir) == (first, False)
    second = store.put("bot", make_peft_dir(tmp_path / "v2", seed=1))[0]
    assert second.key == "bot@2" and store.resolve("bot") == second
    assert store.read_weights(first).rank == 4
    assert store.delete("bot") == ["bot@1", "bot@2"]
    with pytest.raises(AdapterNotFound):
        store.resolve("bot")
    reopened = s3_store(url, tmp_path / "cache2")
    assert len(reopened) == 0
    assert reopened.put("bot", peft_dir)[0].version == 3  # the claims are tombstones
    keys = {
        o["Key"].removeprefix(url.split("/", 3)[3] + "/")
        for o in client().list_objects_v2(Bucket=BUCKET, Prefix=url.split("/", 3)[3] + "/")["Contents"]
    }
    assert keys == {
        "claims/bot/1",
        "claims/bot/2",
        "claims/bot/3",
        f"contents/bot/{first.sha256}",  # kept, as claims are; it names 3 now
        f"contents/bot/{second.sha256}",
        "manifests/bot/3.json",
        "data/bot/3/adapter_config.json",
        "data/bot/3/adapter_model.safetensors",
    }


def test_a_number_another_server_owns_is_skipped(url: str, tmp_path: Path, peft_dir: Path) -> None:
    store = s3_store(url, tmp_path / "cache")
    prefix = url.split("/", 3)[3]
    # another server claimed 1 and died before its manifest: a burnt number, and objects nobody serves
    client().put_object(Bucket=BUCKET, Key=f"{prefix}/claims/bot/1", Body=b"")
    client().put_object(Bucket=BUCKET, Key=f"{prefix}/data/bot/1/adapter_model.safetensors", Body=b"half")
    assert store.put("bot", peft_dir)[0].version == 2
    assert [m.version for m in s3_store(url, tmp_path / "c2").versions("bot")] == [2]
    store.delete("bot")  # whole: the dead writer's objects go too
    listed = client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/data/")
    assert "Contents" not in listed


def test_racing_servers_get_distinct_numbers(url: str, tmp_path: Path) -> None:
    """Two stores (two servers: no lock in common, only the conditional writes) race on one name."""
    stores = [s3_store(url, tmp_path / "a"), s3_store(url, tmp_path / "b")]
    dirs = [make_peft_dir(tmp_path / f"p{i}", seed=i) for i in range(6)]
    results: list = []
    barrier = threading.Barrier(6)

    def upload(i: int) -> None:
        barrier.wait()
        results.append(stores[i % 2].put("race", dirs[i]))

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(m.version for m, created in results if created) == [1, 2, 3, 4, 5, 6]
    fresh = s3_store(url, tmp_path / "c")
    assert {m.sha256 for m in fresh.versions("race")} == {m.sha256 for m, _ in results}
    for manifest in fresh.versions("race"):
        fresh.read_weights(manifest)


def put_once_both_scanned(stores: list[AdapterStore], name: str, src: Path) -> list:
    """Each store's put of `src` as `name`, both scans done before either claims a number (two servers sharing no
    lock), as each put's (manifest, created)."""
    scanned = threading.Barrier(2, timeout=10)
    claiming: set[int] = set()

    def claim_once_both_scanned(request: Any, **_: Any) -> None:
        if f"/claims/{name}/" in request.url and threading.get_ident() not in claiming:
            claiming.add(threading.get_ident())
            scanned.wait()

    for store in stores:
        store.backend._s3.meta.events.register("before-send.s3.PutObject", claim_once_both_scanned)
    results: list = []
    threads = [threading.Thread(target=lambda s=store: results.append(s.put(name, src))) for store in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores:
        store.backend._s3.meta.events.unregister("before-send.s3.PutObject", claim_once_both_scanned)
    return results


def test_two_servers_storing_the_same_content_at_once_store_one_version(
    url: str, tmp_path: Path, peft_dir: Path
) -> None:
    """An identical upload is answered with the version that holds its content, found by a scan under the name's lock;
    two servers share no lock, and both scanned before either stored: the content was stored twice, as two versions.
    Now the content object, written with If-None-Match, tells the second which version holds it."""
    stores = [s3_store(url, tmp_path / "a"), s3_store(url, tmp_path / "b")]
    results = put_once_both_scanned(stores, "bot", peft_dir)
    assert sorted(created for _, created in results) == [False, True]
    manifest = results[0][0]
    assert results[1][0] == manifest
    fresh = s3_store(url, tmp_path / "fresh")
    assert fresh.versions("bot") == [manifest] and fresh.read_weights(manifest).rank == 4
    prefix = url.split("/", 3)[3]
    data = client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/data/")["Contents"]
    assert {o["Key"].split("/")[-2] for o in data} == {str(manifest.version)}  # the other's files went
    assert all(store.resolve("bot") == manifest for store in stores)


def test_the_content_of_an_older_version_is_stored_as_the_newest(
    url: str, tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A, B, then A again: the content object of A names version 1, which the upload's scan found, not the newest;
    it was answered as "already stored" (bot@1) while `bot` kept serving B. It is stored again, as the newest, at
    once; through two servers at once, once."""
    import adapters.s3store

    monkeypatch.setattr(adapters.s3store, "_CONTENT_WAIT_S", 30.0)
    stores = [s3_store(url, tmp_path / "a"), s3_store(url, tmp_path / "b")]
    a, _ = stores[0].put("bot", peft_dir)
    b_dir = make_peft_dir(tmp_path / "b-dir", seed=1)
    b, _ = stores[0].put("bot", b_dir)
    started = time.perf_counter()
    back, created = stores[0].put("bot", peft_dir)
    assert created and back.key == "bot@3" and back.sha256 == a.sha256 and time.perf_counter() - started < 5
    assert stores[1].resolve("bot") == back and stores[1].put("bot", peft_dir) == (back, False)
    stores[0].put("bot", b_dir)  # B again, as bot@4; then A again through both servers at once
    results = put_once_both_scanned(stores, "bot", peft_dir)
    assert sorted(created for _, created in results) == [False, True] and results[0][0] == results[1][0]
    fresh = s3_store(url, tmp_path / "fresh")
    assert fresh.resolve("bot") == results[0][0] and results[0][0].sha256 == a.sha256
    assert [m.sha256 for m in fresh.versions("bot")] == [a.sha256, b.sha256, a.sha256, b.sha256, a.sha256]


def test_content_left_by_a_writer_that_died_before_its_manifest_is_stored_after_a_wait(
    url: str, tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapters.s3store

    monkeypatch.setattr(adapters.s3store, "_CONTENT_WAIT_S", 0.5)
    dying = s3_store(url, tmp_path / "dying")

    def die_at_manifest(request: Any, **_: Any) -> None:
        if "/manifests/" in request.url:
            raise RuntimeError("the server died")

    dying.backend._s3.meta.events.register("before-send.s3.PutObject", die_at_manifest)
    with pytest.raises(RuntimeError):
        dying.put("bot", peft_dir)
    store = s3_store(url, tmp_path / "cache")
    started = time.perf_counter()
    manifest, created = store.put("bot", peft_dir)
    assert created and manifest.key == "bot@2" and time.perf_counter() - started >= 0.5
    assert s3_store(url, tmp_path / "fresh").versions("bot") == [manifest]


def test_content_whose_version_was_deleted_is_stored_again_at_once(
    url: str, tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapters.s3store

    monkeypatch.setattr(adapters.s3store, "_CONTENT_WAIT_S", 30.0)
    store = s3_store(url, tmp_path / "cache")
    store.put("bot", peft_dir)
    store.put("bot", make_peft_dir(tmp_path / "v2", seed=1))
    store.delete("bot@1")
    started = time.perf_counter()
    manifest, created = s3_store(url, tmp_path / "other").put("bot", peft_dir)
    assert created and manifest.key == "bot@3" and time.perf_counter() - started < 5


@pytest.mark.parametrize("checks_last", ["uploader", "deleter"])
def test_a_delete_of_the_name_racing_an_upload_elsewhere_leaves_no_version_without_its_files(
    url: str, tmp_path: Path, peft_dir: Path, checks_last: str
) -> None:
    """A delete of a whole name takes every file under it, an upload's in progress through another server (no lock
    in common) too: it listed them before that upload's manifest was written, which then named files no longer
    there. That version was listed by every server and failed every load with 500 adapter_load_failed, but on the
    uploading server, which served its own copy. Whichever of the two checks last now sees the other's work: the
    uploader stores the version again under the next number, or the deleter withdraws it."""
    uploader, deleter = s3_store(url, tmp_path / "up"), s3_store(url, tmp_path / "del")
    uploader.put("bot", peft_dir)
    deleter.resolve("bot")
    at_manifest, go = threading.Event(), threading.Event()

    def hold_manifest(request: Any, **_: Any) -> None:  # the files are up; the manifest waits for the delete
        if request.url.endswith("/manifests/bot/2.json"):
            at_manifest.set()
            assert go.wait(10)

    def hold_file_deletes(request: Any, **_: Any) -> None:  # the files are listed; their delete waits for the upload
        if b"/data/bot/" in request.body:
            go.set()
            assert uploaded.wait(10)

    uploader.backend._s3.meta.events.register("before-send.s3.PutObject", hold_manifest)
    uploaded = threading.Event()
    if checks_last == "deleter":
        deleter.backend._s3.meta.events.register("before-send.s3.DeleteObjects", hold_file_deletes)
    new = make_peft_dir(tmp_path / "new", seed=1)
    stored: list = []
    upload = threading.Thread(target=lambda: (stored.append(uploader.put("bot", new)), uploaded.set()))
    upload.start()
    assert at_manifest.wait(10)
    delete = threading.Thread(target=deleter.delete, args=("bot",))
    delete.start()
    if checks_last == "uploader":
        delete.join()
        go.set()
    upload.join()
    delete.join()

    fresh = s3_store(url, tmp_path / "fresh")
    assert fresh.broken() == []
    if checks_last == "uploader":  # stored again, after the delete
        ((manifest, created),) = stored
        assert created and manifest.version == 3
        assert [m.key for m in fresh.versions("bot")] == ["bot@3"]
        assert fresh.read_weights(fresh.resolve("bot")).rank == 4
    else:  # stored, then deleted
        with pytest.raises(AdapterNotFound):
            fresh.resolve("bot")


def test_another_server_is_followed(url: str, tmp_path: Path, peft_dir: Path) -> None:
    here, there = s3_store(url, tmp_path / "a"), s3_store(url, tmp_path / "b")
    removed: list[list[str]] = []
    here.on_removed(removed.append)
    there.put("bot", peft_dir)
    manifest = here.resolve("bot")  # not seen here: found at once
    assert here.read_weights(manifest).rank == 4
    there.delete("bot")
    here.refresh()
    assert removed == [["bot@1"]] and len(here) == 0
    with pytest.raises(AdapterNotFound):
        here.resolve("bot@1")


def test_the_cache_is_bounded_and_checked(url: str, tmp_path: Path, peft_dir: Path) -> None:
    cache = tmp_path / "cache"
    dirs = [make_peft_dir(tmp_path / f"p{i}", seed=i) for i in range(3)]
    size = sum(f.stat().st_size for f in dirs[0].iterdir() if f.suffix in (".json", ".safetensors"))
    uploader = s3_store(url, tmp_path / "uploader")
    for i, d in enumerate(dirs):
        uploader.put(f"a{i}", d)
    store = s3_store(url, cache, cache_bytes=2 * size + size // 2)  # room for two
    for i in range(3):
        store.read_weights(store.resolve(f"a{i}"))
    cached = sorted(p.parent.name for p in (cache / "s3-cache").glob("*/1"))
    assert cached == ["a1", "a2"]
    # a damaged copy is noticed by its sha256 and fetched again
    weights = cache / "s3-cache" / "a2" / "1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert store.read_weights(store.resolve("a2")).rank == 4
    # a changed object in the bucket is refused, whatever the cache holds
    prefix = url.split("/", 3)[3]
    client().put_object(
        Bucket=BUCKET,
        Key=f"{prefix}/data/a0/1/adapter_model.safetensors",
        Body=(dirs[1] / "adapter_model.safetensors").read_bytes(),
    )
    with pytest.raises(AdapterLoadFailed, match="sha256"):
        store.read_weights(store.resolve("a0"))


@pytest.mark.parametrize(("swap", "match"), [("header", "header takes"), ("size", "the size its manifest gives")])
def test_what_a_hostile_store_serves_costs_no_more_to_refuse_than_an_upload(
    url: str, tmp_path: Path, peft_dir: Path, swap: str, match: str
) -> None:
    """A version's files are checked against its sha256 once read; what the store served in their place was
    parsed whole first: 150,000 empty tensors in a header (16 MB) took 4 s of safetensors' work holding the GIL,
    which every stream waits on, and a file of any size was read into memory. They are bounded as an upload's
    are, and by the size the manifest gives, before they are parsed."""
    s3_store(url, tmp_path / "uploader").put("bot", peft_dir)
    prefix = url.split("/", 3)[3]
    real = (peft_dir / "adapter_model.safetensors").read_bytes()
    body = {"header": weights_bytes(empty_tensors(150_000)), "size": real + b"\0" * 64}[swap]
    client().put_object(Bucket=BUCKET, Key=f"{prefix}/data/bot/1/adapter_model.safetensors", Body=body)
    if swap == "header":  # and a manifest that gives room for it
        key = f"{prefix}/manifests/bot/1.json"
        manifest = json.loads(client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
        client().put_object(Bucket=BUCKET, Key=key, Body=json.dumps({**manifest, "size_bytes": 1 << 30}).encode())
    store = s3_store(url, tmp_path / "cache")  # another server: no copy of its own
    started = time.perf_counter()
    with pytest.raises(AdapterLoadFailed, match=match):
        store.read_weights(store.resolve("bot"))
    assert time.perf_counter() - started < 1


def test_a_slow_upload_holds_up_no_other_name(url: str, tmp_path: Path, peft_dir: Path) -> None:
    """A server's index updates of a name take turns under a lock; the S3 store striped them over 64 locks by
    hash(name), and a publish holds its lock while the files go to the store, so an upload to a slow store held
    up every name of its stripe: lookups of them (requests for adapters another server stored) waited for it."""
    other = next(f"other-{i}" for i in itertools.count() if hash(f"other-{i}") % 64 == hash("slow") % 64)
    store = s3_store(url, tmp_path / "cache")
    s3_store(url, tmp_path / "elsewhere").put(other, peft_dir)  # another server's: not in this one's index yet
    sending = threading.Event()

    def slow_data(request: Any, **_: Any) -> None:
        if "/data/slow/" in request.url:
            sending.set()
            time.sleep(1.0)

    store.backend._s3.meta.events.register("before-send.s3.PutObject", slow_data)
    upload = threading.Thread(target=store.put, args=("slow", peft_dir))
    upload.start()
    assert sending.wait(10)
    started = time.perf_counter()
    assert store.resolve(other).key == f"{other}@1"  # looked up in the store
    waited = time.perf_counter() - started
    upload.join()
    assert waited < 0.5 and store.resolve("slow").key == "slow@1"
    assert store.backend._locks == {}  # a lock lives while its name is in use


def test_a_hostile_store_is_read_no_further_than_a_version_can_take(url: str, tmp_path: Path, peft_dir: Path) -> None:
    """What the store sends was read whole: a manifest of any size into memory (a valid one of 20 MiB was even
    served), and files of any size onto this server's disk, to be refused once there. Now a manifest is read up to
    its bound and the files are not fetched when the store lists them larger than the manifest gives."""
    uploader = s3_store(url, tmp_path / "uploader")
    uploader.put("bot", peft_dir)
    uploader.put("big", make_peft_dir(tmp_path / "big", seed=1))
    prefix = url.split("/", 3)[3]
    key = f"{prefix}/manifests/big/1.json"
    manifest = json.loads(client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    bloated = {**manifest, "training": {"notes": "n" * (20 << 20)}}
    client().put_object(Bucket=BUCKET, Key=key, Body=json.dumps(bloated).encode())
    real = (peft_dir / "adapter_model.safetensors").read_bytes()
    client().put_object(
        Bucket=BUCKET, Key=f"{prefix}/data/bot/1/adapter_model.safetensors", Body=real + b"\0" * (8 << 20)
    )

    store = s3_store(url, tmp_path / "cache")  # another server: no copy of its own
    (broken,) = store.broken()
    assert broken.key == "big@1" and "more than a manifest can" in broken.error
    fetched: list[str] = []
    store.backend._s3.meta.events.register("before-send.s3.GetObject", lambda request, **_: fetched.append(request.url))
    with pytest.raises(AdapterLoadFailed, match="over the size its manifest gives"):
        store.read_weights(store.resolve("bot"))
    assert not [u for u in fetched if "/data/bot/" in u]


@pytest.mark.parametrize("written", ["claims", "manifests"])
def test_a_conditional_write_botocore_sends_again_after_it_was_done_is_this_servers(
    url: str, tmp_path: Path, peft_dir: Path, written: str
) -> None:
    """botocore sends a write again when its answer does not come (a timeout, a reset connection, a proxy's 5xx); a
    conditional write that was done is then answered 412, as if another server had written the key first. A manifest
    so written failed the upload with 503 ("the store does not honour If-None-Match") though the version was stored,
    and a claim gave up its number for the next one. What the key holds now tells whose the write was."""
    store = s3_store(url, tmp_path / "cache")
    sent_again: list[str] = []

    def answer_lost(response: Any, attempts: int, request_dict: dict[str, Any], **_: Any) -> int | None:
        # the store did the write and answered it; botocore is told to send it again, as when the answer is lost
        if f"/{written}/bot/1" in request_dict["url"] and attempts == 1 and response[0].status_code == 200:
            sent_again.append(request_dict["url"])
            return 0  # the delay before the next attempt
        return None

    store.backend._s3.meta.events.register("needs-retry.s3.PutObject", answer_lost)
    manifest, created = store.put("bot", peft_dir)
    assert sent_again and created and manifest.key == "bot@1"
    fresh = s3_store(url, tmp_path / "fresh")
    assert fresh.resolve("bot") == manifest and fresh.read_weights(manifest).rank == 4


def test_a_manifest_another_writer_put_under_this_servers_number_is_refused(
    url: str, tmp_path: Path, peft_dir: Path
) -> None:
    """The manifest key of a number this server claimed holds another writer's manifest when the store ignores
    conditional writes: that is still said, and nothing of it is taken for this server's version."""
    store = s3_store(url, tmp_path / "cache")
    prefix = url.split("/", 3)[3]

    def written_first(request: Any, **_: Any) -> None:
        if request.url.endswith("/manifests/bot/1.json"):
            client().put_object(Bucket=BUCKET, Key=f"{prefix}/manifests/bot/1.json", Body=b"{}")

    store.backend._s3.meta.events.register("before-send.s3.PutObject", written_first)
    with pytest.raises(AdapterStoreUnavailable, match="does not honour If-None-Match"):
        store.put("bot", peft_dir)


def test_pruning_deletes_the_old_versions_objects_and_keeps_their_tombstones(
    url: str, tmp_path: Path, peft_dir: Path
) -> None:
    store = s3_store(url, tmp_path / "cache")
    for path in variants(peft_dir, tmp_path / "variants", 4):
        store.put("bot", path)
    assert store.prune("bot", 2, lambda keys: {"bot@1"}) == ["bot@2"]
    assert [m.version for m in s3_store(url, tmp_path / "c2").versions("bot")] == [1, 3, 4]
    prefix = url.split("/", 3)[3]
    keys = {
        o["Key"].removeprefix(prefix + "/") for o in client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    }
    assert not {k for k in keys if k.startswith(("manifests/bot/2", "data/bot/2/"))} and "claims/bot/2" in keys
    assert store.put("bot", make_peft_dir(tmp_path / "new", seed=7))[0].version == 5  # a number never twice
