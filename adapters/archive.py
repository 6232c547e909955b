"""Safe extraction of an uploaded .tar(.gz, .bz2, .xz) / .zip holding a PEFT directory.

Headers are not trusted: sizes are counted while the bytes are written, members are limited in number,
tar headers are read in bounded pieces (adapters.tarstream), and gzip headers too (adapters.gzipstream), gzip
members and bzip2 and xz streams are counted (adapters.gzipstream, adapters.multistream), a zip's central
directory is bounded before it is read, decompression stops where the archive ends or the budget does, and only
regular files and directories with plain relative paths are accepted. Errors name members by their paths in the
archive, never by where the server extracts them.
"""

import errno
import lzma
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from adapters.errors import AdapterTooLarge, UnsafeArchive, disk_full
from adapters.gzipstream import open_gzip
from adapters.multistream import open_bzip2, open_xz
from adapters.tarstream import damaged, members, not_an_archive
from adapters.validate import CONFIG_FILE

MAX_MEMBERS = 64  # a PEFT directory holds a handful of files
# a member's path: a PEFT directory's files are one or two levels down. Each level is a directory made and removed
# by code that recurses a frame per level: 1,900 levels raised RecursionError (a 500 and a tree left behind)
MAX_DEPTH = 8
MAX_PATH_CHARS = 1024
# A zip's central directory: a 46-byte header per entry plus its name, extra field and comment. 4 KiB an entry
# leaves room for long names and every common extra field; zipfile reads and parses all of it up front.
MAX_CENTRAL_DIRECTORY = MAX_MEMBERS * 4096
_CHUNK = 1 << 20
# zipfile bounds what one read of a deflated member inflates to; bzip2 and lzma members it inflates a whole
# compressed chunk at a time, gigabytes from 4 KiB, before the budget sees a byte. Zip tools deflate by default.
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
# magic bytes -> how to open the tar inside; anything else is read as a plain tar
_COMPRESSED: dict[bytes, Callable[[Path], IO[bytes]]] = {
    b"\x1f\x8b": open_gzip,
    b"BZh": open_bzip2,
    b"\xfd7zXZ\x00": open_xz,
}


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Extract into `dest`; return the PEFT directory inside (at the top or one directory deep)."""
    dest.mkdir(parents=True, exist_ok=True)  # an archive of no members still leaves a directory to look in
    with archive.open("rb") as f:
        magic = f.read(6)
    if magic.startswith(b"PK\x03\x04"):
        _extract_zip(archive, dest, max_bytes)
    elif magic.startswith(b"PK"):  # an empty zip, or a split one
        raise not_an_archive()
    else:
        opener = next((open_ for prefix, open_ in _COMPRESSED.items() if magic.startswith(prefix)), None)
        _extract_tar(archive, opener or _open_plain, dest, max_bytes)
    return _peft_dir(dest)


def _open_plain(path: Path) -> IO[bytes]:
    return path.open("rb")


def _safe_path(dest: Path, name: str, directory: bool = False) -> Path:
    if "\0" in name:  # a pax path may hold one; no file name can
        raise UnsafeArchive(f"archive member {name!r} has a NUL byte in its name; pack plain file names only")
    if len(name) > MAX_PATH_CHARS:
        raise UnsafeArchive(f"an archive member's path has {len(name)} characters, over {MAX_PATH_CHARS}: pack the "
                            "PEFT directory's files at most a few levels down")  # fmt: skip
    path = PurePosixPath(name.replace("\\", "/"))
    if len(path.parts) > MAX_DEPTH:
        raise UnsafeArchive(f"archive member {name[:80]!r}... is {len(path.parts)} levels deep, over {MAX_DEPTH}: "
                            "pack the PEFT directory's files at most a few levels down")  # fmt: skip
    if directory and not path.parts:  # `./`, the archive's root, as `tar -C adapter-dir .` writes it
        return dest
    if path.is_absolute() or ".." in path.parts or not path.parts or ":" in path.parts[0]:
        raise UnsafeArchive(f"archive member {name!r} points outside the archive; pack relative paths only")
    return dest.joinpath(*path.parts)


# a member whose path another member took already, as a file or as a directory, or that goes through a file
_CLASHES = frozenset({errno.EEXIST, errno.EISDIR, errno.ENOTDIR})


@contextmanager
def _writing(name: str) -> Iterator[None]:
    """Extracting the member `name`: the OS's errors name the path written, in the server's scratch space (not
    the client's to know, and no help to it), so they are told by the member's path in the archive instead."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or disk_full(exc):  # the archive's data (not a path), or the server's disk
            raise
        if exc.errno in _CLASHES:
            raise UnsafeArchive(
                f"archive member {name!r} clashes with another member: the archive holds that path twice, or "
                "as a file and as a directory; pack each file of the PEFT directory once"
            ) from exc
        raise UnsafeArchive(
            f"archive member {name!r} cannot be extracted ({exc.strerror}); pack the PEFT directory's files "
            "with their plain, short names"
        ) from exc


class _Budget:
    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes
        self.max_bytes = max_bytes
        self.members = 0

    def member(self) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise UnsafeArchive(f"the archive has more than {MAX_MEMBERS} members; pack only the PEFT directory")

    def copy(self, src: Readable, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("xb") as out:
            while chunk := src.read(_CHUNK):
                self.left -= len(chunk)
                if self.left < 0:
                    raise AdapterTooLarge(
                        f"the archive unpacks to more than {self.max_bytes / 2**20:.0f} MiB, the server's "
                        "limit (--max-adapter-mb)"
                    )
                out.write(chunk)


def _extract_tar(archive: Path, opener: Callable[[Path], IO[bytes]], dest: Path, max_bytes: int) -> None:
    budget = _Budget(max_bytes)
    try:
        with opener(archive) as stream:
            for member in members(stream):  # streaming: read one by one, never all listed up front
                budget.member()
                target = _safe_path(dest, member.name, directory=member.kind == "directory")
                if member.kind == "other":
                    raise UnsafeArchive(
                        f"archive member {member.name!r} is a link or special file; pack regular files only"
                    )
                with _writing(member.name):
                    if member.kind == "directory":
                        target.mkdir(parents=True, exist_ok=True)
                    else:
                        budget.copy(member.data, target)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:  # what the decompressors raise on bad data
        if disk_full(exc):
            raise
        raise damaged(str(exc)) from exc


def _check_zip_directory(archive: Path) -> None:
    """Refuse a zip whose end record declares more than MAX_MEMBERS entries or a central directory larger than
    MAX_CENTRAL_DIRECTORY, before zipfile reads it: zipfile parses every entry of the directory into memory
    (however many the archive holds, whatever the end record counts), so an upload of small entries would
    cost about ten times its size in memory before any per-member check ran."""
    with archive.open("rb") as f:
        end = zipfile._EndRecData(f)  # the end record zipfile itself reads, zip64's included
    if end is None:
        raise UnsafeArchive("the archive is damaged (no zip end record); pack it again")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > MAX_MEMBERS:
        raise UnsafeArchive(f"the archive has more than {MAX_MEMBERS} members; pack only the PEFT directory")
    if size > MAX_CENTRAL_DIRECTORY:
        raise UnsafeArchive(
            f"the archive's central directory takes {size} bytes, more than {MAX_CENTRAL_DIRECTORY} for "
            f"{MAX_MEMBERS} members; pack only the PEFT directory, with plain names"
        )


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> None:
    budget = _Budget(max_bytes)
    try:
        _check_zip_directory(archive)
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                budget.member()
                target = _safe_path(dest, info.filename, directory=info.is_dir())
                # Unix file type bits, when the packer wrote them (zip tools on Windows leave them 0)
                file_type = stat.S_IFMT(info.external_attr >> 16)
                if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise UnsafeArchive(
                        f"archive member {info.filename!r} is a link or special file; pack regular files only"
                    )
                if info.is_dir():
                    with _writing(info.filename):
                        target.mkdir(parents=True, exist_ok=True)
                    continue
                if info.flag_bits & 0x1:
                    raise UnsafeArchive(f"archive member {info.filename!r} is encrypted; pack it without a password")
                if info.compress_type not in _ZIP_METHODS:
                    raise UnsafeArchive(
                        f"archive member {info.filename!r} uses zip compression method {info.compress_type}; "
                        "pack with deflate (zip's default) or no compression"
                    )
                with zf.open(info) as src, _writing(info.filename):
                    budget.copy(src, target)
    # what zipfile raises on bad data: a damaged directory or stream, a name that is not the UTF-8 its flag
    # says, a feature it does not read (patched data, strong encryption)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, UnicodeDecodeError,
            NotImplementedError) as exc:  # fmt: skip
        if disk_full(exc):
            raise
        raise UnsafeArchive(f"the archive is damaged ({exc}); pack it again") from exc


def _peft_dir(root: Path) -> Path:
    if (root / CONFIG_FILE).is_file():
        return root
    nested = [d for d in root.iterdir() if d.is_dir() and (d / CONFIG_FILE).is_file()]
    if len(nested) != 1:
        raise UnsafeArchive(
            f"the archive holds no single PEFT directory: put {CONFIG_FILE} and the weights at its top "
            "or in one directory"
        )
    return nested[0]
