"""The on-disk adapter store: `<root>/<name>/<version>/` holding the PEFT files and `manifest.json`.

Writes are atomic: files are staged in a `.tmp-*` directory on the same filesystem, fsynced, then the
directory is renamed into place, so a crash leaves at most a temp directory, removed at the next start.
A per-name file lock serialises writers of one name, across threads and processes. The manifests are
indexed in memory at start; requests never read them from disk. A version whose manifest cannot be read is
never served, but stays listed (`broken()`) and deletable, so an admin can see it and clear it.
"""

import bisect
import fcntl
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.bounds import check_magnitudes, check_tensors
from adapters.errors import AdapterLoadFailed, AdapterNotFound
from adapters.fingerprint import BaseFingerprint
from adapters.lora import LoraWeights, lora_weights_from_state
from adapters.manifest import Manifest, adapter_key, check_name, parse_ref
from adapters.validate import (
    CONFIG_FILE,
    TRAINING_FILE,
    WEIGHTS_FILE,
    AdapterLimits,
    adapter_files,
    read_config,
    validate_adapter_dir,
)

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_TMP_PREFIX = ".tmp-"
_LOCKS = ".locks"
# <root>/.versions/<name>: the last version number given to a name. It outlives the name's directory, so a
# number is never given twice, even after every version was deleted: `name@N` always means one content, in
# clients' records and in the engine's slots alike.
_VERSIONS = ".versions"


def _fsync_dir(path: Path) -> None:
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


def _last_version(root: Path, name: str) -> int:
    try:
        return int((root / _VERSIONS / name).read_text())
    except (OSError, ValueError):
        return 0


def _save_last_version(root: Path, name: str, version: int) -> None:
    """Durably: called before the version becomes visible, so a crash can burn a number, never reuse one."""
    tmp = root / _VERSIONS / f"{_TMP_PREFIX}{name}"
    tmp.unlink(missing_ok=True)
    _write_synced(tmp, str(version).encode())
    tmp.replace(root / _VERSIONS / name)
    _fsync_dir(root / _VERSIONS)


@dataclass(frozen=True)
class BrokenVersion:
    """A stored version directory whose manifest cannot be read: never served, listed and deletable."""

    name: str
    version: int
    error: str

    @property
    def key(self) -> str:
        return adapter_key(self.name, self.version)


