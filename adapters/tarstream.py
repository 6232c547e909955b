"""A tar reader that trusts no header, for uploads.

tarfile reads a GNU long-name or pax header whole into memory whatever size it declares (300 MB in one
upload of 300 KB) and parses pax records with backtracking regexes (seconds on a run of digits). Here every
header is read in bounded pieces: metadata headers are refused past MAX_META bytes, pax records are parsed
by their length prefixes, and member data is handed out as a stream that stops at the member's size. Only
what an adapter archive needs is understood: regular files, directories, GNU long names and pax paths.
"""

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from adapters.errors import UnsafeArchive

BLOCK = 512
MAX_META = 16 << 10  # a long path is a few hundred bytes; pax records of packers' xattrs a few KB
_MAX_META_RUN = 8  # metadata headers in a row before a member: GNU and pax packers write one or two
_REGULAR = frozenset({b"0", b"\0", b"7"})  # file, old-style file, contiguous file
_DIRECTORY = b"5"
_GNU_LONG = frozenset({b"L", b"K"})  # long name, long link name
_PAX = frozenset({b"x", b"g", b"X"})  # per-member, global, Solaris per-member
_POSIX_MAGIC = b"ustar\x0000"


def not_an_archive() -> UnsafeArchive:
    return UnsafeArchive("the archive is neither a .tar(.gz) nor a .zip; pack the PEFT directory with tar or zip")


def damaged(why: str) -> UnsafeArchive:
    return UnsafeArchive(f"the archive is damaged ({why}); pack it again")


class MemberData:
    """Exactly `left` bytes of the underlying stream; a short read means the archive was cut off."""

    def __init__(self, stream: IO[bytes], size: int) -> None:
        self._stream, self.left = stream, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        chunk = self._stream.read(n) if n else b""
        if len(chunk) < n:
            raise damaged("it ends inside a member")
        self.left -= len(chunk)
        return chunk


@dataclass(frozen=True)
class Member:
    name: str
    kind: str  # "file", "directory" or "other" (links, devices: never extracted)
    data: MemberData


def members(stream: IO[bytes]) -> Iterator[Member]:
    """The members of the tar stream, in order. A consumer that stops early reads no further; after each
    member, what the consumer left of its data is skipped. Raises UnsafeArchive on any malformed header."""
    first = True
    while True:
        name, size, kind = _next_header(stream, first)
        first = False
        if kind is None:
            return
        if kind == "directory" and size:
            raise damaged(f"directory {name!r} declares {size} bytes of data")
        data = MemberData(stream, size)
        yield Member(name, kind, data)
        while data.left:
            data.read(1 << 20)
        _read(stream, -size % BLOCK)


def _next_header(stream: IO[bytes], first: bool) -> tuple[str, int, str | None]:
    """(name, size, kind) of the next member, its metadata headers applied; kind None at the end."""
    long_name: str | None = None
    pax: dict[bytes, bytes] = {}
    for _ in range(_MAX_META_RUN):
        block = stream.read(BLOCK)
        if not block or block == bytes(BLOCK):  # end of archive (a stream may stop without the zero blocks)
            return "", 0, None
        if len(block) < BLOCK or not _checksum_ok(block):
            raise not_an_archive() if first else damaged("a header is cut off or its checksum does not match")
        first = False
        kind, size = block[156:157], _number(block[124:136])
        if kind in _GNU_LONG or kind in _PAX:
            if size > MAX_META:
                raise UnsafeArchive(
                    f"the archive has a {size}-byte metadata header, over {MAX_META} bytes: pack the adapter "
                    "directory with plain tar (its paths are short)"
                )
            payload = _read(stream, size)
            _read(stream, -size % BLOCK)
            if kind == b"L":
                long_name = _text(payload.split(b"\0", 1)[0])
            elif kind != b"g":  # a global header applies to later members as defaults: nothing we use
                pax.update(_pax_records(payload))
            continue
        if any(key.startswith(b"GNU.sparse.") for key in pax):
            raise UnsafeArchive("the archive holds a sparse file; pack regular files only")
        if b"size" in pax:
            size = _decimal(pax[b"size"], "pax size")
        name = _text(pax[b"path"]) if b"path" in pax else long_name or _ustar_name(block)
        return name, size, "file" if kind in _REGULAR else "directory" if kind == _DIRECTORY else "other"
    raise damaged(f"more than {_MAX_META_RUN} metadata headers in a row")


def _read(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size) if size else b""
    if len(data) < size:
        raise damaged("it ends inside a header")
    return data


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except UnsafeArchive:
        return False
    unsigned = sum(block[:148]) + 8 * ord(" ") + sum(block[156:])
    signed = sum(struct.unpack("148b", block[:148])) + 8 * ord(" ") + sum(struct.unpack("356b", block[156:]))
    return stored in (unsigned, signed)


def _number(field: bytes) -> int:
    """An octal header number, or GNU's base-256 form for values past the octal field's range."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        raise damaged("a negative size")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if text and not all(48 <= c <= 55 for c in text):
        raise damaged("a header number is not octal")
    return int(text, 8) if text else 0


def _decimal(value: bytes, what: str) -> int:
    if not (value.isdigit() and len(value) <= 20):
        raise damaged(f"{what} {value[:32]!r} is not a number")
    return int(value)


def _pax_records(payload: bytes) -> dict[bytes, bytes]:
    """'<length> <key>=<value>\\n' records, each length counting the whole record: read by the lengths."""
    records, pos = {}, 0
    while pos < len(payload):
        space = payload.find(b" ", pos, pos + 21)
        if space < 0:
            raise damaged("a pax record has no length")
        end = pos + _decimal(payload[pos:space], "pax record length")
        if end <= space + 1 or end > len(payload) or payload[end - 1] != ord("\n"):
            raise damaged("a pax record's length does not match its text")
        key, eq, value = payload[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise damaged("a pax record is not key=value")
        records[key], pos = value, end
    return records


def _ustar_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:265] == _POSIX_MAGIC else b""
    return _text(prefix + b"/" + name if prefix else name)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise damaged("a member name is not UTF-8") from exc
