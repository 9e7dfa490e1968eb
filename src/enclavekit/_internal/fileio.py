"""File helpers shared by readers and writers: a seekable window of a file, and a durable directory entry."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any

__all__ = ["FileWindow", "fileno_of", "fsync_dir"]


def fileno_of(f: IO[bytes]) -> int | None:
    """The OS file descriptor behind ``f``, if it has one (a file on disk; not an in-memory file)."""
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


class FileWindow(io.RawIOBase):
    """A read-only, seekable view of ``[offset, offset + length)`` of a file (an EIF section, a layer inside a tar).

    A file with a descriptor is read with ``pread`` (no shared file position: other readers of the same descriptor,
    a forked process, are not disturbed); any other file object with ``seek`` and ``read``.
    """

    def __init__(self, f: IO[bytes], offset: int, length: int) -> None:
        super().__init__()
        self._f, self._offset, self._length, self._pos = f, offset, length, 0
        self._fd = fileno_of(f)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._length - self._pos)
        if n <= 0:
            return 0
        if self._fd is not None:
            data = os.pread(self._fd, n, self._offset + self._pos)
        else:
            self._f.seek(self._offset + self._pos)
            data = self._f.read(n)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
