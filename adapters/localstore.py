"""The adapter store in a directory: `<root>/<name>/<version>/` holding the PEFT files and `manifest.json`.

Several server processes may share the directory (one host's disk, NFS, a ReadWriteMany volume):
- a version is staged in a private scratch directory on the same filesystem, fsynced, then renamed into
  place whole, so no process ever sees half a version, and a crash leaves at most a scratch directory;
- a per-name lock file (`flock`) serialises the writers of one name across threads and processes;
- `<root>/.versions/<name>` holds the last number given to the name, written durably before the version
  becomes visible and kept after deletes: a tombstone, so a number is never given twice, across processes,
  deletes and crashes (a crash can burn a number, never reuse one);
- each process's scratch directory holds a lock for as long as the process lives, so a process that starts
  removes only what dead ones left, never an upload in progress elsewhere;
- `<root>/.in-use/<server>.json` is a server's record of the versions it uses, written aside and renamed into place
  (whole); its age is its mtime against that of a file created there now: both the file server's clock on NFS.
"""

import contextlib
import fcntl
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path
from typing import IO

from adapters.errors import AdapterNotFound, AdapterStoreUnavailable
from adapters.manifest import Manifest
from adapters.store import MANIFEST_FILE, Broken, BrokenVersion, Versions

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
_OWNER = ".owner"
_LOCKS = ".locks"
_VERSIONS = ".versions"
_IN_USE = ".in-use"
# a directory changed this recently may change again within the same timestamp tick (coarse on most
# filesystems), unseen by a token taken now: such a name is scanned again at the next refresh
_RACY_NS = 2_000_000_000
# a scratch directory without its owner file is one whose process died between creating it and locking it
# (microseconds), or one left by an older version of the store
_ORPHAN_S = 60.0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove_tree(path: Path) -> None:
    """Remove the directory tree at `path` as far as it can, holding one directory open at a time: down into a
    subdirectory while there is one, then back up through `..`, removing what it emptied. shutil.rmtree recurses a
    frame a level (Python 3.11), so a tree deeper than the recursion limit (a hostile archive's, left by a crash)
    raised RecursionError through `ignore_errors` and kept the server from starting; paths that deep also pass
    PATH_MAX, hence names relative to an open directory."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    names: list[str] = []  # the directories entered below `path`
    while True:
        child = None
        with contextlib.suppress(OSError), os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    child = child or entry.name
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.name, dir_fd=fd)
        if child is not None:
            try:
                below = os.open(child, flags, dir_fd=fd)
            except OSError:  # not ours to enter: leave it
                child = None
            else:
                os.close(fd)
                fd = below
                names.append(child)
                continue
        if not names:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.rmdir(path)
            return
        try:
            parent = os.open("..", flags, dir_fd=fd)
        except OSError:  # the way back up is gone (moved away meanwhile): leave the rest
            os.close(fd)
            return
        os.close(fd)
        fd = parent
        try:
            os.rmdir(names.pop(), dir_fd=fd)
        except OSError:  # something in it stays: stop rather than walk into it again
            os.close(fd)
            return


class ScratchSpace:
    """Private temporary directories under `root`: one `.tmp-*` directory per process, created at first use
    and locked (flock on its owner file) until the process ends; whatever a dead process left is removed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._mu = threading.Lock()
        self._dir: Path | None = None
        self._owner: IO[bytes] | None = None
        self._remove_leftovers()

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        path = Path(tempfile.mkdtemp(dir=self._own_dir()))
        try:
            yield path
        finally:
            remove_tree(path)

    def close(self) -> None:
        with self._mu:
            if self._dir is not None and self._owner is not None:
                remove_tree(self._dir)
                self._owner.close()  # the lock goes with the descriptor
            self._dir = self._owner = None

    def _own_dir(self) -> Path:
        with self._mu:
            if self._dir is None:
                path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
                owner = (path / _OWNER).open("xb")
                fcntl.flock(owner, fcntl.LOCK_EX)
                self._dir, self._owner = path, owner
            return self._dir

    def _remove_leftovers(self) -> None:
        for leftover in self.root.glob(TMP_PREFIX + "*"):
            try:
                owner = os.open(leftover / _OWNER, os.O_RDONLY)
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    if time.time() - leftover.stat().st_mtime > _ORPHAN_S:
                        remove_tree(leftover)
                continue
            except OSError:  # not a directory, or not ours to read: leave it
                continue
            try:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            else:
                remove_tree(leftover)
            finally:
                os.close(owner)


