"""Deterministic newc ("070701") cpio archives: the ramdisk format of enclave images.

The Linux kernel unpacks initramfs ramdisks in the SVR4 "newc" format (``Documentation/driver-api/early-userspace/
buffer-format.rst``): per entry a 110-byte ASCII header (magic ``070701`` and 13 fields of 8 hexadecimal digits),
the NUL-terminated name padded to a multiple of 4 (counting the header), then the data padded to a multiple of 4.
The archive ends with an entry named ``TRAILER!!!``.

Writer (:class:`CpioArchive`): entries are sorted by path, inode numbers are sequential from 1, ``nlink`` is 2 for
directories and 1 otherwise, ``devmajor``/``devminor`` are 0, ``check`` is 0.  The caller decides modes, owners and
mtimes (see :func:`normalised_mode`); the archive itself never looks at a clock or a file system.  Contents are
:class:`CpioContent` objects that yield chunks, so an archive of any size streams: ``chunks()`` yields the
header bytes and the content chunks as they come, and ``size`` is known before a byte is produced.

Reader (:func:`iter_members` over a stream, :func:`decode` over bytes): strict; bad magic, non-hex fields, names or
data running past the end, missing NUL, missing trailer or bytes after it raise :class:`CpioFormatError`.  Declared
sizes are checked against the bytes actually available before anything is read, so a hostile header never causes
a large allocation.

This module is a pure codec: it never opens files.  Hard links are written as independent regular files (each with
its own copy of the data): the archive then unpacks to the same contents on every unpacker.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

from enclavekit.errors import FormatError

__all__ = [
    "MAGIC",
    "HEADER_SIZE",
    "TRAILER_NAME",
    "MAX_NAME_SIZE",
    "CpioFormatError",
    "CpioContent",
    "BytesContent",
    "CpioEntry",
    "CpioArchive",
    "CpioMember",
    "encode_header",
    "normalised_mode",
    "iter_members",
    "decode",
]

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER_NAME = "TRAILER!!!"
# Linux's PATH_MAX is 4096 (including the NUL); the kernel's unpacker refuses longer names.
MAX_NAME_SIZE = 4096
_MAX_FIELD = 0xFFFFFFFF
_READ_CHUNK = 1 << 20
_HEX_FIELDS = re.compile(rb"(?:[0-9a-fA-F]{8})+")  # the 13 fields of a header (or one of them)


class CpioFormatError(FormatError):
    """A cpio archive (a ramdisk) is malformed."""

    code = "E35"


@runtime_checkable
class CpioContent(Protocol):
    """The data of a regular file: ``size`` bytes, produced by ``chunks()`` (may be called more than once)."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> Iterator[bytes | memoryview]: ...


