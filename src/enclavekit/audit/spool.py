"""The trail's local spool: durable, append-only JSON lines with group commit, shared by several processes.

``append(record)`` returns only after the record's line is written and ``fsync``'d; that is the moment a caller
(the KMS answering a request) may acknowledge.  Group commit: one writer thread per process takes every record
queued while the previous ``fsync`` ran and writes them with one ``write`` and one ``fsync``.  Several processes
(pre-forked KMS workers) may append to one spool: each batch is written under an exclusive ``flock`` on
``spool.lock``, and the ``fsync`` runs outside the lock so that the processes' flushes overlap.

The delivering process reads complete lines from a :class:`SpoolCursor` (file identity + offset).  A writer killed
in the middle of a ``write`` leaves a last line without its newline: it was never acknowledged, readers ignore it
and the next writer cuts it off.  Once everything has been delivered, :meth:`Spool.compact` replaces the file by an
empty one (rename); a cursor that names a replaced file therefore means "all of it was delivered" (the delivery
state keeps the cursor, see trail.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclavekit._internal.fileio import fsync_dir
from enclavekit.errors import AuditError, AuditSpoolError

__all__ = ["SpoolCursor", "Spool"]

_SPOOL = "spool.jsonl"
_LOCK = "spool.lock"
_MAX_LINE = 1 << 20          # one record is at most 1 MiB (§1.1 caps keep real records far below)


@dataclass(frozen=True)
class SpoolCursor:
    """Where delivery stands: the spool file's inode and the offset of the first undelivered byte."""

    inode: int
    offset: int

    def to_json(self) -> dict[str, int]:
        return {"inode": self.inode, "offset": self.offset}

    @classmethod
    def from_json(cls, obj: Any) -> SpoolCursor:
        if not isinstance(obj, dict) or not isinstance(obj.get("inode"), int) or not isinstance(
                obj.get("offset"), int) or obj["offset"] < 0:
            raise AuditSpoolError("the delivery state holds a malformed spool cursor")
        return cls(inode=obj["inode"], offset=obj["offset"])


class _Pending:
    __slots__ = ("done", "error", "line")

    def __init__(self, line: bytes) -> None:
        self.line = line
        self.done = False
        self.error: BaseException | None = None


class _Flock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


