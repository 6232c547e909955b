"""The on-disk store: versions, idempotent uploads, restart, concurrent writers, crashes mid-write."""

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft_dirs import make_peft_dir, new_store

from adapters.errors import (
    AdapterNotFound,
    IncompatibleAdapter,
    InvalidAdapterName,
    InvalidAdapterWeights,
    UnsupportedAdapter,
)

REPO = Path(__file__).resolve().parents[2]


def test_versions_and_idempotent_uploads(tmp_path: Path, peft_dir: Path) -> None:
    store = new_store(tmp_path / "store")
    first, created = store.put("bot", peft_dir)
    again, created_again = store.put("bot", peft_dir)
    assert created and not created_again and again == first
    second, created = store.put("bot", make_peft_dir(tmp_path / "v2", seed=1))
    assert created and second.version == 2 and second.sha256 != first.sha256
    assert store.resolve("bot") == second and store.resolve("bot@1") == first
    assert [m.version for m in store.versions("bot")] == [1, 2]
    # the same content under another name is another adapter
    assert store.put("other", peft_dir)[0].key == "other@1"
    with pytest.raises(AdapterNotFound, match=r"versions are \[1, 2\]"):
        store.resolve("bot@3")
    with pytest.raises(InvalidAdapterName):
        store.resolve("bot@x")


def test_the_content_of_an_older_version_is_stored_as_the_newest(tmp_path: Path, peft_dir: Path) -> None:
    """Pushing A, B, then A again (to go back to A) was answered "already stored as bot@1", while `bot` kept serving
    B: only the newest version's content is already stored; an older version's is stored again, as the newest."""
    store = new_store(tmp_path / "store")
    a, _ = store.put("bot", peft_dir)
    b, _ = store.put("bot", make_peft_dir(tmp_path / "b", seed=1))
    back, created = store.put("bot", peft_dir)
    assert created and back.version == 3 and back.sha256 == a.sha256
    assert store.resolve("bot") == back and new_store(tmp_path / "store").resolve("bot") == back
    assert store.put("bot", peft_dir) == (back, False)
    assert [m.sha256 for m in store.versions("bot")] == [a.sha256, b.sha256, a.sha256]


def test_restart_finds_everything(tmp_path: Path, peft_dir: Path) -> None:
    store = new_store(tmp_path / "store")
    made = [store.put(f"a{i}", make_peft_dir(tmp_path / f"p{i}", seed=i))[0] for i in range(3)]
    made.append(store.put("a0", make_peft_dir(tmp_path / "p9", seed=9))[0])
    reopened = new_store(tmp_path / "store")
    assert len(reopened) == 3
    assert [reopened.resolve(m.key) for m in made] == made
    weights = reopened.read_weights(made[0])
    assert weights.rank == 4 and len(weights.modules) == 4


def test_delete_versions_and_numbers_are_not_reused(tmp_path: Path, peft_dir: Path) -> None:
    store = new_store(tmp_path / "store")
    store.put("bot", peft_dir)
    store.put("bot", make_peft_dir(tmp_path / "v2", seed=1))
    assert store.delete("bot@2") == ["bot@2"]
    assert store.resolve("bot").version == 1
    # the newest version was deleted: the next upload still gets a new number
    assert store.put("bot", make_peft_dir(tmp_path / "v3", seed=2))[0].version == 3
    assert store.delete("bot") == ["bot@1", "bot@3"]
    with pytest.raises(AdapterNotFound):
        store.resolve("bot")
    with pytest.raises(AdapterNotFound):
        store.delete("bot")
    assert len(new_store(tmp_path / "store")) == 0
    assert not (tmp_path / "store" / "bot").exists()
    # even a name deleted whole never gives a number twice, also after a restart: bot@1 meant other content
    reborn = new_store(tmp_path / "store").put("bot", make_peft_dir(tmp_path / "v4", seed=3))[0]
    assert reborn.version == 4