@dataclass(frozen=True, slots=True)
class BytesContent:
    """Content held in memory (small files: ``cmd``, ``env``, test data)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def chunks(self) -> Iterator[bytes | memoryview]:
        if self.data:
            yield self.data


def _enc(text: str) -> bytes:
    # Names are file system bytes: UTF-8, with undecodable bytes carried as surrogates (os.fsencode's convention).
    return text.encode("utf-8", "surrogateescape")


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def normalised_mode(file_type: int, mode: int) -> int:
    """Canonical permission bits for a file type (the deterministic-ramdisk rule).

    Directories 0755, regular files 0755 if any execute bit is set else 0644, symlinks 0777; device nodes and
    FIFOs keep their permission bits (masked to 0777).  Returns type | permissions.
    """
    if file_type == stat.S_IFDIR:
        return file_type | 0o755
    if file_type == stat.S_IFREG:
        return file_type | (0o755 if mode & 0o111 else 0o644)
    if file_type == stat.S_IFLNK:
        return file_type | 0o777
    if file_type in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO):
        return file_type | (mode & 0o777)
    raise ValueError(f"unsupported file type {file_type:#o}")


_ALLOWED_TYPES = (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO)


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One entry to write.  ``mode`` holds the file type bits and the permissions (``stat.S_IFREG | 0o644``).

    Regular files take ``content``; symlinks take ``link_target``; device nodes take ``rdev_major``/``rdev_minor``.
    """

    path: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    content: CpioContent | None = None
    link_target: str | None = None
    rdev_major: int = 0
    rdev_minor: int = 0

    def __post_init__(self) -> None:
        if not self.path or self.path.startswith("/") or self.path.endswith("/") or "\0" in self.path:
            raise ValueError(f"cpio entry path must be relative, non-empty, without NUL: {self.path!r}")
        if self.path == TRAILER_NAME:
            raise ValueError("an entry may not be named like the trailer")
        if len(_enc(self.path)) + 1 > MAX_NAME_SIZE:
            raise ValueError("cpio entry path too long")
        ftype = stat.S_IFMT(self.mode)
        if ftype not in _ALLOWED_TYPES:
            raise ValueError(f"unsupported file type in mode {self.mode:#o}")
        for name in ("uid", "gid", "mtime", "rdev_major", "rdev_minor"):
            value = getattr(self, name)
            if not 0 <= value <= _MAX_FIELD:
                raise ValueError(f"cpio field {name} out of range: {value}")
        if ftype == stat.S_IFREG:
            if self.link_target is not None:
                raise ValueError("a regular file has no link target")
        elif self.content is not None:
            raise ValueError("only regular files have content")
        if ftype == stat.S_IFLNK and not self.link_target:
            raise ValueError("a symlink needs a link target")
        if ftype != stat.S_IFLNK and self.link_target is not None:
            raise ValueError("only symlinks have a link target")

    @property
    def file_type(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def data_size(self) -> int:
        if self.file_type == stat.S_IFREG:
            return self.content.size if self.content is not None else 0
        if self.file_type == stat.S_IFLNK:
            assert self.link_target is not None
            return len(_enc(self.link_target))
        return 0


def encode_header(*, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int, filesize: int,
                  rdev_major: int, rdev_minor: int, name: str) -> bytes:
    """The header, name, NUL and name padding of one newc entry (devmajor/devminor and check are 0)."""
    name_bytes = _enc(name) + b"\0"
    if filesize > _MAX_FIELD:
        raise ValueError(f"cpio newc cannot hold a file of {filesize} bytes (limit 4 GiB - 1)")
    fields = (ino, mode, uid, gid, nlink, mtime, filesize, 0, 0, rdev_major, rdev_minor, len(name_bytes), 0)
    head = MAGIC + b"".join(b"%08X" % f for f in fields)
    return head + name_bytes + b"\0" * _pad4(HEADER_SIZE + len(name_bytes))


class CpioArchive:
    """A deterministic archive of ``entries``, sorted by path (duplicate paths are refused).

    Implements the EIF writer's ChunkSource protocol: ``chunks()`` streams the archive, ``size`` is exact.
    """

    __slots__ = ("entries",)

    def __init__(self, entries: Iterable[CpioEntry]) -> None:
        ordered = tuple(sorted(entries, key=lambda e: _enc(e.path)))
        for prev, cur in itertools.pairwise(ordered):
            if prev.path == cur.path:
                raise ValueError(f"duplicate cpio entry {cur.path!r}")
        self.entries: tuple[CpioEntry, ...] = ordered

    def _header(self, ino: int, entry: CpioEntry) -> bytes:
        return encode_header(
            ino=ino, mode=entry.mode, uid=entry.uid, gid=entry.gid,
            nlink=2 if entry.file_type == stat.S_IFDIR else 1, mtime=entry.mtime, filesize=entry.data_size,
            rdev_major=entry.rdev_major, rdev_minor=entry.rdev_minor, name=entry.path)

    @staticmethod
    def _entry_size(name: str, data_size: int) -> int:
        name_size = len(_enc(name)) + 1
        head = HEADER_SIZE + name_size
        return head + _pad4(head) + data_size + _pad4(data_size)

    @property
    def size(self) -> int:
        total = sum(self._entry_size(e.path, e.data_size) for e in self.entries)
        return total + self._entry_size(TRAILER_NAME, 0)

    def chunks(self) -> Iterator[bytes | memoryview]:
        for ino, entry in enumerate(self.entries, start=1):
            yield self._header(ino, entry)
            size = entry.data_size
            if entry.file_type == stat.S_IFREG and entry.content is not None:
                produced = 0
                for chunk in entry.content.chunks():
                    produced += len(chunk)
                    if produced > size:
                        break
                    yield chunk
                if produced != size:
                    # The archive's size was announced up front; content that changed underneath cannot be fixed.
                    raise ValueError(f"content of {entry.path!r} produced {produced} bytes, declared {size}")
            elif entry.file_type == stat.S_IFLNK:
                assert entry.link_target is not None
                yield _enc(entry.link_target)
            if _pad4(size):
                yield b"\0" * _pad4(size)
        yield encode_header(ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, filesize=0, rdev_major=0,
                            rdev_minor=0, name=TRAILER_NAME)

    def to_bytes(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks())


# ---------------------------------------------------------------------------------------------------- reader


@dataclass(frozen=True, slots=True)
class CpioMember:
    """One entry read from an archive.  ``data`` is filled by :func:`decode` (and by ``iter_members`` when asked)."""

    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    size: int
    dev_major: int
    dev_minor: int
    rdev_major: int
    rdev_minor: int
    data_offset: int
    data: bytes | None = None

    @property
    def file_type(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def permissions(self) -> int:
        return stat.S_IMODE(self.mode)


def _read_exact(stream: BinaryIO, n: int, what: str, offset: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise CpioFormatError(f"cpio archive truncated in {what} at offset {offset}: needed {n} bytes, "
                              f"got {len(data)}")
    return data


def iter_members(stream: BinaryIO, length: int) -> Iterator[tuple[CpioMember, Iterator[bytes]]]:
    """Walk a newc archive of ``length`` bytes read from ``stream`` (positioned at its start).

    Yields ``(member, data_chunks)``; ``data_chunks`` streams the member's data in chunks of at most 1 MiB and must
    be consumed (or ignored: unread data is skipped, by seeking if the stream is seekable) before the next member is
    requested.  ``member.data_offset`` is where the data starts, relative to the archive's first byte.  Stops after
    the trailer; anything other than zero padding after it is an error.
    """
    if length < 0:
        raise ValueError("length must be >= 0")
    pos = 0
    try:
        seekable = bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        seekable = False

    while True:
        if length - pos < HEADER_SIZE:
            raise CpioFormatError(f"cpio archive truncated: no room for a header at offset {pos} "
                                  f"(archive is {length} bytes, no trailer seen)")
        head = _read_exact(stream, HEADER_SIZE, "a header", pos)
        if head[:6] != MAGIC:
            raise CpioFormatError(f"bad cpio magic at offset {pos}: expected 070701 (newc), found {head[:6]!r}")
        if _HEX_FIELDS.fullmatch(head, 6) is None:
            bad = next(i for i in range(13) if _HEX_FIELDS.fullmatch(head[6 + 8 * i: 14 + 8 * i]) is None)
            raise CpioFormatError(f"cpio header at offset {pos} has a non-hexadecimal field {bad}")
        values = [int(head[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, filesize, dmaj, dmin, rmaj, rmin, namesize, _check = values
        if namesize < 1 or namesize > MAX_NAME_SIZE:
            raise CpioFormatError(f"cpio entry at offset {pos} declares a name of {namesize} bytes "
                                  f"(1..{MAX_NAME_SIZE} allowed)")
        name_total = namesize + _pad4(HEADER_SIZE + namesize)
        if pos + HEADER_SIZE + name_total > length:
            raise CpioFormatError(f"cpio entry name at offset {pos} runs past the end of the archive")
        raw = _read_exact(stream, name_total, "a name", pos)
        name_bytes = raw[:namesize]
        if name_bytes[-1:] != b"\0" or b"\0" in name_bytes[:-1]:
            raise CpioFormatError(f"cpio entry name at offset {pos} is not NUL-terminated")
        name = name_bytes[:-1].decode("utf-8", "surrogateescape")
        data_offset = pos + HEADER_SIZE + name_total
        data_total = filesize + _pad4(filesize)
        if data_offset + data_total > length:
            raise CpioFormatError(f"cpio entry {name!r} declares {filesize} data bytes, past the end of the "
                                  f"archive ({length - data_offset} left)")
        if name == TRAILER_NAME:
            rest = length - data_offset - data_total
            if filesize:
                _read_exact(stream, data_total, "trailer data", data_offset)
            # Trailing zero padding is allowed (ramdisks are often padded); anything else is not.
            while rest > 0:
                chunk = _read_exact(stream, min(rest, _READ_CHUNK), "padding after the trailer", length - rest)
                if chunk.strip(b"\0"):
                    raise CpioFormatError("cpio archive has data after the TRAILER!!! entry")
                rest -= len(chunk)
            return
        if not name:
            raise CpioFormatError(f"cpio entry at offset {pos} has an empty name")
        if stat.S_IFMT(mode) not in _ALLOWED_TYPES:
            raise CpioFormatError(f"cpio entry {name!r} has an unknown file type (mode {mode:#o})")
        member = CpioMember(name=name, ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime,
                            size=filesize, dev_major=dmaj, dev_minor=dmin, rdev_major=rmaj, rdev_minor=rmin,
                            data_offset=data_offset)
        state = {"left": filesize}

        def data_chunks(state: dict[str, int] = state, offset: int = data_offset) -> Iterator[bytes]:
            while state["left"] > 0:
                n = min(state["left"], _READ_CHUNK)
                chunk = _read_exact(stream, n, "file data", offset)
                state["left"] -= n
                offset += n
                yield chunk

        yield member, data_chunks()
        # Skip whatever the consumer did not read (a seek when the stream can: unpacking copies file data with
        # sendfile and never reads it here), then the data padding.
        if state["left"] and seekable:
            stream.seek(state["left"], io.SEEK_CUR)
            state["left"] = 0
        for _ in data_chunks():
            pass
        if _pad4(filesize):
            pad = _read_exact(stream, _pad4(filesize), "data padding", data_offset + filesize)
            if pad.strip(b"\0"):
                raise CpioFormatError(f"cpio entry {name!r} has non-zero padding")
        pos = data_offset + data_total


def decode(data: bytes, *, max_member_size: int = 64 << 20) -> list[CpioMember]:
    """All members of an in-memory archive, each with ``data`` filled (members above ``max_member_size`` refused)."""
    out: list[CpioMember] = []
    for member, chunks in iter_members(io.BytesIO(data), len(data)):
        if member.size > max_member_size:
            raise CpioFormatError(f"cpio entry {member.name!r} is {member.size} bytes, above the "
                                  f"{max_member_size}-byte limit for in-memory decoding")
        body = b"".join(chunks)
        out.append(dataclasses.replace(member, data=body))
    return out