class Spool:
    """See the module doc.  Thread-safe; safe across processes that open the same directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / _SPOOL
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fd = self._open()
        except OSError as exc:
            raise AuditError(f"cannot open the trail spool in {self.directory}: {exc.strerror}") from exc
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._closed = False
        self.batches = 0          # write+fsync rounds: with group commit, fewer than appended records
        self.appended = 0
        self._writer = threading.Thread(target=self._run, name="audit-spool-writer", daemon=True)
        self._writer.start()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        # a new file's directory entry is durable only once the directory is fsync'd: without it, records
        # acknowledged after their own fsync could vanish with the whole file on a power loss
        try:
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        return fd

    # ------------------------------------------------------------------------------------------ appending

    def append(self, record: Mapping[str, Any]) -> None:
        """Durably append one record; returns after its line is fsync'd (raises :class:`AuditSpoolError` if not)."""
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        if len(line) > _MAX_LINE:
            raise ValueError(f"an audit record of {len(line)} bytes exceeds {_MAX_LINE}")
        pending = _Pending(line + b"\n")
        with self._cond:
            if self._closed:
                raise RuntimeError("the spool is closed")
            self._queue.append(pending)
            self._cond.notify_all()
            while not pending.done:
                self._cond.wait()
        if pending.error is not None:
            raise AuditSpoolError(f"cannot append to the trail spool {self.path}: {pending.error}") \
                from pending.error

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        os.close(self._fd)
        os.close(self._lock_fd)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue and self._closed:
                    return
                batch, self._queue = self._queue, []
            error: BaseException | None = None
            try:
                self._write(b"".join(p.line for p in batch))
            except OSError as exc:
                error = exc
            with self._cond:
                for pending in batch:
                    pending.error = error
                    pending.done = True
                self._cond.notify_all()

    def _write(self, data: bytes) -> None:
        with _Flock(self._lock_fd):
            self._follow_rename()
            self._cut_torn_tail()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            fd = self._fd
        # fsync outside the lock: a concurrent writer's fsync flushes our lines too; we still wait for our own
        os.fsync(fd)
        self.batches += 1
        self.appended += data.count(b"\n")

    def _follow_rename(self) -> None:
        """After :meth:`compact` replaced the file, write to the new one (called under the lock)."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = -1
        if current != os.fstat(self._fd).st_ino:
            old = self._fd
            self._fd = self._open()
            os.close(old)

    def _cut_torn_tail(self) -> None:
        """A writer killed mid-``write`` may leave a line without its newline; it was never acknowledged."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        os.ftruncate(self._fd, _last_newline(self._fd, size))

    # ------------------------------------------------------------------------------------------ reading

    def start(self) -> SpoolCursor:
        """A cursor at the beginning of the current spool file."""
        with _Flock(self._lock_fd):
            return SpoolCursor(inode=self._current_inode(), offset=0)

    def _current_inode(self) -> int:
        try:
            return os.stat(self.path).st_ino
        except FileNotFoundError:
            self._follow_rename()
            return os.stat(self.path).st_ino

    def resolve(self, cursor: SpoolCursor) -> SpoolCursor:
        """A cursor naming a replaced file means that file was fully delivered: continue at 0 of the current one."""
        inode = self._current_inode()
        return cursor if cursor.inode == inode else SpoolCursor(inode=inode, offset=0)

    def pending_bytes(self, cursor: SpoolCursor) -> int:
        cursor = self.resolve(cursor)
        return max(0, os.stat(self.path).st_size - cursor.offset)

    def read(self, cursor: SpoolCursor, max_bytes: int) -> tuple[list[dict[str, Any]], SpoolCursor]:
        """Complete records from ``cursor``, about ``max_bytes`` of them (at least one if any), and the cursor after."""
        cursor = self.resolve(cursor)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise AuditSpoolError(f"cannot read the trail spool {self.path}: {exc.strerror}") from exc
        try:
            if os.fstat(fd).st_ino != cursor.inode:
                return [], cursor          # replaced meanwhile: the caller comes back with resolve()
            size = os.fstat(fd).st_size
            if cursor.offset > size:
                raise AuditSpoolError(f"the delivery cursor ({cursor.offset}) is past the end of the spool ({size})")
            want = min(size - cursor.offset, max(max_bytes, _MAX_LINE + 1))
            data = os.pread(fd, want, cursor.offset)
        finally:
            os.close(fd)
        end = data.rfind(b"\n")
        if end < 0:
            return [], cursor
        records: list[dict[str, Any]] = []
        consumed = 0
        for line in data[: end + 1].split(b"\n")[:-1]:
            if records and consumed + len(line) + 1 > max_bytes:
                break
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise AuditSpoolError(f"the trail spool holds a damaged line at offset {cursor.offset + consumed}") \
                    from exc
            if not isinstance(record, dict):
                raise AuditSpoolError(f"the trail spool holds a non-object at offset {cursor.offset + consumed}")
            records.append(record)
            consumed += len(line) + 1
        return records, SpoolCursor(inode=cursor.inode, offset=cursor.offset + consumed)

    def compact(self, cursor: SpoolCursor) -> SpoolCursor:
        """If everything up to the end was delivered, replace the file with an empty one; returns the new cursor."""
        with _Flock(self._lock_fd):
            cursor = self.resolve(cursor)
            if os.stat(self.path).st_size != cursor.offset or cursor.offset == 0:
                return cursor
            tmp = self.directory / (_SPOOL + ".new")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            fsync_dir(self.directory)
            self._follow_rename()
            return SpoolCursor(inode=os.stat(self.path).st_ino, offset=0)


def _last_newline(fd: int, size: int) -> int:
    """Offset just after the last newline before ``size`` (0 if none)."""
    pos = size
    while pos > 0:
        step = min(64 * 1024, pos)
        chunk = os.pread(fd, step, pos - step)
        idx = chunk.rfind(b"\n")
        if idx >= 0:
            return pos - step + idx + 1
        pos -= step
    return 0