class LocalBackend:
    copies = False

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / _LOCKS).mkdir(exist_ok=True)
            (root / _VERSIONS).mkdir(exist_ok=True)
            (root / _IN_USE).mkdir(exist_ok=True)
        except OSError as exc:  # a file there, or a directory this server may not write: one line, not a traceback
            why = "a file is in the way" if isinstance(exc, FileExistsError) else exc.strerror
            raise AdapterStoreUnavailable(
                f"cannot use the adapter directory {root}: {why} (choose another --adapter-dir)"
            ) from exc
        self._scratch = ScratchSpace(root)

    def names(self) -> dict[str, Hashable | None]:
        now = time.time_ns()
        names: dict[str, Hashable | None] = {}
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile: gone from the index below
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                names[entry.name] = mtime if now - mtime > _RACY_NS else None
        return names

    def scan(self, name: str, known: Mapping[int, Manifest]) -> tuple[Versions, Broken]:
        versions: Versions = {}
        broken: Broken = {}
        try:
            entries = list(os.scandir(self.root / name))
        except (FileNotFoundError, NotADirectoryError):
            return versions, broken
        for entry in entries:
            if not (entry.name.isdigit() and entry.name.isascii()):
                continue
            number = int(entry.name)
            if number in known:
                versions[number] = known[number]
                continue
            try:
                manifest = Manifest.model_validate_json((Path(entry.path) / MANIFEST_FILE).read_bytes())
                if (manifest.name, manifest.version) != (name, number):
                    raise ValueError(f"the manifest says {manifest.key}")
            except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
                log.warning("%s is not served: unreadable manifest (%s)", entry.path, exc)
                broken[number] = BrokenVersion(name, number, f"unreadable manifest: {exc}"[:500])
                continue
            versions[number] = manifest
        return versions, broken

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        # flock excludes other processes and, through separate open file descriptions, other threads
        with (self.root / _LOCKS / f"{name}.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def publish(
        self, name: str, staged: Path, sha256: str, manifest_for: Callable[[int], Manifest], taken: set[int]
    ) -> tuple[Manifest, bool]:
        # the name's lock (flock) excludes every other process's writes since the caller's scan, which found that the
        # newest version does not hold this content: no other can have stored it meanwhile
        # the counter, and every number on disk in case a counter was lost: never a number twice
        number = max([self._last_version(name), *taken]) + 1
        self._save_last_version(name, number)
        manifest = manifest_for(number)
        self._publish(staged, manifest)
        return manifest, True

    def remove(self, name: str, numbers: list[int], whole: bool) -> None:
        # rename out of sight first (atomic), then delete at leisure; a name left without versions goes
        # whole, so that it no longer shows up in listings
        victims = [self.root / name] if whole else [self.root / name / str(n) for n in numbers]
        with self._scratch.scratch() as trash:
            for i, victim in enumerate(victims):
                victim.rename(trash / str(i))
            fsync_dir(victims[0].parent)

    @contextlib.contextmanager
    def open(self, manifest: Manifest, fresh: bool) -> Iterator[Path]:
        path = self.root / manifest.name / str(manifest.version)
        if not path.is_dir():
            raise AdapterNotFound(f"adapter {manifest.key} was deleted")
        yield path

    def local(self, manifest: Manifest) -> bool:
        return True

    def scratch(self) -> contextlib.AbstractContextManager[Path]:
        return self._scratch.scratch()

    def write_in_use(self, server: str, record: bytes) -> None:
        # not synced: a record a crash of this host loses is that of a server gone with it
        tmp = self.root / _IN_USE / f"{TMP_PREFIX}{server}"  # one writer a server: its store's recorder thread
        tmp.unlink(missing_ok=True)
        tmp.write_bytes(record)
        tmp.replace(self.root / _IN_USE / f"{server}.json")

    def in_use_records(self, ttl_s: float, max_bytes: int) -> dict[str, bytes]:
        folder = self.root / _IN_USE
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        try:
            now = os.fstat(fd).st_mtime  # the clock that stamps the records
        finally:
            os.close(fd)
            os.unlink(probe)
        records = {}
        for entry in os.scandir(folder):
            try:
                info = entry.stat(follow_symlinks=False)
                if now - info.st_mtime > ttl_s:
                    # Its server stopped without removing it, crashed, or cannot write. One whose server rewrites it
                    # right now may go with it: the next rewrite, a third of the TTL later, brings it back.
                    os.unlink(entry.path)
                    continue
                if entry.name.startswith(".") or not entry.name.endswith(".json") or not stat.S_ISREG(info.st_mode):
                    continue  # a write in progress (or not a record): not a symbolic link or a FIFO to follow
                with open(os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
                    records[entry.name.removesuffix(".json")] = f.read(max_bytes + 1)
            except FileNotFoundError:
                continue  # replaced or removed meanwhile
            except OSError as exc:  # not ours to read or remove: protects nothing
                log.warning("the in-use record %s is ignored: it protects no version (%s)", entry.path, exc)
        return records

    def delete_in_use(self, server: str) -> None:
        (self.root / _IN_USE / f"{server}.json").unlink(missing_ok=True)

    def close(self) -> None:
        self._scratch.close()

    # -- internals ----------------------------------------------------------------------------------

    def _last_version(self, name: str) -> int:
        try:
            return int((self.root / _VERSIONS / name).read_text())
        except (OSError, ValueError):
            return 0

    def _save_last_version(self, name: str, version: int) -> None:
        """Durably: called before the version becomes visible, so a crash can burn a number, never reuse one."""
        tmp = self.root / _VERSIONS / f"{TMP_PREFIX}{name}"  # the name's lock is held: one writer
        tmp.unlink(missing_ok=True)
        _write_synced(tmp, str(version).encode())
        tmp.replace(self.root / _VERSIONS / name)
        fsync_dir(self.root / _VERSIONS)

    def _publish(self, staged: Path, manifest: Manifest) -> None:
        _write_synced(staged / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        for path in staged.iterdir():
            if path.name != MANIFEST_FILE:
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(staged)
        name_dir = self.root / manifest.name
        new_name = not name_dir.exists()
        name_dir.mkdir(exist_ok=True)
        staged.rename(name_dir / str(manifest.version))
        fsync_dir(name_dir)
        if new_name:
            fsync_dir(self.root)
