"""The adapter store in S3-compatible object storage (AWS S3, MinIO, Ceph, R2, GCS's S3 API), through boto3.

boto3 because it is the reference client: it reads the endpoint, region and credentials the usual way
(AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, profiles, web identity) with no code here, exposes
conditional writes (`IfNoneMatch`) as a plain parameter, and its calls are synchronous, which suits the store's
worker threads; s3fs adds an async layer and pins botocore, obstore is young and wraps the same calls.

Layout under `s3://bucket/prefix/`:
- `claims/<name>/<N>`: written FIRST, with `If-None-Match: *`: exactly one writer creates it, so exactly one
  writer owns number N (the one whose random token it holds). Never deleted: the tombstone that keeps N from being
  given again after a delete.
- `data/<name>/<N>/<file>`: the PEFT files, written only by N's owner, so nothing overwrites them.
- `manifests/<name>/<N>.json`: written LAST, with `If-None-Match: *`: a version exists once its manifest
  does, so no process sees half a version; a writer that dies before it leaves a burnt number and objects no
  manifest names, never served (deleting the name removes them). A delete of the whole name takes the files of an
  upload in progress through another server too: the uploader checks its files once its manifest is written (and
  stores them again under the next number if they went), the deleter checks for manifests written meanwhile once its
  deletes are done (and withdraws them), so no version stays listed whose files are gone.
- `contents/<name>/<sha256>`: the number that holds, or is being given, that content; written once the version's
  files are up and before its manifest, with `If-None-Match: *`. Servers share no lock, so two that store the same
  content at once both find that the newest version does not hold it: the one that writes this object first stores
  its version, the other answers that version (created: false) once its manifest is there, and deletes its own files
  (its claim stays, a burnt number). One naming a version the uploader's scan found (an older version of that
  content: the content is stored again, as the newest) or a number whose files are gone (deleted, withdrawn) is
  replaced at once; one naming a number whose files are up but whose manifest is still missing after
  _CONTENT_WAIT_S (its writer died between the two writes) is replaced then; replaced with `If-Match` on the ETag
  read, so that one writer takes it over. Kept after deletes, as claims are: one small object per content a name
  was given.
- `in-use/<server>`: a server's record of the versions it uses; its age is its LastModified against the Date of
  the listing's answer, both the store's clock.
What is relied on: that PutObject with `If-None-Match: *` succeeds for one writer of a key and answers 412
to the others (AWS S3 since 2024-08, MinIO, Ceph, R2), that PutObject with `If-Match: <ETag>` replaces the object
only while it has that ETag (AWS S3 since 2024-11, MinIO, R2), and strong read-after-write and list-after-write
consistency (AWS S3 since 2020-12, MinIO). A store that ignores the headers gives no such guarantee.
Left open: a writer stalled for longer than _CONTENT_WAIT_S between its content object and its manifest has its
content object taken over, and its version and the taker's are both stored: one content twice, never half a version.

Each server keeps the versions it serves in a local disk cache (LRU, bounded in bytes) under the adapter
directory; the store checks every copy against the manifest's sha256 when it reads it.
"""

import contextlib
import email.utils
import logging
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters.errors import AdapterLoadFailed, AdapterNotFound, AdapterStoreUnavailable
from adapters.localstore import ScratchSpace
from adapters.manifest import Manifest
from adapters.store import MAX_MANIFEST_BYTES, Broken, BrokenVersion, Versions
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE

try:
    import boto3
    from boto3.exceptions import S3UploadFailedError
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError as exc:  # the s3 extra is not installed
    raise AdapterStoreUnavailable("an s3:// adapter store needs boto3: pip install 'loraplex[s3]'") from exc

log = logging.getLogger(__name__)

