"""The store's pages of one name's versions (newest first, a version number as the cursor) and the retention of a
name's newest versions: every version listed once while versions are added and deleted between pages, and no
version pruned while a request holds it."""

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from peft_dirs import new_store, variants

from adapters.errors import AdapterNotFound
from adapters.store import AdapterStore
from server.registry import AdapterRegistry


def stored(tmp_path: Path, peft_dir: Path, count: int, name: str = "bot") -> tuple[AdapterStore, list[Path]]:
    store = new_store(tmp_path / "store")
    dirs = variants(peft_dir, tmp_path / "variants", count)
    for path in dirs:
        store.put(name, path)
    return store, dirs


def page_through(store: AdapterStore, name: str, limit: int, between: Callable[[int], None] | None = None) -> list[int]:
    listed: list[int] = []
    after = None
    while True:
        page, after, total = store.version_page(name, limit, after)
        assert len(page) <= limit and total >= len(page)
        listed += [m.version for m in page]
        if after is None:
            return listed
        assert after == page[-1].version
        if between is not None:
            between(after)


@pytest.mark.parametrize("limit", [1, 7, 50, 249, 250, 1000])
def test_many_versions_paged_through_newest_first_with_no_repeat_or_gap(
    tmp_path: Path, peft_dir: Path, limit: int
) -> None:
    store, _ = stored(tmp_path, peft_dir, 250)
    assert page_through(store, "bot", limit) == list(range(250, 0, -1))
    first, cursor, total = store.version_page("bot", limit)
    assert total == 250 and first[0] == store.resolve("bot")  # the first version listed is the one `bot` serves
    assert cursor == (None if limit >= 250 else 251 - limit)


def test_a_cursor_is_any_version_number(tmp_path: Path, peft_dir: Path) -> None:
    store, _ = stored(tmp_path, peft_dir, 5)
    store.delete("bot@3")
    assert [m.version for m in store.version_page("bot", 10, 3)[0]] == [2, 1]  # deleted: what is older than it
    assert [m.version for m in store.version_page("bot", 10, 99)[0]] == [5, 4, 2, 1]  # past the newest: every one
    assert store.version_page("bot", 10, 1) == ([], None, 4)  # nothing older than the oldest
    assert store.version_page("bot", 2, 5) == ([store.resolve("bot@4"), store.resolve("bot@2")], 2, 4)
    with pytest.raises(AdapterNotFound, match="no adapter named 'ghost'"):
        store.version_page("ghost", 10)


def test_versions_added_between_pages_are_not_listed_and_none_is_repeated(tmp_path: Path, peft_dir: Path) -> None:
    store, _ = stored(tmp_path, peft_dir, 40)
    more = iter(variants(peft_dir, tmp_path / "more", 20, first=40))

    def upload(_: int) -> None:
        store.put("bot", next(more))
        store.put("bot", next(more))

    listed = page_through(store, "bot", 6, upload)
    assert listed == list(range(40, 0, -1))  # the ones stored meanwhile are newer than every cursor
    assert page_through(store, "bot", 1000) == list(range(40 + 2 * 6, 0, -1))  # a new listing shows them


def test_versions_deleted_between_pages_drop_out_and_the_rest_are_listed_once(tmp_path: Path, peft_dir: Path) -> None:
    """Each page deletes its cursor's own version (the last listed) and the next page's first: the next page starts
    below the cursor all the same, and every version never deleted is listed once, in order."""
    store, _ = stored(tmp_path, peft_dir, 60)
    listed_then_deleted: set[int] = set()
    deleted_unlisted: set[int] = set()

    def delete(cursor: int) -> None:
        store.delete(f"bot@{cursor}")
        listed_then_deleted.add(cursor)
        if cursor > 1:
            store.delete(f"bot@{cursor - 1}")
            deleted_unlisted.add(cursor - 1)

    listed = page_through(store, "bot", 5, delete)
    assert listed == [n for n in range(60, 0, -1) if n not in deleted_unlisted]  # in order, none twice, no gap
    assert len(listed_then_deleted) == len(deleted_unlisted) == 10  # each page of 5 took 6 (1 deleted unlisted)
    kept = [n for n in listed if n not in listed_then_deleted]
    assert page_through(store, "bot", 1000) == kept and len(kept) == 60 - 20


def with_broken(root: Path, peft_dir: Path, counts: dict[str, int]) -> tuple[AdapterStore, list[str]]:
    """A store at `root` with one readable version of "bot" and `counts[name]` unreadable versions of each name (a
    manifest cut off), and their keys in name and version order."""
    store = new_store(root)
    store.put("bot", peft_dir)
    keys = []
    for name, count in sorted(counts.items()):
        for number in range(2, 2 + count):
            (root / name / str(number)).mkdir(parents=True)
            (root / name / str(number) / "manifest.json").write_text('{"name": ')
        keys += [f"{name}@{number}" for number in sorted(range(2, 2 + count))]
    store.refresh()
    return store, keys


def broken_pages(store: AdapterStore, limit: int, between: Callable[[str], None] | None = None) -> list[str]:
    listed: list[str] = []
    after = None
    while True:
        page, cursor, total = store.broken_page(limit, after)
        assert len(page) <= limit and total >= len(page)
        listed += [b.key for b in page]
        if cursor is None:
            return listed
        assert cursor == page[-1].key
        if between is not None:
            between(cursor)
        name, _, version = cursor.partition("@")
        after = (name, int(version))