class AdapterStore:
    def __init__(self, root: Path, base: BaseFingerprint, limits: AdapterLimits) -> None:
        self.root = root
        self.base = base
        self.limits = limits
        self._mu = threading.Lock()  # guards the in-memory index
        self._index: dict[str, dict[int, Manifest]] = {}
        self._broken: dict[str, dict[int, BrokenVersion]] = {}
        self._names: list[str] = []  # sorted, for paginated listing; names with a servable version
        root.mkdir(parents=True, exist_ok=True)
        (root / _LOCKS).mkdir(exist_ok=True)
        (root / _VERSIONS).mkdir(exist_ok=True)
        for leftover in root.glob(_TMP_PREFIX + "*"):  # what a crash mid-write or mid-delete left
            shutil.rmtree(leftover, ignore_errors=True)
        for name_dir in sorted(root.iterdir()):
            if name_dir.is_dir() and not name_dir.name.startswith("."):
                self._set_versions(name_dir.name, *self._scan(name_dir.name))

    # -- reading the index --------------------------------------------------------------------------

    def resolve(self, ref: str) -> Manifest:
        """'name' -> the newest version's manifest; 'name@N' -> that version's."""
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
            if version is None:
                return versions[max(versions)]
            if version not in versions:
                raise AdapterNotFound(
                    f"adapter {name!r} has no version {version}; its versions are {sorted(versions)}"
                )
            return versions[version]

    def contains(self, name: str, version: int) -> bool:
        with self._mu:
            return version in self._index.get(name, {})

    def versions(self, name: str) -> list[Manifest]:
        with self._mu:
            versions = self._index.get(check_name(name))
            if not versions:
                raise AdapterNotFound(f"no adapter named {name!r}; upload it first (POST /v1/adapters)")
            return [versions[v] for v in sorted(versions)]

    def page(self, limit: int, after: str | None = None) -> tuple[list[Manifest], str | None]:
        """The newest version of up to `limit` names after `after`, in name order, and the next cursor."""
        with self._mu:
            start = bisect.bisect_right(self._names, after) if after else 0
            names = self._names[start : start + limit]
            more = start + limit < len(self._names)
            data = [self._index[n][max(self._index[n])] for n in names]
        return data, (names[-1] if more and names else None)

    def broken(self) -> list[BrokenVersion]:
        """Every stored version that cannot be read, by name and version."""
        with self._mu:
            return [b for name in sorted(self._broken) for _, b in sorted(self._broken[name].items())]

    def __len__(self) -> int:
        with self._mu:
            return len(self._names)

    def read_weights(self, manifest: Manifest) -> LoraWeights:
        """Load a stored version into CPU memory. Validated when stored; its numbers are checked again, as
        versions stored by an older server (or altered on disk) may hold what no slot must receive."""
        path = self._version_dir(manifest.name, manifest.version)
        try:
            state = load_file(path / WEIGHTS_FILE)
            weights = lora_weights_from_state(state, read_config(path / CONFIG_FILE))
        except (OSError, SafetensorError, ValueError) as exc:
            raise AdapterLoadFailed(
                f"adapter {manifest.key} could not be read from {path} ({exc}); delete and upload it again"
            ) from exc
        check_tensors(state)
        check_magnitudes(weights)
        return weights

    # -- writing ------------------------------------------------------------------------------------

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A temporary directory on the store's filesystem, removed on exit (or at the next start)."""
        path = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def put(self, name: str, src: Path) -> tuple[Manifest, bool]:
        """Validate the PEFT directory `src` and store it as the next version of `name`.

        Returns (manifest, created); identical content (same sha256) returns the existing version with
        created=False. A `training.json` in `src` marks the adapter as trained and is kept in the manifest.
        """
        check_name(name)
        with self.scratch() as scratch:
            staged = scratch / "adapter"  # renamed into place whole; the scratch dir is removed after
            staged.mkdir()
            # validate the staged copy, so the bytes checked are the bytes stored
            for path in adapter_files(src):
                shutil.copyfile(path, staged / path.name)
            checked = validate_adapter_dir(staged, self.base, self.limits)
            (staged / TRAINING_FILE).unlink(missing_ok=True)  # kept in the manifest instead
            with self._name_lock(name):
                versions, broken = self._scan(name)  # another process may have written since the index was built
                same = [m for m in versions.values() if m.sha256 == checked.sha256]
                if same:
                    self._set_versions(name, versions, broken)
                    return same[0], False
                name_dir = self.root / name
                # the counter, and every number on disk in case a counter was lost: never a number twice
                version = max([_last_version(self.root, name), *versions, *broken]) + 1
                _save_last_version(self.root, name, version)
                manifest = Manifest(
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
                self._publish(staged, name_dir, manifest)
                versions[version] = manifest
                self._set_versions(name, versions, broken)
                return manifest, True

    def delete(self, ref: str) -> list[str]:
        """Remove `name` (every version, readable or not) or `name@N`; return the removed keys."""
        name, version = parse_ref(ref)
        if not (self.root / name).is_dir():  # checked before locking: no lock file for names never stored
            self._set_versions(name, {}, {})
            raise AdapterNotFound(f"no adapter {ref!r} to delete")
        with self._name_lock(name):
            versions, broken = self._scan(name)
            stored = sorted({*versions, *broken})
            if not stored or (version is not None and version not in stored):
                self._set_versions(name, versions, broken)
                raise AdapterNotFound(f"no adapter {ref!r} to delete")
            removed = stored if version is None else [version]
            for number in removed:
                versions.pop(number, None)
                broken.pop(number, None)
            self._set_versions(name, versions, broken)  # new lookups 404 from now on
            # rename out of sight first (atomic), then delete at leisure; a name left without versions
            # goes whole, so that it no longer shows up at the next start
            victim = self.root / name if not (versions or broken) else self._version_dir(name, removed[0])
            with self.scratch() as trash:
                victim.rename(trash / "removed")
                _fsync_dir(victim.parent)
        return [adapter_key(name, number) for number in removed]

    # -- internals ----------------------------------------------------------------------------------

    def _version_dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    @contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        # flock excludes other processes and, through separate open file descriptions, other threads
        with (self.root / _LOCKS / f"{name}.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _scan(self, name: str) -> tuple[dict[int, Manifest], dict[int, BrokenVersion]]:
        """The name's version directories, by number: readable manifests, and the others."""
        versions: dict[int, Manifest] = {}
        broken: dict[int, BrokenVersion] = {}
        name_dir = self.root / name
        if not name_dir.is_dir():
            return versions, broken
        for version_dir in name_dir.iterdir():
            if not (version_dir.name.isdigit() and version_dir.name.isascii()):
                continue
            number = int(version_dir.name)
            try:
                manifest = Manifest.model_validate_json((version_dir / MANIFEST_FILE).read_bytes())
                if (manifest.name, manifest.version) != (name, number):
                    raise ValueError(f"the manifest says {manifest.key}")
            except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
                log.warning("%s is not served: unreadable manifest (%s)", version_dir, exc)
                broken[number] = BrokenVersion(name, number, f"unreadable manifest: {exc}"[:500])
                continue
            versions[number] = manifest
        return versions, broken

    def _set_versions(self, name: str, versions: dict[int, Manifest], broken: dict[int, BrokenVersion]) -> None:
        with self._mu:
            if broken:
                self._broken[name] = broken
            else:
                self._broken.pop(name, None)
            known = name in self._index
            if versions:
                self._index[name] = versions
                if not known:
                    bisect.insort(self._names, name)
            elif known:
                del self._index[name]
                self._names.remove(name)

    def _publish(self, staged: Path, name_dir: Path, manifest: Manifest) -> None:
        _write_synced(staged / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        for path in staged.iterdir():
            if path.name != MANIFEST_FILE:
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(staged)
        new_name = not name_dir.exists()
        name_dir.mkdir(exist_ok=True)
        staged.rename(self._version_dir(manifest.name, manifest.version))
        _fsync_dir(name_dir)
        if new_name:
            _fsync_dir(self.root)
