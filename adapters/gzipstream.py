"""A gzip reader that bounds every member's header, for uploads.

gzip.open reads a member header's file name and comment a byte at a time in the interpreter, however long they
are: a 100 MiB name took 12 s before the first byte was inflated (an upload of it 18 s, then stored), and a file of
empty members, 20 bytes each, 35 s for 100 MiB. Here a member's header must end within MAX_HEADER bytes (its end is
found by searching, not a byte at a time), members are counted, and zlib does the rest in C: it parses the
(bounded) header, inflates in pieces no larger than the reader asks for, and checks the CRC and length of each
member read to its end.
"""

import io
import zlib
from pathlib import Path
from typing import IO

from adapters.errors import UnsafeArchive
from adapters.tarstream import damaged

# gzip writes the packed file's name (one path component: at most 255 bytes on common filesystems), packers no
# comment and at most a few bytes of extra field (bgzip: 6)
MAX_HEADER = 16 << 10
# gzip, pigz, tar and Python write one member; bgzip writes one per 64 KiB (256 MiB of tar in 4096). Each costs a
# few microseconds of the interpreter however little it holds: a 512 MiB upload is 27 million empty members.
MAX_MEMBERS = 4096
_READ = 1 << 16  # compressed bytes read at a time
_FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 0x02, 0x04, 0x08, 0x10
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads the gzip wrapper itself: header, CRC-32 and length checked


def open_gzip(path: Path) -> IO[bytes]:
    return io.BufferedReader(GzipReader(path.open("rb")))


class GzipReader(io.RawIOBase):
    """The inflated bytes of a gzip file: its members one after another, zero bytes between them skipped (gzip
    reads them as padding). Raises UnsafeArchive for a header over its bound, too many members, or a file that
    ends inside a member; zlib.error for damaged compressed data."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._inflate: zlib._Decompress | None = None  # the member being inflated
        self._input = b""  # read from the file, not yet given to zlib: a member's header and what follows it
        self._members = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        with memoryview(buffer) as view, view.cast("B") as out:
            if not out:  # zlib reads a max_length of 0 as no bound at all
                return 0
            while self._inflate is not None or self._start_member():
                inflate = self._inflate
                if inflate.eof:
                    self._input, self._inflate = inflate.unused_data, None
                    continue
                data = inflate.unconsumed_tail or self._input or self._raw.read(_READ)
                self._input = b""
                if not data:
                    raise damaged("it ends inside a gzip member")
                chunk = inflate.decompress(data, len(out))
                if chunk:
                    out[: len(chunk)] = chunk
                    return len(chunk)
            return 0

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()

    def _start_member(self) -> bool:
        """Begin the next member, its header checked against the bounds; False at the end of the file."""
        data = self._input.lstrip(b"\0")
        while not data:
            data = self._raw.read(_READ)
            if not data:
                return False
            data = data.lstrip(b"\0")
        while not _header_ends(data[:MAX_HEADER]):
            if len(data) >= MAX_HEADER:
                raise UnsafeArchive(
                    f"a gzip header of the archive (its file name, comment or extra field) is over {MAX_HEADER} "
                    "bytes; compress the tar with gzip, which stores only the file's own name"
                )
            more = self._raw.read(MAX_HEADER - len(data))
            if not more:
                raise damaged("it ends inside a gzip header")
            data += more
        self._members += 1
        if self._members > MAX_MEMBERS:
            raise UnsafeArchive(
                f"the archive is over {MAX_MEMBERS} gzip members; compress the tar as one stream (gzip or pigz)"
            )
        # zlib parses the header again: it is known to end within the bound
        self._input, self._inflate = data, zlib.decompressobj(_GZIP_WBITS)
        return True


def _header_ends(head: bytes) -> bool:
    """Whether the gzip member header at the start of `head` ends within it (RFC 1952, 2.3.1)."""
    if not b"\x1f\x8b\x08".startswith(head[:3]):
        raise damaged("a gzip member does not start with a gzip header")
    if len(head) < 10:
        return False
    flags, end = head[3], 10
    if flags & _FEXTRA:
        if len(head) < 12:
            return False
        end = 12 + int.from_bytes(head[10:12], "little")
    for field in (_FNAME, _FCOMMENT):
        if flags & field:
            nul = head.find(b"\0", end)
            if nul < 0:
                return False
            end = nul + 1
    return end + (2 if flags & _FHCRC else 0) <= len(head)
