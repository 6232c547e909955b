"""Readers of compressed files made of several streams (gzip's members, bzip2's and xz's streams) that count them,
for uploads.

gzip.open, bz2.open and lzma.open read a file's streams one after another, the interpreter setting up each: a file
of empty ones (20 bytes each in gzip, 14 in bzip2, 32 in xz) costs them 3-8 MiB a second, 10-40 times what real
data costs a byte (100 MiB of empty gzip members took 35 s, 64 MiB of empty bzip2 or xz streams 13-16 s). Here a
file may hold at most MAX_MEMBERS streams, and the decompressors do the rest in C, in pieces no larger than the
reader asks for, each checking its stream's checksum as it reads it to its end. gzip's headers are bounded too
(gzipstream).
"""

import bz2
import io
import lzma
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from adapters.errors import UnsafeArchive
from adapters.tarstream import damaged

# gzip, pigz, tar and Python write one stream; bgzip writes a gzip member per 64 KiB (256 MiB of tar in 4096),
# pbzip2 a bzip2 stream per 900 kB block. Each costs a few microseconds of the interpreter however little it holds:
# a 512 MiB upload is 27 million empty gzip members.
MAX_MEMBERS = 4096
READ = 1 << 16  # compressed bytes read at a time


class Decompressor(Protocol):
    """What zlib's, bz2's and lzma's decompressor objects have in common."""

    eof: bool
    unused_data: bytes

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


class StreamsReader(io.RawIOBase):
    """The decompressed bytes of a file's streams one after another, zero bytes between them skipped (gzip and xz
    read them as padding). Raises UnsafeArchive for too many streams or a file that ends inside one, as `_begin`
    does for a stream's header; the decompressor's error for damaged data. A format says what its stream is called
    (`stream`, in plural `streams`), what writes one stream (`packer`), how a stream begins (`_begin`) and what a
    decompressor holds back of its input (`_held_back`)."""

    stream: str
    streams: str
    packer: str

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._current: Decompressor | None = None  # the stream being decompressed
        self._input = b""  # read from the file, not yet given to a decompressor
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        with memoryview(buffer) as view, view.cast("B") as out:
            if not out:  # a max_length of 0 is read as no bound at all
                return 0
            while self._current is not None or self._start():
                current = self._current
                if current.eof:
                    self._input, self._current = current.unused_data, None
                    continue
                data = self._held_back(current)
                if data is None:
                    data, self._input = self._input or self._raw.read(READ), b""
                    if not data:
                        raise damaged(f"it ends inside a {self.stream}")
                chunk = current.decompress(data, len(out))
                if chunk:
                    out[: len(chunk)] = chunk
                    return len(chunk)
            return 0

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()

    def _start(self) -> bool:
        """Begin the next stream, counted against the bound; False at the end of the file."""
        data = self._input.lstrip(b"\0")
        while not data:
            data = self._raw.read(READ)
            if not data:
                return False
            data = data.lstrip(b"\0")
        self._count += 1
        if self._count > MAX_MEMBERS:
            raise UnsafeArchive(
                f"the archive is over {MAX_MEMBERS} {self.streams}; compress the tar as one stream ({self.packer})"
            )
        self._input, self._current = self._begin(data)
        return True

    def _begin(self, data: bytes) -> tuple[bytes, Decompressor]:
        """(the input to decompress, a decompressor) for a stream whose first bytes are `data`."""
        raise NotImplementedError

    def _held_back(self, current: Decompressor) -> bytes | None:
        """The input to pass `current` next, or None where it needs more from the file."""
        raise NotImplementedError


class _BufferedStreamsReader(StreamsReader):
    """bzip2's and xz's: their decompressors keep the input they have not used yet."""

    new: Callable[[], bz2.BZ2Decompressor | lzma.LZMADecompressor]

    def _begin(self, data: bytes) -> tuple[bytes, Decompressor]:
        return data, self.new()

    def _held_back(self, current: Decompressor) -> bytes | None:
        return None if current.needs_input else b""  # type: ignore[attr-defined]  # bz2's and lzma's have it


class Bzip2Reader(_BufferedStreamsReader):
    stream, streams, packer = "bzip2 stream", "bzip2 streams", "bzip2"
    new = bz2.BZ2Decompressor


class XzReader(_BufferedStreamsReader):
    stream, streams, packer = "xz stream", "xz streams", "xz"

    @staticmethod
    def new() -> lzma.LZMADecompressor:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ)


def open_bzip2(path: Path) -> IO[bytes]:
    return io.BufferedReader(Bzip2Reader(path.open("rb")))


def open_xz(path: Path) -> IO[bytes]:
    return io.BufferedReader(XzReader(path.open("rb")))
