"""The adapter store: every version of every adapter, indexed in memory, kept in a backend that several server
processes may share (a directory, adapters.localstore; S3-compatible storage, adapters.s3store).

The backend owns the bytes and the cross-process rules: a version number is allocated once, ever; a version
becomes visible whole or not at all; a deleted number is never given again. This class owns what is the same
for both: validation before anything is stored, an upload of the newest version's content answered with that
version (content of an older version is stored anew, as the newest, so that the name serves it), the in-memory
index that requests read (never the backend), and keeping that index in step with what other
processes did: `refresh()` every few seconds (`start_refresh`), and at once for a name or version that a
lookup misses. Versions are immutable, so a manifest once read is never read again. Every version is checked
against its manifest's sha256 when it is read, so `name@N` is the same adapter on every server, forever.

Pruning through one server must not delete a version another server uses (a request leases it, it is loading, or
it is pinned): each server keeps a record of the versions it uses in the backend (`share_in_use`), and a prune
keeps every version that a record younger than `in_use_ttl_s` names, by the backend's own clock.
"""

import bisect
import logging
import secrets
import shutil
import threading
from collections.abc import Callable, Hashable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from adapters.errors import AdapterError, AdapterLoadFailed, AdapterNotFound, reason
from adapters.fingerprint import BaseFingerprint
from adapters.lora import LoraWeights, lora_weights_from_state
from adapters.manifest import Manifest, adapter_key
from adapters.names import check_name, is_name, parse_ref
from adapters.validate import (
    CONFIG_FILE,
    TRAINING_FILE,
    WEIGHTS_FILE,
    AdapterLimits,
    ValidatedAdapter,
    adapter_files,
    check_config,
    check_weights,
    content_sha256,
    read_config,
    read_safetensors,
    validate_adapter_dir,
)

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
# A manifest is its fingerprint (~100 bytes a targeted module) and training metadata (validate.MAX_TRAINING_BYTES):
# well under 4 MiB. A store read from afar (S3) is read no further than this.
MAX_MANIFEST_BYTES = 16 << 20
# an error names a name's versions one by one up to this many; past it, how many and their range
_NAMED_VERSIONS = 8
# Versions one prune deletes at most: a store of S3 lists each version's objects to delete them, and the name's lock
# is held meanwhile (its uploads and lookups wait); a name far past the cap comes down over several uploads
PRUNE_BATCH = 64
# How long a server's record of the versions it uses counts after it was last written (the default of the server's
# --store-in-use-ttl-s). Rewritten every third of it while any version is in use, so a record expires only once its
# server stopped without removing it, crashed, or could not write to the store for two thirds of it.
IN_USE_TTL_S = 30.0
# A record holds a key (74 characters at most) a version used there: the CPU tier's bound (--max-cpu-adapters, 64 by
# default) keeps it to a few KiB. Another server's record is read no further than this; a larger one is ignored.
MAX_IN_USE_BYTES = 1 << 20
# a new version in use rewrites the record at once, then no sooner than this: a burst of them costs one write
_IN_USE_WRITE_GAP_S = 0.5


@dataclass(frozen=True)
class BrokenVersion:
    """A stored version whose manifest cannot be read: never served, listed and deletable."""

    name: str
    version: int
    error: str

    @property
    def key(self) -> str:
        return adapter_key(self.name, self.version)


Versions = dict[int, Manifest]
Broken = dict[int, BrokenVersion]


class InUseRecord(BaseModel):
    """What a server's record in the store holds: the keys of the versions it uses. Fields added later are ignored."""

    keys: list[str]


