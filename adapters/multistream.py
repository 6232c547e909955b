"""bzip2 and xz readers that count a file's streams, for uploads.

bz2.open and lzma.open read a file's streams one after another, the interpreter setting up a decompressor for each:
a file of empty streams (14 bytes each in bzip2, 32 in xz) costs them about 1 s each 8 MiB, 10-40 times what
real data costs a byte, so a 512 MiB upload of them a minute of a core. As gzip members are (gzipstream), streams
are counted here, and the decompressors do the rest in C, in pieces no larger than the reader asks for.
"""

import bz2
import io
import lzma
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from adapters.errors import UnsafeArchive
from adapters.gzipstream import MAX_MEMBERS
from adapters.tarstream import damaged

_READ = 1 << 16  # compressed bytes read at a time


class Decompressor(Protocol):
    """bz2.BZ2Decompressor's and lzma.LZMADecompressor's common interface."""

    eof: bool
    needs_input: bool
    unused_data: bytes

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


def open_bzip2(path: Path) -> IO[bytes]:
    return io.BufferedReader(StreamsReader(path.open("rb"), bz2.BZ2Decompressor, "bzip2"))


def open_xz(path: Path) -> IO[bytes]:
    return io.BufferedReader(StreamsReader(path.open("rb"), lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), "xz"))


class StreamsReader(io.RawIOBase):
    """The decompressed bytes of a file's streams, one after another, zero bytes between them skipped (xz's stream
    padding). Raises UnsafeArchive for too many streams or a file that ends inside one; the decompressor's error
    (OSError, lzma.LZMAError) for damaged data."""

    def __init__(self, raw: IO[bytes], new: Callable[[], Decompressor], kind: str) -> None:
        self._raw, self._new, self._kind = raw, new, kind
        self._stream: Decompressor | None = None  # the stream being decompressed
        self._input = b""  # read from the file, not yet given to a decompressor
        self._streams = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        with memoryview(buffer) as view, view.cast("B") as out:
            if not out:  # a max_length of 0 is read as no bound at all
                return 0
            while self._stream is not None or self._start_stream():
                stream = self._stream
                if stream.eof:
                    self._input, self._stream = stream.unused_data, None
                    continue
                data = b""  # output still held back from the last call needs no more input
                if stream.needs_input:
                    data, self._input = self._input or self._raw.read(_READ), b""
                    if not data:
                        raise damaged(f"it ends inside a {self._kind} stream")
                chunk = stream.decompress(data, len(out))
                if chunk:
                    out[: len(chunk)] = chunk
                    return len(chunk)
            return 0

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()

    def _start_stream(self) -> bool:
        """Begin the next stream, counted against the bound; False at the end of the file."""
        data = self._input.lstrip(b"\0")
        while not data:
            data = self._raw.read(_READ)
            if not data:
                return False
            data = data.lstrip(b"\0")
        self._streams += 1
        if self._streams > MAX_MEMBERS:
            raise UnsafeArchive(
                f"the archive is over {MAX_MEMBERS} {self._kind} streams; compress the tar as one stream ({self._kind})"
            )
        self._input, self._stream = data, self._new()
        return True