@pytest.mark.parametrize("limit", [1, 7, 100, 299, 300, 1000])
def test_unreadable_versions_are_paged_by_name_and_version(tmp_path: Path, peft_dir: Path, limit: int) -> None:
    """The listing's `broken` section named every unreadable version in one answer, however many there were: 10,000
    half-written manifests made an answer of megabytes, built on the event loop. They come a page at a time now."""
    store, keys = with_broken(tmp_path / "store", peft_dir, {"bot": 150, "a": 1, "zeta": 120, "mid": 29})
    assert len(keys) == 300 and keys[:3] == ["a@2", "bot@2", "bot@3"] and keys[-1] == "zeta@121"
    assert broken_pages(store, limit) == keys
    page, cursor, total = store.broken_page(limit)
    assert (
        total == 300 and [b.key for b in page] == keys[:limit] and cursor == (keys[limit - 1] if limit < 300 else None)
    )


def test_unreadable_versions_deleted_between_pages_drop_out_and_the_rest_are_listed_once(
    tmp_path: Path, peft_dir: Path
) -> None:
    store, keys = with_broken(tmp_path / "store", peft_dir, {"bot": 20, "cat": 3, "dog": 20})
    gone: set[str] = set()

    def delete(cursor: str) -> None:  # the cursor's own version, and a name whole once it is reached
        store.delete(cursor)
        gone.add(cursor)
        if cursor.startswith("bot@") and "cat@2" not in gone:
            store.delete("cat")
            gone.update({"cat@2", "cat@3", "cat@4"})

    listed = broken_pages(store, 6, delete)
    assert listed == [k for k in keys if not k.startswith("cat@")]
    assert broken_pages(store, 1000) == [k for k in keys if k not in gone]
    assert store.broken_page(5, ("zzz", 1)) == ([], None, len(keys) - len(gone))  # past the last: none


def test_a_missing_version_is_named_in_a_message_of_bounded_length(tmp_path: Path, peft_dir: Path) -> None:
    store, _ = stored(tmp_path, peft_dir, 30)
    with pytest.raises(AdapterNotFound) as missing:
        store.resolve("bot@31", recheck=False)
    message = str(missing.value)
    assert "has no version 31; it has 30 versions, 1 to 30" in message and len(message) < 200
    store.delete("bot")
    few, _ = stored(tmp_path / "few", peft_dir, 2)
    with pytest.raises(AdapterNotFound, match=r"its versions are \[1, 2\]"):
        few.resolve("bot@3", recheck=False)


def test_pruning_keeps_the_newest_and_those_in_use(tmp_path: Path, peft_dir: Path) -> None:
    store, _ = stored(tmp_path, peft_dir, 6)
    removed: list[list[str]] = []
    store.on_removed(removed.append)
    asked: list[list[str]] = []

    def in_use(keys: list[str]) -> set[str]:
        asked.append(keys)
        return {"bot@2"}

    assert store.prune("bot", 3, in_use) == ["bot@1", "bot@3"]
    assert asked == [["bot@1", "bot@2", "bot@3"]] and removed == [["bot@1", "bot@3"]]
    assert [m.version for m in store.versions("bot")] == [2, 4, 5, 6]
    assert [m.version for m in new_store(tmp_path / "store").versions("bot")] == [2, 4, 5, 6]  # gone from the disk
    assert store.prune("bot", 4, in_use) == [] and len(asked) == 1  # four left: nothing past the cap, none asked
    assert store.prune("bot", 1, lambda keys: set(), batch=2) == ["bot@2", "bot@4"]  # a batch at a time
    assert store.prune("bot", 1, lambda keys: set()) == ["bot@5"]
    assert store.resolve("bot").version == 6
    with pytest.raises(ValueError, match="at least 1"):
        store.prune("bot", 0, lambda keys: set())


def test_the_registry_prunes_after_an_upload_but_never_a_version_a_request_holds(
    tmp_path: Path, peft_dir: Path
) -> None:
    registry = AdapterRegistry(new_store(tmp_path / "store"), max_cpu_adapters=4, keep_versions=2)
    dirs = variants(peft_dir, tmp_path / "variants", 6)

    async def scenario() -> None:
        for path in dirs[:3]:
            await registry.put("bot", path)
        assert [m.version for m in registry.store.versions("bot")] == [2, 3]
        held = await registry.acquire("bot@2")  # a request running on bot@2
        registry.pin("bot@3")
        await registry.put("bot", dirs[3])
        await registry.put("bot", dirs[4])
        assert [m.version for m in registry.store.versions("bot")] == [2, 3, 4, 5]  # in use: kept past the cap
        assert held.weights.rank == 4 and registry.state("bot@2") == "active"
        held.release()
        registry.unpin("bot@3")
        same, created = await registry.put("bot", dirs[4])  # the same content again: a successful upload, too
        assert not created and same.version == 5
        assert [m.version for m in registry.store.versions("bot")] == [4, 5]
        with pytest.raises(AdapterNotFound):
            await registry.acquire("bot@2")

    try:
        asyncio.run(scenario())
    finally:
        registry.close()