class StoreBackend(Protocol):
    """Where versions live. Called from several threads; safety across processes is the backend's."""

    # a backend that keeps local copies of remote versions: a copy that fails its check is fetched again
    copies: bool

    def names(self) -> dict[str, Hashable | None]:
        """Every stored name, with a token that changes whenever its versions do (None: rescan it anyway)."""
        ...

    def scan(self, name: str, known: Mapping[int, Manifest]) -> tuple[Versions, Broken]:
        """The name's versions now; `known` manifests are reused for numbers still there (versions are
        immutable). A name never stored scans empty and leaves nothing behind (no lock, no file)."""
        ...

    def lock(self, name: str) -> AbstractContextManager[None]:
        """Held around every scan whose result updates the index, and around publish and remove."""
        ...

    def publish(
        self, name: str, staged: Path, sha256: str, manifest_for: Callable[[int], Manifest], taken: set[int]
    ) -> tuple[Manifest, bool]:
        """Store the directory `staged` as a new version of `name`, numbered above `taken` and above every
        number ever given to the name, by any process; visible whole, once `manifest_for(number)` is stored. Called
        under `lock(name)` once a scan (which found the versions `taken`) found that the newest version does not hold
        content `sha256`; a backend whose lock does not exclude other processes answers the version another process
        stored of that content meanwhile, a number outside `taken` (created False)."""
        ...

    def remove(self, name: str, numbers: list[int], whole: bool) -> None:
        """Make these versions invisible at once, then delete their bytes (`whole`: the name has no other)."""
        ...

    def open(self, manifest: Manifest, fresh: bool) -> AbstractContextManager[Path]:
        """A local directory holding the version's files while the context lasts (`fresh`: not a copy kept
        before). Raises AdapterNotFound when the version is gone."""
        ...

    def local(self, manifest: Manifest) -> bool:
        """Whether `open` would find the version's files on this server (no call to a remote store)."""
        ...

    def scratch(self) -> AbstractContextManager[Path]:
        """A private temporary directory (on the store's filesystem, for a directory store), removed on exit."""
        ...

    def write_in_use(self, server: str, record: bytes) -> None:
        """Store (or replace, at once and whole) the in-use record of the server `server`."""
        ...

    def in_use_records(self, ttl_s: float, max_bytes: int) -> dict[str, bytes]:
        """Every server's in-use record younger than `ttl_s` seconds by the store's own clock, by server, each read
        no further than `max_bytes` + 1 bytes. Older ones are deleted."""
        ...

    def delete_in_use(self, server: str) -> None: ...

    def close(self) -> None: ...


