"""The launch server's image store: each image's root tree unpacked once, shared read-only by its enclaves.

Unpacking the ramdisks into an enclave's tmpfs root costs time in proportion to the image (about 45 ms for a 26 MB
Python image here, seconds for large ones) and memory per enclave.  While a launch server
(:mod:`~enclavekit.runtime.launch_server`) runs, its supervisors unpack an image once into a directory of this store,
and every enclave of that image gets an overlay root instead: the store's tree as the read-only lower layer, the
enclave's own size-limited tmpfs as the upper layer that takes every write (``_sandbox_init`` mounts it).  The
enclave cannot change the shared tree; what it writes stays in its memory.

Where: a directory of ``/dev/shm`` (memory, like every root here; no mount is created), ``enclavekit-images-<euid>``
mode 0700, one sub-directory per server, one entry per image.  An entry is named after the image's PCR0 (the digest
of the kernel, cmdline and every ramdisk: the tree's whole source), filled from the descriptor that was measured,
and renamed into place only once complete, so a name always means complete, measured content.

Who keeps what: a supervisor holds a shared ``flock`` on its entry's directory for its enclave's life; whoever
removes an entry takes the lock exclusively first (and a user re-checks, after locking, that the name still is the
directory it locked).  The server holds ``.server`` locked for its life.  Entries go when the server exits, when
more than :data:`MAX_ENTRIES` are kept, and, for a store whose server is gone, when their last enclave ends (or the
next server starts).  Nothing is kept when ``/dev/shm`` is not a memory filesystem or lacks room for the image.

Memory accounting differs from a private root: the shared tree's pages are charged to the supervisor (the host),
not to each enclave's memory limit (docs/runtime.md).

Facts: besides trees, the store remembers what a launch read from an EIF file besides its tree (PCRs, size,
metadata, the application's cmd/env/user) under the file's identity (device, inode, size, modification and change
times), so that the next launch of the same, unchanged file reads nothing from it.  What makes this safe is not the
identity: everything remembered (facts and tree) comes from ONE sealed in-memory copy of the file, measured and
unpacked from that copy only, so an enclave always runs exactly the content its PCRs describe.  The identity only
says when to read the file again.  It changes with every ``write``, ``truncate`` or replacement of the file (the
change time cannot be set by a process; facts are kept only for a file not changed within
:data:`RACY_MARGIN_NS` before it was read, and unchanged while it was read).  A file changed through a shared
writable mapping may not get new timestamps: it then launches as the content read before, with that content's
PCRs, until its identity changes (or the server exits).  The facts live in the store's private directory: nobody
but its owner can write them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ImageStore", "StoreEntry", "FileIdentity", "MAX_ENTRIES", "DEFAULT_BASE", "RACY_MARGIN_NS", "ACTIVE",
           "sweep_dead_stores"]

DEFAULT_BASE = Path("/dev/shm")  # noqa: S108 - a 0700 directory of ours is made and checked there
MAX_ENTRIES = 16
_KEY = re.compile(r"[0-9a-f]{96}")
_SERVER_LOCK = ".server"
_MEMORY_FS = {0x01021994, 0x858458F6}  # TMPFS_MAGIC, RAMFS_MAGIC
_FREE_MARGIN = 64 << 20  # leave this much of the filesystem free besides the image
RACY_MARGIN_NS = 1_000_000_000  # 1 s: far more than a timestamp tick (at most 10 ms)
_FACTS_DIR = "facts"
_YOUNG_S = 10.0
_FACTS_MAX = 256 << 10

ACTIVE: ImageStore | None = None  # set by the launch server; its forked supervisors use it


@dataclass(frozen=True)
class FileIdentity:
    """What changes when a file is written, truncated or replaced (see the module docstring for its limits)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.dev, self.ino, self.size, self.mtime_ns,
                                          self.ctime_ns]).encode()).hexdigest()[:40]


def _is_memory_fs(path: Path) -> bool:
    # statfs's f_type is not in os.statvfs; /proc/self/mountinfo says which filesystem holds the path
    try:
        real = os.path.realpath(path)
        best, kind = "", ""
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5:
                    continue
                point = fields[4].encode().decode("unicode_escape")
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, kind = point, right.split(" ", 1)[0]
    except OSError:
        return False
    return kind in ("tmpfs", "ramfs")