_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# 409 ConditionalRequestConflict: another conditional write of the key was in flight; its outcome decides
_CONFLICT_RETRIES = 20
# a version whose files a delete of the whole name took while it was stored is stored again under the next number
_PUBLISH_ATTEMPTS = 3
# How long a content object naming a version whose files are up but whose manifest is not is waited on before it is
# taken over: its writer has two small writes left (this object, then the manifest), which botocore retries for a few
# seconds at most. A wait that long happens only after a writer died between them.
_CONTENT_WAIT_S = 10.0
_CONTENT_POLL_S = 0.1
# a content object holds "<number> <token>": read no further than this
_MAX_CONTENT_BYTES = 64


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


@contextlib.contextmanager
def _answers(what: str) -> Iterator[None]:
    """An unreachable or refusing store becomes a typed 503; a missing object is the caller's business."""
    try:
        yield
    except ClientError as exc:
        if _status(exc) in (404, 409, 412):
            raise
        raise AdapterStoreUnavailable(f"the adapter store refused to {what}: {exc}") from exc
    except (BotoCoreError, S3UploadFailedError) as exc:
        raise AdapterStoreUnavailable(f"the adapter store could not {what}: {exc}") from exc


class S3Backend:
    copies = True

    def __init__(self, url: str, cache_dir: Path, cache_bytes: int) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        # endpoint, region and credentials: botocore reads the AWS_* variables and files itself
        self._s3: Any = boto3.session.Session().client("s3", config=Config(retries={"mode": "standard"}))
        with _answers(f"show the bucket {bucket!r}"):
            self._s3.head_bucket(Bucket=bucket)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._cache = _DiskCache(cache_dir / "s3-cache", cache_bytes)
        self._scratch = ScratchSpace(cache_dir)
        # in this process, index updates of a name take turns (other processes are excluded by the conditional
        # writes). A lock per name, kept while in use (bounded by the names in use, however many are stored): a
        # publish holds it while the files go to the store, which may be slow, and no other name may wait on that.
        self._locks_mu = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # name -> (its lock, holders and waiters)

    # -- keys ---------------------------------------------------------------------------------------

    def _manifest_key(self, name: str, number: int) -> str:
        return f"{self.prefix}manifests/{name}/{number}.json"

    def _claim_key(self, name: str, number: int) -> str:
        return f"{self.prefix}claims/{name}/{number}"

    def _data_key(self, name: str, number: int, file: str) -> str:
        return f"{self.prefix}data/{name}/{number}/{file}"

    def _content_key(self, name: str, sha256: str) -> str:
        return f"{self.prefix}contents/{name}/{sha256}"

    def _in_use_key(self, server: str) -> str:
        return f"{self.prefix}in-use/{server}"

    def _pages(self, prefix: str) -> list[dict[str, Any]]:
        with _answers(f"list {prefix}"):
            return list(self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix))

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        return [obj for page in self._pages(prefix) for obj in page.get("Contents", [])]

    def _numbered(self, prefix: str, suffix: str = "") -> dict[int, dict[str, Any]]:
        """The objects `<prefix><N><suffix>`, by N."""
        found = {}
        for obj in self._list(prefix):
            stem = obj["Key"][len(prefix) :].removesuffix(suffix)
            if stem.isdigit() and stem.isascii() and obj["Key"].endswith(suffix):
                found[int(stem)] = obj
        return found

    def _put_new(self, key: str, body: bytes, etag: str | None = None) -> bool:
        """Create `key` unless it exists (`etag`: replace it unless it no longer has that ETag): True if this call
        wrote it. `body` is this write's own, no other writer's: botocore sends a write again when its answer does not
        come, and a conditional write that was done is then answered 412, as if another writer had written the key
        first; what the key holds tells whose it is."""
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        for _ in range(_CONFLICT_RETRIES):
            try:
                with _answers(f"write {key}"):
                    self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)
                return True
            except ClientError as exc:
                if _status(exc) == 412 or (_status(exc) == 404 and etag is not None):
                    held = self._read_start(key, len(body) + 1)
                    if held is not None:
                        return held == body
                    if etag is not None:
                        return False  # deleted since it was read: the caller reads it again
                    continue  # deleted since (the name was): created anew
                if _status(exc) != 409:
                    raise AdapterStoreUnavailable(f"the adapter store refused to write {key}: {exc}") from exc
                time.sleep(0.05)
        raise AdapterStoreUnavailable(f"the adapter store kept answering 409 to a write of {key}; retry")

    def _read_start(self, key: str, size: int) -> bytes | None:
        """The first `size` bytes of `key` (a store's object is read no further than needed), None if it is gone."""
        try:
            with _answers(f"read {key}"):
                return self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read(size)
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise

    # -- the backend --------------------------------------------------------------------------------

    def names(self) -> dict[str, Hashable | None]:
        root = f"{self.prefix}manifests/"
        versions: dict[str, list[tuple[str, str]]] = {}
        for obj in self._list(root):
            name, _, leaf = obj["Key"][len(root) :].partition("/")
            versions.setdefault(name, []).append((leaf, obj.get("ETag", "")))
        return {name: tuple(sorted(leaves)) for name, leaves in versions.items()}

    def scan(self, name: str, known: Mapping[int, Manifest]) -> tuple[Versions, Broken]:
        versions: Versions = {}
        broken: Broken = {}
        for number in self._numbered(f"{self.prefix}manifests/{name}/", ".json"):
            if number in known:
                versions[number] = known[number]
                continue
            try:
                manifest = self._read_manifest(name, number)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                log.warning("%s@%d is not served: unreadable manifest (%s)", name, number, exc)
                broken[number] = BrokenVersion(name, number, f"unreadable manifest: {exc}"[:500])
                continue
            if manifest is not None:  # else deleted since the listing
                versions[number] = manifest
        return versions, broken

    def _read_manifest(self, name: str, number: int) -> Manifest | None:
        """The manifest of `name@number`, None if there is none; ValueError if it cannot be read as one."""
        try:
            with _answers(f"read the manifest of {name}@{number}"):
                body = self._s3.get_object(Bucket=self.bucket, Key=self._manifest_key(name, number))["Body"]
                text = body.read(MAX_MANIFEST_BYTES + 1)  # what the store sends is read only so far
        except ClientError as exc:
            if _status(exc) != 404:
                raise
            return None
        if len(text) > MAX_MANIFEST_BYTES:
            raise ValueError(f"it takes over {MAX_MANIFEST_BYTES} bytes, more than a manifest can")
        manifest = Manifest.model_validate_json(text)
        if (manifest.name, manifest.version) != (name, number):
            raise ValueError(f"the manifest says {manifest.key}")
        return manifest

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with self._locks_mu:
            lock, users = self._locks.get(name, (threading.Lock(), 0))
            self._locks[name] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._locks_mu:
                users = self._locks[name][1] - 1
                if users:
                    self._locks[name] = (lock, users)
                else:
                    del self._locks[name]

    def publish(
        self, name: str, staged: Path, sha256: str, manifest_for: Callable[[int], Manifest], taken: set[int]
    ) -> tuple[Manifest, bool]:
        number = max([0, *self._numbered(f"{self.prefix}claims/{name}/"), *taken])
        for _ in range(_PUBLISH_ATTEMPTS):
            number += 1
            # each claim holds a token of its own, so that a claim sent again knows itself (see _put_new)
            while not self._put_new(self._claim_key(name, number), secrets.token_hex(16).encode()):
                number += 1  # another server owns it: the next one
            data = [self._data_key(name, number, file) for file in _FILES]
            for file, key in zip(_FILES, data, strict=True):
                with _answers(f"write {name}@{number}"):
                    self._s3.upload_file(str(staged / file), self.bucket, key)
            stored = self._take_content(name, number, sha256, taken)
            if stored is not None:  # another server stored this content meanwhile: that version is this upload's
                self._delete(data, f"withdraw {name}@{number}")
                return stored, False
            manifest = manifest_for(number)
            if not self._put_new(self._manifest_key(name, number), manifest.model_dump_json(indent=2).encode()):
                raise AdapterStoreUnavailable(
                    f"the manifest of {manifest.key} exists though this server owns the number: the store does not "
                    "honour If-None-Match (conditional writes), which a shared S3 store needs"
                )
            # A delete of the whole name through another server takes every file under the name, this version's
            # too when it listed them before this manifest was written: the version would be listed and fail every
            # load. Checked once the manifest is written, as remove() checks for manifests written meanwhile once its
            # files are deleted: whichever of the two checks last sees the other's work.
            if all(self._exists(key) for key in data):
                self._cache.adopt(manifest, staged)  # what was just stored is what this server will serve
                return manifest, True
            log.warning("the files of %s were deleted while it was stored (the name was deleted); storing it again "
                        "under the next number", manifest.key)  # fmt: skip
            # the content object names this number, whose files are gone: the next attempt takes it over at once
            self._delete([self._manifest_key(name, number)], f"withdraw {manifest.key}")
            self._delete(data, f"withdraw {manifest.key}")
        raise AdapterStoreUnavailable(
            f"adapter {name!r} was deleted through another server each of the {_PUBLISH_ATTEMPTS} times this upload "
            "was stored; upload it again"
        )

    def _take_content(self, name: str, number: int, sha256: str, taken: set[int]) -> Manifest | None:
        """Make the content object of `sha256` name `number` (whose files are up): None once it does; or the version
        of that content another server stored meanwhile (a number outside `taken`, the versions the upload's scan
        found), once its manifest is there."""
        key = self._content_key(name, sha256)
        body = f"{number} {secrets.token_hex(16)}".encode()
        if self._put_new(key, body):
            return None
        waited: tuple[str, float] | None = None  # the ETag of the object waited on, and until when
        give_up = time.monotonic() + 4 * _CONTENT_WAIT_S  # however often other writers replace it
        while time.monotonic() < give_up:
            held = self._read_content(key)
            if held is None:  # removed by hand since: created anew
                if self._put_new(key, body):
                    return None
                continue
            other, etag = held
            if waited is None or waited[0] != etag:
                waited = (etag, time.monotonic() + _CONTENT_WAIT_S)
            # not what this store writes, or a version the upload's scan found, which holds this content but is not
            # the newest (the upload is stored to make it the newest again): replaced
            stale = other is None or other in taken
            if not stale:
                stored = self._stored(name, other, sha256)
                if stored is not None:
                    return stored
                # its files are written before it: gone, they were deleted (or withdrawn) and nobody is storing it
                stale = not all(self._exists(self._data_key(name, other, file)) for file in _FILES)
            if stale or time.monotonic() >= waited[1]:
                if self._put_new(key, body, etag):
                    return None
                continue  # another writer replaced it first: read it again
            time.sleep(_CONTENT_POLL_S)
        raise AdapterStoreUnavailable(
            f"the adapter store's record of which version of {name!r} holds this content kept changing; retry"
        )

    def _read_content(self, key: str) -> tuple[int | None, str] | None:
        """The number a content object names (None: it names none) and its ETag; None if there is no such object."""
        try:
            with _answers(f"read {key}"):
                answer = self._s3.get_object(Bucket=self.bucket, Key=key)
                head = answer["Body"].read(_MAX_CONTENT_BYTES).partition(b" ")[0]
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise
        return (int(head) if head.isdigit() else None), answer["ETag"]

    def _stored(self, name: str, number: int, sha256: str) -> Manifest | None:
        """The manifest of `name@number` if it is there and holds content `sha256`."""
        try:
            manifest = self._read_manifest(name, number)
        except ValueError:  # unreadable: listed as broken, and no version of this content
            return None
        return manifest if manifest is not None and manifest.sha256 == sha256 else None

    def remove(self, name: str, numbers: list[int], whole: bool) -> None:
        self._delete([self._manifest_key(name, n) for n in numbers], f"delete {name}")  # invisible
        # then the bytes; `whole` also takes what writers that died before their manifest left behind
        # (claims stay: they are the tombstones)
        data = [
            obj["Key"]
            for obj in (
                self._list(f"{self.prefix}data/{name}/")
                if whole
                else [obj for n in numbers for obj in self._list(f"{self.prefix}data/{name}/{n}/")]
            )
        ]
        self._delete(data, f"delete {name}")
        if whole:
            # the files of an upload in progress through another server went too: a manifest it wrote since this
            # delete's scan names files no longer there (publish checks for them after writing it; this checks last
            # otherwise), and is withdrawn
            root = f"{self.prefix}data/{name}/"
            emptied = {key[len(root) :].partition("/")[0] for key in data}
            late = [n for n in self._numbered(f"{self.prefix}manifests/{name}/", ".json") if str(n) in emptied]
            self._delete([self._manifest_key(name, n) for n in late if n not in numbers], f"delete {name}")
        for number in numbers:
            self._cache.drop(name, number)

    def _delete(self, keys: list[str], what: str) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            with _answers(what):
                self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    @contextlib.contextmanager
    def open(self, manifest: Manifest, fresh: bool) -> Iterator[Path]:
        with self._cache.hold(manifest, fresh, self._download) as path:
            yield path

    def _download(self, manifest: Manifest, dest: Path) -> None:
        try:
            with _answers(f"read {manifest.key}"):
                self._s3.head_object(Bucket=self.bucket, Key=self._manifest_key(manifest.name, manifest.version))
                keys = [self._data_key(manifest.name, manifest.version, file) for file in _FILES]
                # the files are those that were validated, whose size the manifest gives: larger ones are not
                # fetched (onto this server's disk) to be refused once there
                size = sum(self._s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"] for key in keys)
                if size > manifest.size_bytes:
                    raise AdapterLoadFailed(
                        f"adapter {manifest.key}'s files in the store take {size} bytes, over the size its manifest "
                        "gives: they were changed after it was stored; delete it and upload it again"
                    )
                for file, key in zip(_FILES, keys, strict=True):
                    self._s3.download_file(self.bucket, key, str(dest / file))
        except ClientError as exc:
            if _status(exc) != 404:
                raise
            if not self._exists(self._manifest_key(manifest.name, manifest.version)):
                raise AdapterNotFound(f"adapter {manifest.key} was deleted") from exc
            raise AdapterLoadFailed(
                f"adapter {manifest.key} is missing files in the store ({exc}); delete it and upload it again"
            ) from exc

    def _exists(self, key: str) -> bool:
        try:
            with _answers(f"read {key}"):
                self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def local(self, manifest: Manifest) -> bool:
        return self._cache.holds((manifest.name, manifest.version))

    def scratch(self) -> contextlib.AbstractContextManager[Path]:
        return self._scratch.scratch()

    def write_in_use(self, server: str, record: bytes) -> None:
        with _answers("write this server's in-use record"):
            self._s3.put_object(Bucket=self.bucket, Key=self._in_use_key(server), Body=record)

    def in_use_records(self, ttl_s: float, max_bytes: int) -> dict[str, bytes]:
        root = self._in_use_key("")
        live: list[str] = []
        expired: list[str] = []
        for page in self._pages(root):
            date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            now = email.utils.parsedate_to_datetime(date) if date else datetime.now(UTC)  # the store's clock
            for obj in page.get("Contents", []):
                old = (now - obj["LastModified"]).total_seconds() > ttl_s
                (expired if old else live).append(obj["Key"])
        # Their servers stopped without removing them, crashed, or cannot write. One whose server rewrites it right
        # now may go with it: the next rewrite, a third of the TTL later, brings it back.
        self._delete(expired, "delete expired in-use records")
        records = {}
        for key in live:
            record = self._read_start(key, max_bytes + 1)
            if record is not None:  # else removed since the listing
                records[key[len(root) :]] = record
        return records

    def delete_in_use(self, server: str) -> None:
        self._delete([self._in_use_key(server)], "delete this server's in-use record")

    def close(self) -> None:
        self._scratch.close()


class _DiskCache:
    """Local copies of versions, `<root>/<name>/<N>/`, least recently used dropped beyond `max_bytes`; a copy
    being read is never dropped. Copies arrive whole (downloaded aside, then renamed), and survive restarts."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._mu = threading.Lock()
        self._sizes: OrderedDict[tuple[str, int], int] = OrderedDict()  # least recently used first
        self._held: dict[tuple[str, int], int] = {}
        self._incoming = ScratchSpace(self._ensure(root))
        found = []
        for version_dir in root.glob("*/*"):
            if (
                not version_dir.parent.name.startswith(".")
                and version_dir.name.isdigit()
                and (version_dir / WEIGHTS_FILE).exists()
            ):
                found.append((version_dir.stat().st_mtime, (version_dir.parent.name, int(version_dir.name))))
        for _, key in sorted(found):
            self._sizes[key] = self._size(self._dir(key))

    @staticmethod
    def _ensure(root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _dir(self, key: tuple[str, int]) -> Path:
        return self.root / key[0] / str(key[1])

    @staticmethod
    def _size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.iterdir())

    @contextlib.contextmanager
    def hold(self, manifest: Manifest, fresh: bool, download: Callable[[Manifest, Path], None]) -> Iterator[Path]:
        key = (manifest.name, manifest.version)
        path = self._dir(key)
        with self._mu:
            self._held[key] = self._held.get(key, 0) + 1
            cached = key in self._sizes and not fresh
            if cached:
                self._sizes.move_to_end(key)
        try:
            if not cached:
                with self._incoming.scratch() as incoming:
                    download(manifest, incoming)
                    self._install(key, incoming)
            os.utime(path)  # the order of use, for the next start
            yield path
        finally:
            with self._mu:
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key]
                dropped = key not in self._sizes and key not in self._held  # deleted while being read
            if dropped:
                self._remove(path)
            self._evict()

    def holds(self, key: tuple[str, int]) -> bool:
        with self._mu:
            return key in self._sizes

    def adopt(self, manifest: Manifest, staged: Path) -> None:
        """Keep a copy of a version this server just stored (the upload's own files)."""
        with self._incoming.scratch() as incoming:
            for file in _FILES:
                shutil.copyfile(staged / file, incoming / file)
            self._install((manifest.name, manifest.version), incoming)
        self._evict()

    def drop(self, name: str, number: int) -> None:
        with self._mu:
            self._sizes.pop((name, number), None)
            if (name, number) in self._held:
                return  # being read: removed when the last reader is done
        self._remove(self._dir((name, number)))

    def _install(self, key: tuple[str, int], incoming: Path) -> None:
        path = self._dir(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._mu:
            if path.exists():  # a copy that failed its check, or one a concurrent load brought
                self._remove(path)
            incoming.rename(path)
            self._sizes[key] = self._size(path)
            self._sizes.move_to_end(key)

    def _evict(self) -> None:
        with self._mu:
            total = sum(self._sizes.values())
            victims = []
            for key, size in list(self._sizes.items()):
                if total <= self.max_bytes:
                    break
                if key in self._held:
                    continue
                del self._sizes[key]
                total -= size
                victims.append(self._dir(key))
        for victim in victims:
            self._remove(victim)

    def _remove(self, path: Path) -> None:
        # renamed aside first, so a reader never finds half a copy under its name
        with contextlib.suppress(FileNotFoundError), self._incoming.scratch() as trash:
            path.rename(trash / "gone")