class AdapterStore:
    def __init__(
        self, backend: StoreBackend, base: BaseFingerprint, limits: AdapterLimits, in_use_ttl_s: float = IN_USE_TTL_S
    ) -> None:
        self.backend = backend
        self.base = base
        self.limits = limits
        self.in_use_ttl_s = in_use_ttl_s
        self.server = secrets.token_hex(8)  # names this server's in-use record: random, one a store opened
        self._used: Callable[[], set[str]] = set
        self._recorded: set[str] = set()  # what the record in the backend surely names
        self._record_kept = False  # whether the backend may hold a record of this server's
        self._record_mu = threading.Lock()  # guards `_recorded` and the two below
        self._record_due = threading.Event()  # a version the record does not name came into use
        self._recorder: threading.Thread | None = None  # keeps the record while any version is in use
        self._mu = threading.Lock()  # guards the in-memory index
        self._index: dict[str, Versions] = {}
        self._broken: dict[str, Broken] = {}
        self._names: list[str] = []  # sorted, for paginated listing; names with a servable version
        # each indexed name's version numbers, ascending: the newest and a page of versions without a pass over them
        # all (a name may have any number of versions, and requests resolve names on the event loop)
        self._numbers: dict[str, list[int]] = {}
        # the same for unreadable versions, for their pages: the names that have some (sorted), each one's numbers
        # (ascending), and how many there are in all
        self._broken_names: list[str] = []
        self._broken_numbers: dict[str, list[int]] = {}
        self._broken_total = 0
        self._tokens: dict[str, Hashable] = {}  # each name's backend token when the index last matched it
        self._listeners: list[Callable[[list[str]], None]] = []
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self.refresh()

    # -- reading the index --------------------------------------------------------------------------

    def resolve(self, ref: str, recheck: bool = True) -> Manifest:
        """'name' -> the newest version's manifest; 'name@N' -> that version's. A name or version this
        server has not seen is looked up in the backend first (`recheck`; blocking: from a worker thread
        where the backend is remote), so what another server stored is found at once."""
        try:
            return self._resolve_indexed(ref)
        except AdapterNotFound:
            if not recheck:
                raise
        self.recheck(parse_ref(ref)[0])
        return self._resolve_indexed(ref)

    def _resolve_indexed(self, ref: str) -> Manifest:
        name, version = parse_ref(ref)
        with self._mu:
            versions = self._index.get(name, {})
            broken = self._broken.get(name, {})
            if version in broken or (version is None and broken and not versions):
                bad = broken[version if version is not None else max(broken)]
                raise AdapterNotFound(
                    f"adapter {bad.key} is stored but unreadable ({bad.error}); delete it "
                    f"(DELETE /v1/adapters/{bad.key}) and upload it again"
                )
            if not versions:
                raise AdapterNotFound(f"no adapter named {name!r}; upload it first (POST /v1/adapters)")
            numbers = self._numbers[name]
            if version is None:
                return versions[numbers[-1]]
            if version not in versions:
                raise AdapterNotFound(f"adapter {name!r} has no version {version}; {_describe(name, numbers)}")
            return versions[version]

    def contains(self, name: str, version: int) -> bool:
        with self._mu:
            return version in self._index.get(name, {})

    def has(self, name: str) -> bool:
        """Whether `name` has a servable version in the index."""
        with self._mu:
            return name in self._index

    def versions(self, name: str) -> list[Manifest]:
        """Every version of `name`, oldest first: work and a list as long as the name has versions (tools and tests;
        an answer to a client takes `version_page`)."""
        with self._mu:
            versions = self._index.get(check_name(name))
            if not versions:
                raise AdapterNotFound(f"no adapter named {name!r}; upload it first (POST /v1/adapters)")
            return [versions[v] for v in self._numbers[name]]

    def version_page(self, name: str, limit: int, after: int | None = None) -> tuple[list[Manifest], int | None, int]:
        """Up to `limit` versions of `name`, newest first, older than version `after` (the previous page's cursor;
        None: from the newest), the next cursor (None: no older version), and how many versions the name has.

        A cursor is a version number: versions stored after the first page are newer than every cursor and never
        show up in later pages, and one deleted meanwhile (the cursor's own included) just leaves them, so paging
        through lists every version kept throughout exactly once. Work: a bisection and the page."""
        with self._mu:
            versions = self._index.get(check_name(name))
            if not versions:
                raise AdapterNotFound(f"no adapter named {name!r}; upload it first (POST /v1/adapters)")
            numbers = self._numbers[name]
            end = len(numbers) if after is None else bisect.bisect_left(numbers, after)
            start = max(0, end - limit)
            page = [versions[v] for v in reversed(numbers[start:end])]
        return page, (page[-1].version if start > 0 and page else None), len(numbers)

    def page(self, limit: int, after: str | None = None) -> tuple[list[Manifest], str | None]:
        """The newest version of up to `limit` names after `after`, in name order, and the next cursor."""
        with self._mu:
            start = bisect.bisect_right(self._names, after) if after else 0
            names = self._names[start : start + limit]
            more = start + limit < len(self._names)
            data = [self._index[n][self._numbers[n][-1]] for n in names]
        return data, (names[-1] if more and names else None)

    def broken(self) -> list[BrokenVersion]:
        """Every stored version that cannot be read, by name and version (tools and tests; an answer to a client takes
        `broken_page`)."""
        with self._mu:
            return [b for name in sorted(self._broken) for _, b in sorted(self._broken[name].items())]

    def broken_page(
        self, limit: int, after: tuple[str, int] | None = None
    ) -> tuple[list[BrokenVersion], str | None, int]:
        """Up to `limit` stored versions that cannot be read, by name and version, after the version `after` (the
        previous page's cursor, as (name, version); None: from the first), the next cursor (a key; None: no more) and
        how many there are. As with `version_page`, a cursor need not be stored still: paging through lists every
        version that stays unreadable throughout exactly once. Work: a bisection a name the page takes from."""
        with self._mu:
            names = self._broken_names
            i = 0 if after is None else bisect.bisect_left(names, after[0])
            page: list[BrokenVersion] = []
            # one past the page: whether there is a next one
            while i < len(names) and len(page) <= limit:
                name = names[i]
                numbers = self._broken_numbers[name]
                start = bisect.bisect_right(numbers, after[1]) if after is not None and name == after[0] else 0
                page += [self._broken[name][n] for n in numbers[start : start + limit + 1 - len(page)]]
                i += 1
            total = self._broken_total
        more = len(page) > limit
        page = page[:limit]
        return page, (page[-1].key if more else None), total

    def __len__(self) -> int:
        with self._mu:
            return len(self._names)

    def read_weights(self, manifest: Manifest) -> LoraWeights:
        """Load a stored version into CPU memory. Its content must hash to the manifest's sha256 (a local
        copy that does not is fetched again, once); it is checked again as an upload is, as versions stored by an
        older server (or altered in storage) may hold what no slot must receive."""
        for fresh in (False, True) if self.backend.copies else (False,):
            try:
                with self.backend.open(manifest, fresh) as path:
                    return self._read(manifest, path)
            except AdapterNotFound:
                self.recheck(manifest.name)  # deleted by another server: gone from the index too
                raise
            except AdapterLoadFailed as exc:
                # deleted by another server while it was read, its files taken from under the read: a 404, not a
                # failure that tells the client to delete it
                self.recheck(manifest.name)
                if not self.contains(manifest.name, manifest.version):
                    raise AdapterNotFound(f"adapter {manifest.key} was deleted") from exc
                if fresh or not self.backend.copies:
                    raise
                log.warning("the local copy of %s failed its check; fetching it again", manifest.key)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def local(self, manifest: Manifest) -> bool:
        """Whether the version can be read without a call to a remote store."""
        return self.backend.local(manifest)

    def _read(self, manifest: Manifest, path: Path) -> LoraWeights:
        try:
            # what is stored may have been replaced since (another writer, a hostile store): it is bounded before it
            # is parsed, as an upload is, and by the size the manifest gives (the bytes that were validated)
            size = sum((path / file).stat().st_size for file in (CONFIG_FILE, WEIGHTS_FILE))
            if size > manifest.size_bytes:
                raise AdapterLoadFailed(f"its files take {size} bytes, over the size its manifest gives")
            state = read_safetensors(path / WEIGHTS_FILE)
            config = read_config(path / CONFIG_FILE)
            weights = lora_weights_from_state(state, config)
        except (OSError, ValueError, AdapterError) as exc:
            log.warning("adapter %s could not be read from %s: %s", manifest.key, path, exc)
            raise AdapterLoadFailed(
                f"adapter {manifest.key} could not be read from storage ({reason(exc)}); delete and upload it again"
            ) from exc
        if content_sha256(config, state) != manifest.sha256:
            log.warning("adapter %s in %s does not match its manifest's sha256", manifest.key, path)
            raise AdapterLoadFailed(
                f"adapter {manifest.key} does not match its manifest's sha256: it was changed after it was stored; "
                "delete it and upload it again"
            )
        # held to what an upload is held to now: a version stored by an older server, or altered in storage along with
        # its manifest, was served as it was (a config declaring another rank than its tensors have, DoRA as a plain
        # LoRA) or failed in the engine's packing with a KeyError (a module the served model does not have)
        check_config(config, self.base)
        check_weights(state, config, self.base, self.limits)
        return weights

    # -- following other processes ------------------------------------------------------------------

    def on_removed(self, listener: Callable[[list[str]], None]) -> None:
        """Call `listener(keys)` (outside every lock) whenever versions leave the index: deleted here, or
        found deleted by another process."""
        self._listeners.append(listener)

    def refresh(self) -> None:
        """Bring the whole index in step with the backend: names whose token changed are scanned again."""
        # What the backend holds under a name no adapter can have is not the store's: no upload made it and no request
        # can name it. A volume's lost+found (readable by root only) failed every scan, and so the server's start.
        tokens = {name: token for name, token in self.backend.names().items() if is_name(name)}
        with self._mu:
            held = self._tokens.keys() | self._index.keys() | self._broken.keys()
        removed: list[str] = []
        for name in sorted(held | tokens.keys()):
            token = tokens.get(name)
            if token is None or self._tokens.get(name) != token:
                removed += self._rescan(name, token)
        self._notify(removed)

    def recheck(self, name: str) -> None:
        """Scan one name again now (a lookup missed it, or its files were gone)."""
        self._notify(self._rescan(check_name(name), None))

    def start_refresh(self, seconds: float) -> None:
        """Refresh every `seconds` in a background thread, until `close()`: how long a version deleted by
        another process may still be served here (added ones are found at the first request for them)."""

        def loop() -> None:
            while not self._stop.wait(seconds):
                try:
                    self.refresh()
                except Exception:  # the store may be briefly unreachable: serve what is known, try again
                    log.warning("refreshing the adapter index failed; retrying in %.1f s", seconds, exc_info=True)

        self._refresher = threading.Thread(target=loop, name="adapter-store-refresh", daemon=True)
        self._refresher.start()

    def close(self) -> None:
        self._stop.set()
        self._record_due.set()
        if self._refresher is not None:
            self._refresher.join()
        with self._record_mu:
            recorder = self._recorder
        if recorder is not None:
            recorder.join()
        if self._record_kept:
            try:
                self.backend.delete_in_use(self.server)
            except Exception:  # it expires in the store after in_use_ttl_s
                log.warning("removing this server's record of the adapter versions it uses failed", exc_info=True)
        self.backend.close()

    # -- versions in use, here and on other servers -------------------------------------------------

    def share_in_use(self, used: Callable[[], set[str]]) -> None:
        """Keep a record of the versions `used()` names (those this server uses) in the backend, so that no prune
        through another server deletes them: written at once when one that it does not name comes into use
        (`note_in_use`), rewritten every third of `in_use_ttl_s` while any is, removed when none is and at
        `close()`. Versions that leave use stay in it until the next rewrite: a release costs no write."""
        self._used = used

    def note_in_use(self, key: str) -> None:
        """The version `key` is in use here now (cheap: a write only when the record does not name it)."""
        with self._record_mu:
            if key in self._recorded or self._stop.is_set():
                return
            self._record_due.set()
            if self._recorder is None:
                self._recorder = threading.Thread(target=self._keep_record, name="adapter-in-use-record", daemon=True)
                self._recorder.start()

    def _keep_record(self) -> None:
        while True:
            due = self._record_due.wait(self.in_use_ttl_s / 3)
            if self._stop.is_set():
                return  # close() removes the record
            self._record_due.clear()
            used = self._used()
            with self._record_mu:
                # while it is rewritten, the record surely names only what the old and the new one both do: a
                # version outside that coming into use meanwhile has it written again
                self._recorded &= used
            try:
                if used:
                    self._record_kept = True
                    self.backend.write_in_use(self.server, InUseRecord(keys=sorted(used)).model_dump_json().encode())
                elif self._record_kept:
                    self.backend.delete_in_use(self.server)
                    self._record_kept = False
            except Exception:  # the store may be briefly unreachable: tried again at the next rewrite
                log.warning("writing this server's record of the adapter versions it uses failed", exc_info=True)
            else:
                with self._record_mu:
                    self._recorded = used
                    if not used and not self._record_due.is_set():
                        self._recorder = None  # nothing in use: no thread, no writes, until a version comes into use
                        return
            if due:
                self._stop.wait(_IN_USE_WRITE_GAP_S)

    def _used_elsewhere(self) -> set[str]:
        """The keys that the live in-use records of the other servers name. A record that cannot be read as one
        (too large, malformed: a broken or hostile writer) protects nothing, with a warning: it must neither stop
        every prune nor make one delete more."""
        keys: set[str] = set()
        for server, record in self.backend.in_use_records(self.in_use_ttl_s, MAX_IN_USE_BYTES).items():
            if server == self.server:
                continue  # this server's own uses are its registry's, as they are now
            try:
                if len(record) > MAX_IN_USE_BYTES:
                    raise ValueError(f"it takes over {MAX_IN_USE_BYTES} bytes")
                keys.update(InUseRecord.model_validate_json(record).keys)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                log.warning("the in-use record of server %r is ignored: it protects no version (%s)", server, exc)
        return keys

    def _rescan(self, name: str, token: Hashable | None) -> list[str]:
        with self._mu:
            held = name in self._index or name in self._broken
            known = dict(self._index.get(name, {}))
        first = self.backend.scan(name, known)
        if not held and first == ({}, {}):  # never stored, nothing to forget: no lock (and no lock file)
            return []
        with self.backend.lock(name):  # so that no older scan overwrites what a writer just indexed
            versions, broken = self.backend.scan(name, {**known, **first[0]})
            return self._set_versions(name, versions, broken, token)

    def _notify(self, removed: list[str]) -> None:
        if removed:
            for listener in self._listeners:
                listener(removed)

    # -- writing ------------------------------------------------------------------------------------

    def scratch(self) -> AbstractContextManager[Path]:
        """A temporary directory for an upload in progress, removed on exit (or when a crash left it)."""
        return self.backend.scratch()

    def put(self, name: str, src: Path) -> tuple[Manifest, bool]:
        """Validate the PEFT directory `src` and store it as the next version of `name`.

        Returns (manifest, created); the content of the newest version (same sha256) returns that version with
        created=False. The content of an older version is stored as a new version: a client that uploads it again
        goes back to it, and was told it was stored while the name kept serving the newer content. A
        `training.json` in `src` marks the adapter as trained and is kept in the manifest.
        """
        check_name(name)
        with self.backend.scratch() as scratch:
            staged = scratch / "adapter"
            staged.mkdir()
            # validate the staged copy, so the bytes checked are the bytes stored
            for path in adapter_files(src):
                shutil.copyfile(path, staged / path.name)
            checked = validate_adapter_dir(staged, self.base, self.limits)
            (staged / TRAINING_FILE).unlink(missing_ok=True)  # kept in the manifest instead
            with self.backend.lock(name):
                # what other processes wrote since the index was last refreshed counts too
                versions, broken = self.backend.scan(name, self._known(name))
                newest = versions[max(versions)] if versions else None
                if newest is not None and newest.sha256 == checked.sha256:
                    removed = self._set_versions(name, versions, broken)
                    created = False
                    manifest = newest
                else:
                    manifest, created = self.backend.publish(
                        name,
                        staged,
                        checked.sha256,
                        lambda number: _manifest(name, number, checked),
                        {*versions, *broken},
                    )
                    versions[manifest.version] = manifest
                    removed = self._set_versions(name, versions, broken)
        self._notify(removed)
        return manifest, created

    def delete(self, ref: str) -> list[str]:
        """Remove `name` (every version, readable or not) or `name@N`; return the removed keys."""
        name, version = parse_ref(ref)
        # no lock taken for names never stored; the index is left alone here (it is changed under the lock only:
        # an upload of the name that this scan missed may be landing in it now)
        if not self._known(name) and self.backend.scan(name, {}) == ({}, {}):
            raise AdapterNotFound(f"no adapter {ref!r} to delete")
        with self.backend.lock(name):
            versions, broken = self.backend.scan(name, self._known(name))
            stored = sorted({*versions, *broken})
            if not stored or (version is not None and version not in stored):
                self._notify(self._set_versions(name, versions, broken))
                raise AdapterNotFound(f"no adapter {ref!r} to delete")
            gone = stored if version is None else [version]
            for number in gone:
                versions.pop(number, None)
                broken.pop(number, None)
            removed = self._set_versions(name, versions, broken)  # new lookups 404 from now on
            self.backend.remove(name, gone, whole=not (versions or broken))
        self._notify(removed)
        return [adapter_key(name, number) for number in gone]

    def prune(
        self, name: str, keep: int, in_use: Callable[[list[str]], set[str]], batch: int = PRUNE_BATCH
    ) -> list[str]:
        """Delete the oldest readable versions of `name` beyond its newest `keep` (at least 1: the newest, which
        `name` serves, always stays), at most `batch` of them, except those whose keys `in_use(keys)` returns (this
        server's) and those the other servers' live in-use records name; return the removed keys. Unreadable
        versions are left to DELETE (they are listed under `broken`).

        A version another server starts using after its record was read here is deleted all the same, as by a
        DELETE: its requests running there finish, later ones get 404."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        with self.backend.lock(name):
            versions, broken = self.backend.scan(name, self._known(name))
            numbers = sorted(versions)
            candidates = [adapter_key(name, number) for number in numbers[: max(0, len(numbers) - keep)]]
            busy = in_use(candidates) | self._used_elsewhere() if candidates else set()
            gone = [number for number, key in zip(numbers, candidates, strict=False) if key not in busy][:batch]
            for number in gone:
                del versions[number]
            removed = self._set_versions(name, versions, broken)  # new lookups 404 from now on
            if gone:
                self.backend.remove(name, gone, whole=False)
        self._notify(removed)
        return [adapter_key(name, number) for number in gone]

    # -- internals ----------------------------------------------------------------------------------

    def _known(self, name: str) -> Versions:
        with self._mu:
            return dict(self._index.get(name, {}))

    def _set_versions(self, name: str, versions: Versions, broken: Broken, token: Hashable | None = None) -> list[str]:
        """Replace the name's entry in the index; return the keys of the readable versions it lost."""
        numbers = sorted(versions)  # outside the lock: requests read the index on the event loop
        broken_numbers = sorted(broken)
        with self._mu:
            if token is None:
                self._tokens.pop(name, None)
            else:
                self._tokens[name] = token
            self._broken_total += len(broken) - len(self._broken.get(name, {}))
            if broken:
                if name not in self._broken:
                    bisect.insort(self._broken_names, name)
                self._broken[name] = broken
                self._broken_numbers[name] = broken_numbers
            elif name in self._broken:
                del self._broken[name]
                del self._broken_numbers[name]
                self._broken_names.remove(name)
            old = self._index.get(name, {})
            if versions:
                self._index[name] = versions
                self._numbers[name] = numbers
                if not old:
                    bisect.insort(self._names, name)
            elif old:
                del self._index[name]
                del self._numbers[name]
                self._names.remove(name)
        return [adapter_key(name, number) for number in sorted(old.keys() - versions.keys())]


