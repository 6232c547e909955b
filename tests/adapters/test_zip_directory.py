"""A zip's central directory is bounded before zipfile reads it (zipfile parses every entry up front)."""

import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from adapters import errors
from adapters.archive import MAX_CENTRAL_DIRECTORY, MAX_MEMBERS, extract_archive

END_RECORD = b"PK\x05\x06"


def zip_of(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, b"")
    return path


def declare_entries(path: Path, count: int) -> None:
    """Rewrite the end record's two entry counts (this disk, total): what the archive says it holds."""
    data = bytearray(path.read_bytes())
    end = data.rindex(END_RECORD)
    struct.pack_into("<HH", data, end + 8, count, count)
    path.write_bytes(bytes(data))


@contextmanager
def zipfile_unused() -> Iterator[None]:
    """Within: any use of zipfile.ZipFile fails the test (it would parse the whole central directory)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zipfile, "ZipFile", None)
        yield


def test_a_directory_larger_than_its_declared_count_is_refused_unread(tmp_path: Path) -> None:
    # 7,000 entries that the end record calls 3: zipfile would parse all 7,000 before any member check
    names = [f"{i:04d}" for i in range(7000)]
    archive = zip_of(tmp_path / "many.zip", names)
    declare_entries(archive, 3)
    assert len(zipfile.ZipFile(archive).infolist()) == 7000  # what zipfile itself would build in memory
    with zipfile_unused(), pytest.raises(errors.UnsafeArchive, match="central directory") as refused:
        extract_archive(archive, tmp_path / "out", 1 << 20)
    assert str(MAX_CENTRAL_DIRECTORY) in str(refused.value)


def test_too_many_declared_members_are_refused_unread(tmp_path: Path) -> None:
    archive = zip_of(tmp_path / "count.zip", [f"f{i}" for i in range(MAX_MEMBERS + 1)])
    with zipfile_unused(), pytest.raises(errors.UnsafeArchive, match="members"):
        extract_archive(archive, tmp_path / "out", 1 << 20)


def test_a_zip_without_an_end_record_is_damaged(tmp_path: Path) -> None:
    archive = zip_of(tmp_path / "cut.zip", ["adapter_config.json"])
    data = archive.read_bytes()
    archive.write_bytes(data[: data.rindex(END_RECORD)])  # cut off where the end record starts
    with zipfile_unused(), pytest.raises(errors.UnsafeArchive, match="damaged"):
        extract_archive(archive, tmp_path / "out", 1 << 20)


def test_long_names_within_the_bound_still_extract(tmp_path: Path) -> None:
    # a PEFT directory under a folder name as long as file systems allow: every member's name is long
    folder = "x" * 250
    with zipfile.ZipFile(tmp_path / "long.zip", "w") as zf:
        zf.writestr(f"{folder}/adapter_config.json", b"{}")
        zf.writestr(f"{folder}/adapter_model.safetensors", b"")
    assert extract_archive(tmp_path / "long.zip", tmp_path / "out", 1 << 20).name == folder