def test_pagination(tmp_path: Path, peft_dir: Path) -> None:
    store = new_store(tmp_path / "store")
    for name in ["c", "a", "b", "e", "d"]:
        store.put(name, peft_dir)
    page, cursor = store.page(2)
    assert [m.name for m in page] == ["a", "b"] and cursor == "b"
    page, cursor = store.page(2, cursor)
    assert [m.name for m in page] == ["c", "d"] and cursor == "d"
    page, cursor = store.page(2, cursor)
    assert [m.name for m in page] == ["e"] and cursor is None


def test_concurrent_uploads_of_one_name(tmp_path: Path) -> None:
    """Eight writers (two store instances, as two processes would have) race on one name: every distinct
    content gets its own version, a duplicate of the newest version collapses into it (of an older one, it is stored
    again, as the newest), nothing is lost or half-written."""
    dirs = [make_peft_dir(tmp_path / f"p{i}", seed=i) for i in range(6)]
    stores = [new_store(tmp_path / "store"), new_store(tmp_path / "store")]
    results: list = []
    barrier = threading.Barrier(8)

    def upload(i: int) -> None:
        barrier.wait()
        results.append(stores[i % 2].put("race", dirs[i % 6]))

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reopened = new_store(tmp_path / "store")
    stored = reopened.versions("race")
    assert sorted(m.version for m, created in results if created) == [m.version for m in stored]
    assert [m.version for m in stored] == list(range(1, len(stored) + 1)) and len(stored) in (6, 7, 8)
    assert len({m.sha256 for m in stored}) == 6 and all(m in stored for m, _ in results)
    assert all(older.sha256 != newer.sha256 for older, newer in itertools.pairwise(stored))
    for manifest in stored:
        reopened.read_weights(manifest)


_CRASHING_WRITER = """
import sys, time
sys.path[:0] = sys.argv[1:4]
from pathlib import Path
from adapters.localstore import LocalBackend
from adapters.store import AdapterStore
from peft_dirs import LIMITS, fingerprint

class Crashing(LocalBackend):
    def _publish(self, staged, manifest):
        (staged / "manifest.json").write_text(manifest.model_dump_json()[:20])  # half a manifest
        print("staged", flush=True)
        time.sleep(60)

AdapterStore(Crashing(Path(sys.argv[4])), fingerprint(), LIMITS).put("bot", Path(sys.argv[5]))
"""