def _private_dir(path: Path) -> bool:
    """Create ``path`` 0700, or accept it only if it is a real directory of ours, 0700 (``/dev/shm`` is shared)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0


def _lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind)
    except BlockingIOError:
        return False
    return True


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class StoreEntry:
    """An image's tree in the store, held (shared lock) until :meth:`release`."""

    def __init__(self, store: ImageStore, key: str, fd: int) -> None:
        self.store = store
        self.key = key
        self.path = store.directory / key
        self._fd: int | None = fd

    def release(self) -> None:
        """Let go of the entry; the last user of a store whose server is gone removes it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        os.close(fd)
        if not self.store.server_alive():
            self.store.remove_unused(even_dir=True, tidy_parent=True)


class ImageStore:
    """One server's entries under ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path, *, max_entries: int = MAX_ENTRIES) -> None:
        self.directory = directory
        self.max_entries = max_entries
        self._server_fd: int | None = None

    # ---- the server's side

    @classmethod
    def create(cls, base: Path = DEFAULT_BASE) -> ImageStore | None:
        """A new store for this (server) process, or None when ``base`` is not usable (not memory, not ours)."""
        if not _is_memory_fs(base):
            return None
        parent = base / f"enclavekit-images-{os.geteuid()}"
        if not _private_dir(parent):
            return None
        sweep_dead_stores(base)
        try:
            directory = Path(tempfile.mkdtemp(prefix="s", dir=parent))
            fd = os.open(directory / _SERVER_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        store = cls(directory)
        store._server_fd = fd
        return store

    def forget_server_lock(self) -> None:
        """In a process forked from the server: drop the inherited descriptor (the server keeps its lock)."""
        if self._server_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._server_fd)
            self._server_fd = None

    def close(self) -> None:
        """The server is leaving: release ``.server``; entries still in use stay until their last enclave ends."""
        if self._server_fd is not None:
            os.close(self._server_fd)
            self._server_fd = None
        self.remove_unused(even_dir=True, tidy_parent=True)

    def server_alive(self) -> bool:
        try:
            fd = os.open(self.directory / _SERVER_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return not _lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)

    # ---- entries

    def _entries(self) -> list[Path]:
        try:
            return [p for p in self.directory.iterdir() if _KEY.fullmatch(p.name)]
        except OSError:
            return []

    def _remove_if_unused(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if not _lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                return False  # an enclave runs on it
            if not _same(path, fd):
                return False  # removed and filled again between our open and our lock: not the one we locked
            trash = path.with_name(f".gone-{path.name}-{os.getpid()}")
            try:
                os.rename(path, trash)
            except OSError:
                return False
        finally:
            os.close(fd)
        _remove_tree(trash)
        return True

    def remove_unused(self, *, even_dir: bool = False, tidy_parent: bool = False) -> None:
        """Remove every entry no enclave uses (and left-over partial ones); with ``even_dir``, the store itself
        when nothing is left and no server holds it; with ``tidy_parent`` too, the user's directory if empty."""
        for path in self._entries():
            self._remove_if_unused(path)
        with contextlib.suppress(OSError):
            for p in self.directory.iterdir():
                if p.name.startswith((".fill-", ".gone-")) and not _pid_alive(p.name):
                    _remove_tree(p)
        if even_dir and not self._entries() and not self.server_alive():
            _remove_tree(self.directory / _FACTS_DIR)  # facts without their trees are of no use
            with contextlib.suppress(OSError):
                (self.directory / _SERVER_LOCK).unlink()
            with contextlib.suppress(OSError):
                self.directory.rmdir()
                if tidy_parent:
                    self.directory.parent.rmdir()  # the last store of this user: leave /dev/shm as it was

    # ---- facts

    def facts_for(self, identity: FileIdentity) -> dict[str, Any] | None:
        """What was remembered for exactly this file identity, or None."""
        path = self.directory / _FACTS_DIR / f"{identity.key()}.json"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(_FACTS_MAX + 1)
        try:
            obj = json.loads(raw) if len(raw) <= _FACTS_MAX else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or obj.get("identity") != identity.key() or not isinstance(obj.get("facts"),
                                                                                                 dict):
            return None
        facts: dict[str, Any] = obj["facts"]
        return facts

    def remember(self, identity: FileIdentity, facts: dict[str, Any], *, read_from_ns: int,
                 identity_after: FileIdentity) -> bool:
        """Keep ``facts`` for ``identity`` if that is safe: the file was not changed within :data:`RACY_MARGIN_NS`
        before ``read_from_ns`` (``time.time_ns()`` before it was copied) nor while it was read."""
        if identity_after != identity or identity.ctime_ns >= read_from_ns - RACY_MARGIN_NS:
            return False
        directory = self.directory / _FACTS_DIR
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)
            path = directory / f"{identity.key()}.json"
            tmp = directory / f".{identity.key()}.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(json.dumps({"identity": identity.key(), "facts": facts}).encode())
            os.replace(tmp, path)
        except (OSError, TypeError, ValueError):
            return False
        return True

    def acquire(self, key: str, fill: Callable[[Path], None], *, size_hint: int,
                files_hint: int = 0) -> StoreEntry | None:
        """The entry ``key`` (an image's PCR0 in hex), filled by ``fill(directory)`` if it is not there yet.

        Returns None (the caller unpacks privately) when the store cannot take the image: not enough room, or
        the store is gone.  Errors of ``fill`` propagate (nothing partial is left).
        """
        if not _KEY.fullmatch(key):
            raise ValueError("a store key is a PCR0 in lowercase hex")
        path = self.directory / key
        for _ in range(3):
            entry = self._hold(key, path)
            if entry is not None:
                return entry
            self._evict_for_one()
            if not self._room_for(size_hint, files_hint):
                return None
            staging = self.directory / f".fill-{key[:16]}-{os.getpid()}"
            try:
                os.mkdir(staging, 0o755)
                fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                _remove_tree(staging)
                return None
            fcntl.flock(fd, fcntl.LOCK_SH)  # held from before its name appears: never evicted under us
            try:
                fill(staging)
                os.rename(staging, path)  # complete: from now on the name means this content
            except OSError:
                os.close(fd)
                _remove_tree(staging)
                if not path.is_dir():  # a concurrent fill that won the rename is fine; anything else is not
                    return None
                continue
            except BaseException:
                os.close(fd)
                _remove_tree(staging)
                raise
            with contextlib.suppress(OSError):
                os.utime(fd)
            return StoreEntry(self, key, fd)
        return None

    def hold(self, key: str) -> StoreEntry | None:
        """The entry ``key`` if it is there (held), without filling it."""
        if not _KEY.fullmatch(key):
            return None
        return self._hold(key, self.directory / key)

    def _hold(self, key: str, path: Path) -> StoreEntry | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            # a remover may have renamed it between our open and our lock: the name must still be this directory
            if not _same(path, fd):
                os.close(fd)
                return None
        except OSError:
            os.close(fd)
            return None
        with contextlib.suppress(OSError):
            os.utime(fd)  # recently used: eviction goes by age
        return StoreEntry(self, key, fd)

    def _room_for(self, size: int, files: int) -> bool:
        """Room for ``size`` bytes and ``files`` inodes, leaving a quarter of the filesystem's space and inodes free
        for everyone else (``/dev/shm`` is shared: shm_open, sem_open), evicting unused entries if that helps."""
        for _ in range(self.max_entries + 1):
            try:
                st = os.statvfs(self.directory)
            except OSError:
                return False
            space_ok = st.f_bavail * st.f_frsize >= size + max(_FREE_MARGIN, st.f_blocks * st.f_frsize // 4)
            inodes_ok = st.f_files == 0 or st.f_favail >= files + st.f_files // 4
            if space_ok and inodes_ok:
                return True
            if not self._evict_oldest():
                return False
        return False

    def _evict_oldest(self) -> bool:
        aged = []
        for p in self._entries():
            with contextlib.suppress(OSError):
                aged.append((p.stat().st_mtime_ns, p))
        return any(self._remove_if_unused(p) for _, p in sorted(aged))

    def _evict_for_one(self) -> None:
        entries = self._entries()
        if len(entries) < self.max_entries:
            return
        aged = []
        for p in entries:
            with contextlib.suppress(OSError):
                aged.append((p.stat().st_mtime_ns, p))
        for _, p in sorted(aged):
            if self._remove_if_unused(p) and len(self._entries()) < self.max_entries:
                return


def sweep_dead_stores(base: Path = DEFAULT_BASE) -> None:
    """Remove what stores of servers that are gone left behind (entries no enclave uses; the store when empty).

    Run by every new server and by ``clean_stale`` (each ``run-enclave`` and ``describe-enclaves``), so a server
    killed with SIGKILL does not leave its trees in memory for long.  Another live server's store is left alone.
    """
    parent = base / f"enclavekit-images-{os.geteuid()}"
    try:
        st = os.lstat(parent)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        return
    with contextlib.suppress(OSError):
        for leftover in sorted(parent.iterdir()):
            if not leftover.is_dir() or leftover.is_symlink():
                continue
            with contextlib.suppress(OSError):
                if time.time() - leftover.stat().st_mtime < _YOUNG_S:
                    continue  # a server that is still creating its store (not locked yet)
            other = ImageStore(leftover)
            if not other.server_alive():
                other.remove_unused(even_dir=True)


def _same(path: Path, fd: int) -> bool:
    """Is ``path`` (not followed) the directory open on ``fd``?"""
    try:
        named = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _pid_alive(name: str) -> bool:
    """For ``.fill-<key>-<pid>`` / ``.gone-<key>-<pid>``: is that process still there (still working on it)?"""
    tail = name.rsplit("-", 1)[-1]
    if not tail.isdigit():
        return False
    try:
        os.kill(int(tail), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