def _describe(name: str, numbers: list[int]) -> str:
    """A name's version numbers (ascending) in a message of bounded length."""
    if len(numbers) <= _NAMED_VERSIONS:
        return f"its versions are {numbers}"
    return (
        f"it has {len(numbers)} versions, {numbers[0]} to {numbers[-1]}: GET /v1/adapters/{name} lists them, "
        "newest first"
    )


def _manifest(name: str, version: int, checked: ValidatedAdapter) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        base=checked.base,
        rank=checked.rank,
        alpha=checked.alpha,
        use_rslora=checked.use_rslora,
        target_modules=checked.target_modules,
        size_bytes=checked.size_bytes,
        sha256=checked.sha256,
        created_at=datetime.now(UTC),
        origin="trained" if checked.training is not None else "uploaded",
        training=checked.training,
    )


def open_store(
    location: str | None,
    adapter_dir: Path,
    base: BaseFingerprint,
    limits: AdapterLimits,
    cache_bytes: int,
    in_use_ttl_s: float,
) -> AdapterStore:
    """The store the settings name: `s3://bucket/prefix` (with `adapter_dir` as this server's cache of it,
    `cache_bytes` at most), or the directory `adapter_dir` itself."""
    if location:
        from adapters.s3store import S3Backend  # the s3 extra: imported only when an S3 store is configured

        return AdapterStore(S3Backend(location, adapter_dir, cache_bytes), base, limits, in_use_ttl_s)
    from adapters.localstore import LocalBackend

    return AdapterStore(LocalBackend(adapter_dir), base, limits, in_use_ttl_s)