def test_a_leftover_deeper_than_the_recursion_limit_is_removed_at_start(tmp_path: Path) -> None:
    # a dead process's scratch tree 2,000 levels deep (paths of 4,000 characters): removing it recursively raised
    # RecursionError through ignore_errors, and every start of a server on the store failed
    root = tmp_path / "store"
    new_store(root)
    leftover = root / ".tmp-dead"
    leftover.mkdir()
    fd = os.open(leftover, os.O_RDONLY)
    for _ in range(2000):  # names relative to the last level: no path passes PATH_MAX while it is made
        os.mkdir("a", dir_fd=fd)
        below = os.open("a", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(fd)
    old = time.time() - 10 * 24 * 3600
    os.utime(leftover, (old, old))  # no owner file: an orphan once old enough
    new_store(root)
    assert not leftover.exists()


def test_kill_during_upload_leaves_nothing_visible(tmp_path: Path, peft_dir: Path) -> None:
    root = tmp_path / "store"
    new_store(root).put("bot", peft_dir)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CRASHING_WRITER,
            str(REPO),
            str(REPO / "tests"),
            str(Path(__file__).parent),
            str(root),
            str(make_peft_dir(tmp_path / "v2", seed=1)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "staged\n"
        assert list(root.glob(".tmp-*"))  # mid-write: the staged copy exists
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    store = new_store(root)
    assert [m.version for m in store.versions("bot")] == [1]
    assert not list(root.glob(".tmp-*"))  # cleaned at start
    # the number the killed writer reserved is spent: it may have been seen, so it is never given again
    assert store.put("bot", tmp_path / "v2")[0].version == 3


# -- issue 14: unreadable versions stay manageable, numbers are durable, no stray lock files ---------------


def test_unreadable_versions_are_listed_and_deletable(tmp_path: Path, peft_dir: Path) -> None:
    root = tmp_path / "store"
    store = new_store(root)
    store.put("bot", peft_dir)
    store.put("bot", make_peft_dir(tmp_path / "v2", seed=1))
    store.put("ghost", peft_dir)
    (root / "bot" / "2" / "manifest.json").write_text('{"alpha": NaN')  # what a NaN upload used to leave
    (root / "ghost" / "1" / "manifest.json").unlink()
    store = new_store(root)
    assert [(b.key, "manifest" in b.error) for b in store.broken()] == [("bot@2", True), ("ghost@1", True)]
    assert store.resolve("bot").version == 1  # the readable version is still served
    with pytest.raises(AdapterNotFound, match="unreadable"):
        store.resolve("ghost")
    assert store.delete("bot@2") == ["bot@2"]
    assert store.delete("ghost") == ["ghost@1"]
    assert store.broken() == [] and not (root / "ghost").exists()
    assert [m.key for m in new_store(root).versions("bot")] == ["bot@1"]
    # a broken version's number is never given again either
    assert new_store(root).put("bot", make_peft_dir(tmp_path / "v3", seed=2))[0].version == 3


def test_a_directory_beside_the_adapters_that_no_adapter_can_be_named_is_left_alone(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter directory on a volume of its own has the filesystem's lost+found, readable by root only: every
    refresh scanned it as an adapter name, and its PermissionError failed the server's start (the image runs as uid
    10001). Nothing under a name no adapter can have is the store's."""
    root = tmp_path / "store"
    new_store(root).put("bot", peft_dir)
    lost = root / "lost+found"
    (lost / "1").mkdir(parents=True)  # what fsck put back
    lost.chmod(0)
    scandir = os.scandir

    def as_a_user(path: Any) -> Any:  # root reads it anyway
        if isinstance(path, str | os.PathLike) and Path(path) == lost:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", as_a_user)
    store = new_store(root)
    assert [m.key for m in store.versions("bot")] == ["bot@1"]
    assert store.broken() == []


_KILLED_AFTER_RENAME = """
import os, signal, sys
sys.path[:0] = sys.argv[1:4]
from pathlib import Path
from peft_dirs import new_store

root = Path(sys.argv[4])
rename = Path.rename

def rename_then_die(self, target):
    moved = rename(self, target)
    if Path(target) == root / "bot" / "1":  # the version is visible: die before anything else happens
        os.kill(os.getpid(), signal.SIGKILL)
    return moved

Path.rename = rename_then_die
new_store(root).put("bot", Path(sys.argv[5]))
"""


def test_kill_right_after_the_rename_never_reissues_a_number(tmp_path: Path, peft_dir: Path) -> None:
    root = tmp_path / "store"
    new_store(root)
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_AFTER_RENAME,
            str(REPO),
            str(REPO / "tests"),
            str(Path(__file__).parent),
            str(root),
            str(peft_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = new_store(root)
    assert [m.key for m in store.versions("bot")] == ["bot@1"]
    store.delete("bot")
    assert store.put("bot", make_peft_dir(tmp_path / "v2", seed=1))[0].version == 2


def test_the_counter_is_only_one_of_the_sources_of_numbers(tmp_path: Path, peft_dir: Path) -> None:
    root = tmp_path / "store"
    new_store(root).put("bot", peft_dir)
    (root / ".versions" / "bot").unlink()  # a counter lost (or an older store without one)
    assert new_store(root).put("bot", make_peft_dir(tmp_path / "v2", seed=1))[0].version == 2


def test_deleting_unknown_names_leaves_no_files(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = new_store(root)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for i in range(20):
        with pytest.raises(AdapterNotFound):
            store.delete(f"never-{i}")
        with pytest.raises(AdapterNotFound):
            store.delete(f"never-{i}@3")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_a_delete_that_finds_nothing_spares_an_upload_landing_meanwhile(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete of a name with nothing stored scans without the lock; an upload of that name landing right after
    the scan stays stored, listed and servable (the delete had set the name's index to empty and told the
    listeners its version was removed)."""
    store = new_store(tmp_path / "store")
    removed: list[list[str]] = []
    store.on_removed(removed.append)
    scan = store.backend.scan
    uploads = []

    def scan_then_upload(name, known):  # type: ignore[no-untyped-def]
        found = scan(name, known)
        if not uploads:  # the delete's scan (not the upload's own): an upload lands just after it
            uploads.append("x")
            store.put("x", peft_dir)
        return found

    monkeypatch.setattr(store.backend, "scan", scan_then_upload)
    with pytest.raises(AdapterNotFound):
        store.delete("x")
    assert store.resolve("x", recheck=False).key == "x@1" and [m.key for m in store.versions("x")] == ["x@1"]
    assert removed == []


# -- issue 17: several processes on one directory ---------------------------------------------------------


def test_another_store_on_the_directory_is_followed(tmp_path: Path, peft_dir: Path) -> None:
    """Two stores on one directory, as two servers: a miss looks in the directory at once; a refresh finds
    newer versions and deletes, and tells the listeners what went."""
    root = tmp_path / "store"
    here, there = new_store(root), new_store(root)
    removed: list[list[str]] = []
    here.on_removed(removed.append)
    there.put("bot", peft_dir)
    assert here.resolve("bot").key == "bot@1"  # never seen here: found at once
    with pytest.raises(AdapterNotFound):
        here.resolve("bot@2", recheck=False)
    there.put("bot", make_peft_dir(tmp_path / "v2", seed=1))
    assert here.resolve("bot").key == "bot@1"  # 'name' follows at the next refresh
    assert here.resolve("bot@2").key == "bot@2"  # a version not seen here is looked up at once
    there.delete("bot@1")
    here.refresh()
    assert removed == [["bot@1"]] and [m.key for m in here.versions("bot")] == ["bot@2"]
    there.delete("bot")
    with pytest.raises(AdapterNotFound):
        here.read_weights(here.resolve("bot@2", recheck=False))  # its files are gone: re-checked, 404
    assert removed == [["bot@1"], ["bot@2"]] and len(here) == 0


def _torch_mapping(path: Path) -> Any:
    # safetensors' own open succeeded; torch, mapping the file it opens again, found it gone
    raise RuntimeError(f"unable to open file <{path}> in read-only mode: No such file or directory (2)")


@pytest.mark.parametrize("when", ["before its files are opened", "as safetensors opens them", "as torch maps them"])
def test_a_version_deleted_elsewhere_while_it_is_read_is_not_found(
    tmp_path: Path, peft_dir: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Another server deleting the version while this one read it took its files from under the read: the load
    failed with 500 adapter_load_failed telling the client to delete it and upload it again, or with torch's error
    naming the server's path, where the version was just gone (a few in a hundred reads of a name that another
    process uploads and deletes in a loop)."""
    import adapters.store
    import adapters.validate

    root = tmp_path / "store"
    here, there = new_store(root), new_store(root)
    there.put("bot", peft_dir)
    manifest = here.resolve("bot")
    module, function, read = {
        "before its files are opened": (adapters.store, "read_safetensors", adapters.validate.read_safetensors),
        "as safetensors opens them": (adapters.validate, "load_file", adapters.validate.load_file),
        "as torch maps them": (adapters.validate, "load_file", _torch_mapping),
    }[when]

    def deleted_first(path: Path) -> Any:
        there.delete("bot")
        return read(path)

    monkeypatch.setattr(module, function, deleted_first)
    with pytest.raises(AdapterNotFound, match="was deleted") as raised:
        here.read_weights(manifest)
    assert str(tmp_path) not in str(raised.value)
    assert len(here) == 0


def test_numbers_are_never_reissued_across_stores(tmp_path: Path, peft_dir: Path) -> None:
    root = tmp_path / "store"
    here, there = new_store(root), new_store(root)
    assert here.put("bot", peft_dir)[0].version == 1
    there.delete("bot")  # whole, through the other process; `here` still believes in bot@1
    assert here.put("bot", make_peft_dir(tmp_path / "v2", seed=1))[0].version == 2
    assert there.put("bot", peft_dir)[0].version == 3  # the content of the deleted bot@1: a new number


def test_a_starting_store_spares_the_uploads_of_live_ones(tmp_path: Path, peft_dir: Path) -> None:
    root = tmp_path / "store"
    with new_store(root).scratch() as busy:
        (busy / "half-an-upload").write_bytes(b"x")
        new_store(root)  # another process starting: only what dead processes left is removed
        assert (busy / "half-an-upload").exists()


def test_content_that_does_not_match_its_manifest_is_refused(tmp_path: Path, peft_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    from adapters.errors import AdapterLoadFailed

    store = new_store(tmp_path / "store")
    manifest = store.put("bot", peft_dir)[0]
    weights = tmp_path / "store" / "bot" / "1" / "adapter_model.safetensors"
    state = load_file(weights)
    next(iter(state.values()))[0, 0] += 0.01  # still a valid adapter, not the stored one
    save_file(state, weights)
    with pytest.raises(AdapterLoadFailed, match="sha256"):
        store.read_weights(manifest)


def _twice_the_rank(state: dict, config: dict) -> None:
    for key, tensor in list(state.items()):
        state[key] = torch.cat([tensor, tensor], dim=0 if "lora_A" in key else 1)


def _another_module(state: dict, config: dict) -> None:
    for key in list(state):
        state[key.replace("q_proj", "o_proj")] = state.pop(key)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (_twice_the_rank, InvalidAdapterWeights, "the config declares 4"),
        (lambda state, config: config.update(use_dora=True), UnsupportedAdapter, "DoRA"),
        (_another_module, InvalidAdapterWeights, "target_modules does not name it"),
        (
            lambda state, config: config.update(target_modules=r".*\.v_proj"),
            InvalidAdapterWeights,
            "the target_modules regex does not match its name",
        ),
        (
            lambda state, config: config.update(target_modules=r".*\.(q_proj|v_proj|mlp)"),
            IncompatibleAdapter,
            "the target_modules regex matches 'model.layers.0.mlp'",
        ),
        (lambda state, config: config.update(init_lora_weights="pissa"), UnsupportedAdapter, "with PiSSA"),
        (
            lambda state, config: config.update(init_lora_weights=False, target_modules=["q_proj", "v_proj", "k_proj"]),
            InvalidAdapterWeights,
            r"'model.layers.0.self_attn.k_proj' \(and 1 more\), which the config targets",
        ),
    ],
    ids=[
        "rank-not-declared",
        "dora",
        "untargeted-module",
        "untargeted-by-regex",
        "not-linear-by-regex",
        "base-changing-init",
        "random-init-without-tensors",
    ],
)
def test_a_version_altered_with_its_manifest_is_held_to_the_uploads_checks(
    tmp_path: Path, peft_dir: Path, change: Callable[[dict, dict], None], error: type, match: str
) -> None:
    """A version stored by an older server, or altered in storage with a manifest to match (its sha256), had only
    its numbers checked when read, and was served as it was: a config declaring another rank than its tensors have
    with the config's scaling, DoRA as a plain LoRA, tensors on a module the config does not target (which PEFT
    ignores) applied: answers PEFT never gives. It is refused as its upload would be."""
    import json

    from safetensors.torch import load_file, save_file

    from adapters.validate import content_sha256

    root = tmp_path / "store"
    new_store(root).put("bot", peft_dir)
    version = root / "bot" / "1"
    state = load_file(version / "adapter_model.safetensors")
    config = json.loads((version / "adapter_config.json").read_text())
    change(state, config)
    save_file(state, version / "adapter_model.safetensors")
    (version / "adapter_config.json").write_text(json.dumps(config))
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["sha256"] = content_sha256(config, state)
    manifest["size_bytes"] = sum(
        (version / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors")
    )
    (version / "manifest.json").write_text(json.dumps(manifest))
    store = new_store(root)
    with pytest.raises(error, match=match):
        store.read_weights(store.resolve("bot"))
