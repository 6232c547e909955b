"""A gzip reader that bounds every member's header, for uploads.

gzip.open reads a member header's file name and comment a byte at a time in the interpreter, however long they
are: a 100 MiB name took 12 s before the first byte was inflated (an upload of it 18 s, then stored), and a file of
empty members, 20 bytes each, 35 s for 100 MiB. Here a member's header must end within MAX_HEADER bytes (its end is
found by searching, not a byte at a time), members are counted (multistream), and zlib does the rest in C: it
parses the (bounded) header, inflates in pieces no larger than the reader asks for, and checks the CRC and length
of each member read to its end.
"""

import io
import zlib
from pathlib import Path
from typing import IO

from adapters.errors import UnsafeArchive
from adapters.multistream import Decompressor, StreamsReader
from adapters.tarstream import damaged

# gzip writes the packed file's name (one path component: at most 255 bytes on common filesystems), packers no
# comment and at most a few bytes of extra field (bgzip: 6)
MAX_HEADER = 16 << 10
_FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 0x02, 0x04, 0x08, 0x10
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads the gzip wrapper itself: header, CRC-32 and length checked


def open_gzip(path: Path) -> IO[bytes]:
    return io.BufferedReader(GzipReader(path.open("rb")))


class GzipReader(StreamsReader):
    """The inflated bytes of a gzip file's members (multistream.StreamsReader), each header checked against its
    bound; zlib.error for damaged compressed data."""

    stream, streams, packer = "gzip member", "gzip members", "gzip or pigz"

    def _begin(self, data: bytes) -> tuple[bytes, Decompressor]:
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
        return data, zlib.decompressobj(_GZIP_WBITS)  # zlib parses the header again: it ends within the bound

    def _held_back(self, current: Decompressor) -> bytes | None:
        return current.unconsumed_tail or None  # type: ignore[attr-defined]  # zlib's keeps what max_length cut off


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
