"""A zip's central directory is bounded before zipfile reads it (zipfile parses every entry up front)."""

import struct
import zipfile
import zlib
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


def one_member_zip(name: bytes, data: bytes, flags: int = 0, deflated: bytes | None = None) -> bytes:
    """A one-member zip written by hand, with the flags given and, where `deflated` is given, those bytes as the
    member's deflate stream (zipfile would write only valid archives)."""
    method, raw = (0, data) if deflated is None else (8, deflated)
    crc = zlib.crc32(data)
    sizes = (crc, len(raw), len(data), len(name))
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0, *sizes, 0) + name + raw
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, flags, method, 0, 0, *sizes, 0, 0, 0, 0, 0, 0)
    end = struct.pack("<4s4H2LH", END_RECORD, 0, 0, 1, 1, len(central) + len(name), len(local), 0)
    return local + central + name + end


def zip64_of_two_disks() -> bytes:
    """A zip64 end locator that says the archive spans two disks: zipfile refuses it while reading its end."""
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2)
    return b"PK\x03\x04" + bytes(26) + locator + struct.pack("<4s4H2LH", END_RECORD, 0, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    "data",
    [
        one_member_zip(b"adapter_config\xff.json", b"{}", flags=0x800),  # says UTF-8, is not
        one_member_zip(b"adapter_config.json", b"{}", flags=0x20),  # patched data: zipfile does not read it
        one_member_zip(b"adapter_config.json", b"{}", flags=0x40),  # strong encryption: likewise
        one_member_zip(b"adapter_config.json", b"{}" * 100, deflated=b"\xff" * 50),  # not a deflate stream
        zip64_of_two_disks(),
    ],
    ids=["utf8-name", "patched", "strong-encryption", "bad-deflate", "two-disks"],
)
def test_a_zip_zipfile_cannot_read_is_damaged(tmp_path: Path, data: bytes) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(data)
    with pytest.raises(errors.UnsafeArchive, match="damaged"):
        extract_archive(archive, tmp_path / "out", 1 << 20)
