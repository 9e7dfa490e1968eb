"""The enclave supervisor: one detached process per enclave, like nitro-cli's "enclave process" (spec §3.1, §3.11).

``run-enclave`` calls :func:`launch`, which starts ``python -m enclavekit.runtime.supervisor REPORT_FD`` in a new
session; that process reads the :class:`RunRequest` on stdin and forks once more (double fork), so the supervisor
is nobody's child and outlives the CLI.  The supervisor then, in order:

1. reads the EIF, checks its CRC (E35) and, if it is signed, its signature (E59), and measures it (§1.7, §2.2);
2. reserves an enclave id, a unique name and a CID in the registry (:mod:`enclavekit.runtime.registry`);
3. draws memory and CPUs from the allocator's pool (nitro-cli's E20–E27);
4. creates the enclave's vsock channel directory and starts *this enclave's* NSM on ``<run>/<id>/nsm.sock``
   (image PCRs from step 1, PCR3/PCR4 from the parent identity, debug mode zeroing the image PCRs), and its
   heartbeat listener on ``<run>/<id>/heartbeat.sock`` (§3.8: the enclave's (3, 9000); one path per enclave, so
   parallel launches cannot race as they do with nitro-cli, aws-nitro-enclaves-cli#516; it is not visible
   inside: the sandbox's PID 1 connects to it before it leaves the host's file system);
5. unpacks the EIF's ramdisks into the sandbox's memory-only root (from the launcher forked into the enclave's
   cgroup, which is charged for it): ``rootfs/`` becomes ``/``; ``cmd``, ``env``
   (and ``workdir``/``user`` when present) define the application; the bootstrap ``init`` and ``nsm.ko`` are
   measured but never executed;
6. starts the sandbox with the NSM socket bound at ``/run/enclavekit/nsm.sock`` and the vsock channel
   directories bound at ``/run/enclavekit/vsock/3`` (the parent's listeners, read-only, so listeners created
   later are visible) and ``/run/enclavekit/vsock/<cid>`` (the enclave's own, writable, reachable by the parent),
   and waits for the application's boot and the 0xB7 heartbeat that PID 1 then sends; an application that
   cannot start, exits during its boot, or whose heartbeat does not come within nitro-cli's timeout is E36 with
   the last console lines;
7. reports ``EnclaveRunInfo`` to the CLI, then serves the control socket (describe, terminate, console) and
   copies the console to ``<run>/<id>/console.log`` until the enclave ends or is terminated;
8. cleans up: the sandbox (processes, cgroup, mounts), the NSM and heartbeat sockets, the control socket, the
   vsock directory, the allocation.  The console log stays.

Audit (issue 6, :mod:`enclavekit.runtime.audit`): ``RunEnclave`` is appended on a thread once step 7 has reported
(the launch never waits for it); ``EnclaveOutOfMemory`` when the application ended and the cgroup counted an OOM
kill, and ``TerminateEnclave`` on a terminate request, both before step 8 (so before the terminate reply);
``EnclaveBootFailure`` (E36) before the failure is reported.  The records are delivered, without sealing, as the
supervisor leaves.

If the supervisor itself is killed (even with SIGKILL) the sandbox dies with it (its launcher and PID 1 have
``PR_SET_PDEATHSIG``), and the next registry reader finds the stale record and cleans up after it
(:func:`clean_stale`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn

from enclavekit._internal.fds import detach_stdio, double_fork, max_fd
from enclavekit._internal.fileio import FileWindow, fileno_of
from enclavekit.errors import (
    ConfigError,
    EIFFormatError,
    EnclaveKitError,
    FileOperationError,
    FormatError,
    SandboxBootError,
)
from enclavekit.formats.cpio import MAGIC as CPIO_MAGIC
from enclavekit.formats.cpio import iter_members
from enclavekit.formats.eif import SectionType
from enclavekit.image.describe import image_metadata
from enclavekit.image.eif_reader import EIFInfo, measure_eif
from enclavekit.nsm.server import NSMServer
from enclavekit.runtime import _sandbox_init, image_store
from enclavekit.runtime._sandbox_init import HEARTBEAT_BYTE, HEARTBEAT_PORT
from enclavekit.runtime.allocator import AllocationLedger, check_memory_for_image
from enclavekit.runtime.audit import RuntimeAudit
from enclavekit.runtime.console import ConsoleRecorder, tail_lines
from enclavekit.runtime.control import ControlServer, Request, encode_reply
from enclavekit.runtime.image_store import FileIdentity
from enclavekit.runtime.registry import (
    PARENT_CID,
    EnclaveRecord,
    Registry,
    default_enclave_name,
    mount_channel_dir,
    read_instance_id,
    unmount_channel_dir,
)
from enclavekit.runtime.sandbox import Sandbox, SandboxProcess, SandboxSpec

__all__ = [
    "HEARTBEAT_BYTE",
    "HEARTBEAT_PORT",
    "INSIDE_NSM_SOCKET",
    "INSIDE_VSOCK_DIR",
    "PARENT_CONFIG",
    "RunRequest",
    "ApplicationSpec",
    "boot_timeout",
    "read_application",
    "unpack_rootfs",
    "load_parent_identity",
    "launch",
    "clean_stale",
    "main",
]

_TIMEOUT_UNIT_S = 90.0  # TIMEOUT_MINUTE_MS
INSIDE_RUN_DIR = "/run/enclavekit"
INSIDE_NSM_SOCKET = f"{INSIDE_RUN_DIR}/nsm.sock"
INSIDE_VSOCK_DIR = f"{INSIDE_RUN_DIR}/vsock"
DEFAULT_PATH = "/sbin:/usr/sbin:/bin:/usr/bin"  # §3.10 step 3: init's PATH
PARENT_CONFIG = "parent.json"
_SMALL_FILE_MAX = 1 << 20  # cmd, env, workdir, user, etc/passwd, etc/group
# read-ahead when walking a ramdisk: a header and its name, not the data that follows (skipped, or sent by the kernel)
_HEADER_READ = 4096
_CONSOLE_TAIL_LINES = 20
_GIB = 1024 ** 3


# ---------------------------------------------------------------- requests

@dataclass(frozen=True)
class RunRequest:
    """What ``run-enclave`` asks for (already parsed and checked by the CLI)."""

    eif_path: str
    memory_mib: int
    cpu_count: int | None = None
    cpu_ids: tuple[int, ...] | None = None
    enclave_cid: int | None = None
    debug_mode: bool = False
    enclave_name: str | None = None
    parent_role_arn: str | None = None
    parent_instance_id: str | None = None
    run_dir: str = "/run/enclavekit"
    state_home: str = "/var/lib/enclavekit"
    owner_uid: int = 0
    boot_timeout: float | None = None
    # docs/unmodified-apps.md: /dev/nsm and AF_VSOCK served by this supervisor (seccomp user notification)
    device_emulation: bool = True

    def __post_init__(self) -> None:
        if (self.cpu_count is None) == (self.cpu_ids is None):
            raise ValueError("give exactly one of cpu_count and cpu_ids")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cpu_ids"] = list(self.cpu_ids) if self.cpu_ids is not None else None
        return d

    @classmethod
    def from_json(cls, obj: Any) -> RunRequest:
        if not isinstance(obj, dict):
            raise ValueError("run request must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise ValueError(f"unknown run request fields {sorted(unknown)}")
        missing = {"eif_path", "memory_mib"} - set(obj)
        if missing:
            raise ValueError(f"missing run request fields {sorted(missing)}")
        # JSON from another process (the launch server's client): every field has exactly its type (a bool is
        # not an int here, an int is not a str)
        for name, value in obj.items():
            kind = _REQUEST_TYPES[name]
            ok = (value is None and kind.endswith("?")) or {
                "str": isinstance(value, str),
                "int": isinstance(value, int) and not isinstance(value, bool),
                "bool": isinstance(value, bool),
                "number": isinstance(value, (int, float)) and not isinstance(value, bool),
                "ints": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                        for v in value),
            }[kind.rstrip("?")]
            if not ok:
                raise ValueError(f"run request field {name} must be {_TYPE_NAMES[kind]}, not "
                                 f"{type(value).__name__}")
        kwargs = dict(obj)
        if kwargs.get("cpu_ids") is not None:
            kwargs["cpu_ids"] = tuple(kwargs["cpu_ids"])
        return cls(**kwargs)


# RunRequest.from_json: the JSON type of each field ("?": or null)
_REQUEST_TYPES = {
    "eif_path": "str", "memory_mib": "int", "cpu_count": "int?", "cpu_ids": "ints?", "enclave_cid": "int?",
    "debug_mode": "bool", "enclave_name": "str?", "parent_role_arn": "str?", "parent_instance_id": "str?",
    "run_dir": "str", "state_home": "str", "owner_uid": "int", "boot_timeout": "number?",
    "device_emulation": "bool",
}
_TYPE_NAMES = {
    "str": "a string", "int": "an integer", "bool": "a boolean", "number": "a number",
    "ints": "a list of integers",
}
_TYPE_NAMES.update({f"{k}?": f"{v} or null" for k, v in list(_TYPE_NAMES.items())})


def boot_timeout(eif_size: int, memory_mib: int) -> float:
    """§3.8 ``calculate_necessary_timeout``: 90 s per started 6 GiB of image plus 90 s per started 100 GiB."""
    eif_units = max(1, -(-eif_size // (6 * _GIB)))
    mem_units = max(1, -(-(memory_mib * 1024 * 1024) // (100 * _GIB)))
    return _TIMEOUT_UNIT_S * (eif_units + mem_units)


def load_parent_identity(state_home: Path) -> tuple[str | None, str | None]:
    """``(role ARN, instance id)`` from ``<state dir>/parent.json`` (``{"role_arn": ..., "instance_id": ...}``).

    Missing file: ``(None, None)``.  These give PCR3/PCR4 when run-enclave has no ``--parent-*`` flags.
    """
    path = state_home / PARENT_CONFIG
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise FileOperationError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not JSON") from exc
    if not isinstance(obj, dict) or set(obj) - {"role_arn", "instance_id"}:
        raise ConfigError(f"{path}: expected an object with role_arn and/or instance_id")
    role, inst = obj.get("role_arn"), obj.get("instance_id")
    if not all(v is None or (isinstance(v, str) and 0 < len(v) <= 2048) for v in (role, inst)):
        raise ConfigError(f"{path}: role_arn and instance_id must be non-empty strings")
    return role, inst


# ---------------------------------------------------------------- the application inside the EIF

@dataclass(frozen=True)
class ApplicationSpec:
    """The application defined by the customer ramdisk: ``cmd`` lines, ``env`` lines, workdir and user."""

    argv: tuple[str, ...]
    env: dict[str, str]
    workdir: str = "/"
    uid: int = 0
    gid: int = 0


@dataclass
class _LoadedImage:
    """What a launch takes from its EIF: PCRs (``describe-enclaves`` JSON shape), size, metadata, application, and
    how the root is filled: ``populate`` (unpack the sealed copy into a private root) or ``lower`` (a shared tree
    of the image store)."""

    measurements: dict[str, str]
    file_size: int
    metadata: dict[str, Any] | None
    app: ApplicationSpec
    populate: Callable[[Path], None] | None = None
    lower: str | None = None
    share: Callable[[], None] | None = None  # put the tree in the image store (after the allocation)

    def facts(self, key: str) -> dict[str, Any]:
        """What the image store remembers for the next launch of the same file (everything but the tree)."""
        return {"key": key, "measurements": self.measurements, "file_size": self.file_size,
                "metadata": self.metadata, "argv": list(self.app.argv), "env": self.app.env,
                "workdir": self.app.workdir, "uid": self.app.uid, "gid": self.app.gid}

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> _LoadedImage:
        """The inverse of :meth:`facts`; TypeError/ValueError for anything that does not have their shape."""
        m, argv, env, metadata = facts["measurements"], facts["argv"], facts["env"], facts["metadata"]
        if not (isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
                and isinstance(facts["key"], str) and isinstance(m.get("PCR0"), str)):
            raise ValueError("measurements")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise ValueError("argv")
        if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise ValueError("env")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError("metadata")
        ints = [facts[k] for k in ("file_size", "uid", "gid")]
        if not all(type(i) is int and i >= 0 for i in ints) or not isinstance(facts["workdir"], str):
            raise TypeError("file_size, uid, gid, workdir")
        app = ApplicationSpec(argv=tuple(argv), env=dict(env), workdir=facts["workdir"], uid=ints[1], gid=ints[2])
        return cls(measurements=dict(m), file_size=ints[0], metadata=metadata, app=app)


def _store_key(info: EIFInfo) -> str:
    """The image store's name for an image's tree: a digest of PCR0/1/2 and of the section table (types and sizes).

    PCR0 alone does not fix the tree: it hashes the sections' bytes end to end, so an EIF with a ramdisk relabelled
    as a kernel section has the same PCR0 and unpacks differently.  With the ordered types and sizes the hashed
    bytes split into the same sections, so equal keys mean equal ramdisks.
    """
    m = info.measurements
    table = [[int(s.section_type), s.size] for s in info.sections]
    material = json.dumps([m.pcr0.hex(), m.pcr1.hex(), m.pcr2.hex(), table]).encode()
    return hashlib.sha384(material).hexdigest()


def _snapshot(fd: int, path: str, size: int) -> IO[bytes]:
    """A sealed in-memory copy of the ``size`` bytes of the file open on ``fd`` (a memfd nobody can change any more).

    Measuring, reading the application and unpacking all read this copy, so they see one and the same content even
    if the file is written meanwhile (also through a shared mapping, which need not change its timestamps).  Exactly
    ``size`` bytes (the size when it was opened) are copied: a file that grows meanwhile cannot make the copy grow,
    one that shrinks is refused.
    """
    try:
        copy = os.memfd_create("enclavekit-eif", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise FileOperationError(f"cannot copy the EIF {path} into memory: {exc.strerror or exc}") from exc
    try:
        offset = 0
        while offset < size:
            sent = os.sendfile(copy, fd, offset, min(size - offset, 1 << 30))
            if sent == 0:
                raise OSError(errno.EIO, "the file became shorter while it was copied")
            offset += sent
        os.lseek(copy, 0, os.SEEK_SET)
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    except OSError as exc:
        os.close(copy)
        raise FileOperationError(f"cannot copy the EIF {path} into memory: {exc.strerror or exc}",
                                 details={"File": path, "failing operation": "Read"}) from exc
    return os.fdopen(copy, "rb")


def _ramdisks(info: EIFInfo) -> tuple[Any, ...]:
    return info.sections_of(SectionType.RAMDISK)


def _members(f: IO[bytes], info: EIFInfo) -> Iterator[tuple[int, int, Any, Iterator[bytes]]]:
    """``(ramdisk index, section data offset, member, chunks)`` for every member of every ramdisk, in order.

    Unread member data is skipped with a seek, so a walk that reads only a few small files costs the headers only.
    """
    for number, section in enumerate(_ramdisks(info)):
        raw = FileWindow(f, section.data_offset, section.size)
        magic = bytearray(6)
        if section.size < 6 or raw.readinto(magic) != 6 or bytes(magic) != CPIO_MAGIC:
            raise EIFFormatError(f"ramdisk section {section.index} is not an uncompressed newc cpio archive")
        raw.seek(0)
        reader = io.BufferedReader(raw, _HEADER_READ)
        try:
            for member, chunks in iter_members(reader, section.size):
                yield number, section.data_offset, member, chunks
        except FormatError as exc:
            raise EIFFormatError(f"ramdisk section {section.index}: {exc}") from exc


def _copy_data(f: IO[bytes], offset: int, size: int, out_fd: int, chunks: Iterator[bytes]) -> None:
    """A member's ``size`` data bytes at file ``offset`` into ``out_fd``: in the kernel (sendfile) when ``f`` is a
    file on disk, else through ``chunks``."""
    fd = fileno_of(f)
    if fd is None:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(out_fd, view):]
        return
    left = size
    while left:
        sent = os.sendfile(out_fd, fd, offset, left)
        if sent <= 0:
            raise EIFFormatError(f"truncated EIF: a ramdisk file ends {left} bytes early (at offset {offset})")
        offset += sent
        left -= sent


def _norm(name: str) -> list[str] | None:
    """cpio name → path components (``./`` and leading ``/`` tolerated); None if it climbs out."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    return parts


def _lookup_id(table: str | None, name: str, field_index: int) -> int | None:
    for line in (table or "").splitlines():
        fields = line.split(":")
        if len(fields) > field_index and fields[0] == name and fields[field_index].isdigit():
            return int(fields[field_index])
    return None


def read_application(f: IO[bytes], info: EIFInfo) -> ApplicationSpec:
    """Find ``cmd``, ``env``, ``workdir`` and ``user`` in the ramdisks (§3.10 step 4) and resolve the user."""
    small: dict[str, str] = {}
    wanted = {"cmd", "env", "workdir", "user", "rootfs/etc/passwd", "rootfs/etc/group"}
    for _ramdisk, _base, member, chunks in _members(f, info):
        parts = _norm(member.name)
        key = "/".join(parts or [])
        if key in wanted and stat.S_ISREG(member.mode):
            if member.size > _SMALL_FILE_MAX:
                raise EIFFormatError(f"{key} in the ramdisk is {member.size} bytes; at most {_SMALL_FILE_MAX}")
            small[key] = b"".join(chunks).decode("utf-8", errors="replace")
    if "cmd" not in small:
        raise EIFFormatError("the EIF's ramdisks hold no cmd file: there is no application to run")
    argv = tuple(line for line in small["cmd"].split("\n") if line)
    if not argv:
        raise EIFFormatError("the EIF's cmd file is empty")
    env: dict[str, str] = {}
    for line in small.get("env", "").split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if sep and key:
            env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    workdir = (small.get("workdir", "").strip() or "/")
    if not workdir.startswith("/") or _norm(workdir) is None:
        raise EIFFormatError(f"the EIF's workdir {workdir[:60]!r} is not an absolute path")
    workdir = "/" + "/".join(_norm(workdir) or [])
    uid = gid = 0
    user = small.get("user", "").strip()
    if user:
        uname, _, gname = user.partition(":")
        u = int(uname) if uname.isdigit() else _lookup_id(small.get("rootfs/etc/passwd"), uname, 2)
        if u is None:
            raise EIFFormatError(f"the EIF's user {uname[:40]!r} is not in the image's /etc/passwd")
        uid = u
        if gname:
            g = int(gname) if gname.isdigit() else _lookup_id(small.get("rootfs/etc/group"), gname, 2)
            if g is None:
                raise EIFFormatError(f"the EIF's group {gname[:40]!r} is not in the image's /etc/group")
            gid = g
        else:
            g = _lookup_id(small.get("rootfs/etc/passwd"), uname, 3) if not uname.isdigit() else None
            gid = g if g is not None else uid
    if not (0 <= uid < 65536 and 0 <= gid < 65536):
        raise EIFFormatError(f"the EIF's user {user[:40]!r} maps to ids outside 0..65535")
    return ApplicationSpec(argv=argv, env=env, workdir=workdir, uid=uid, gid=gid)


def _run_directories(root: Path, app: ApplicationSpec) -> None:
    """``/run/enclavekit`` and its ``vsock`` in the root, the application's (symlinks of the image resolved inside
    the root, never on the host)."""
    for d in (INSIDE_RUN_DIR, INSIDE_VSOCK_DIR):
        target = _sandbox_init._inside(str(root), d)
        os.makedirs(target, mode=0o755, exist_ok=True)
        os.chown(target, app.uid, app.gid)


def _safe_parent(root: Path, parts: list[str], known: set[str] | None = None) -> Path:
    """The directory for ``parts[:-1]`` under ``root``, created as needed; refuses to pass through symlinks.

    ``known`` collects the relative paths already checked to be directories during one unpack (a directory is
    never replaced, see :func:`unpack_rootfs`), so each is looked at once.
    """
    current = str(root)
    relative = ""
    for part in parts[:-1]:
        current = f"{current}/{part}"
        relative = f"{relative}/{part}"
        if known is not None and relative in known:
            continue
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise EIFFormatError(f"ramdisk entry passes through {'/'.join(parts[:-1])!r}, which is not a "
                                     "directory")
        if known is not None:
            known.add(relative)
    return Path(current)


def unpack_rootfs(f: IO[bytes], info: EIFInfo, root: Path) -> int:
    """Write the ramdisks' ``rootfs/`` tree into ``root`` (the sandbox's tmpfs); returns the entry count.

    Names that climb out (``..``), entries below a symlink and device nodes are refused or skipped: the tree is
    written by root on the host, so nothing in it may point the writes elsewhere.
    """
    count = 0
    # newc hard links share (dev, ino) within ONE archive; every ramdisk numbers its inodes anew, so the key
    # carries the ramdisk's index too (a link never crosses ramdisks)
    links: dict[tuple[int, int, int, int], tuple[Path, int, int]] = {}  # link key → (path, st_dev, st_ino) of the data
    pending: dict[tuple[int, int, int, int], list[Path]] = {}  # link key → empty members waiting for the data
    directories: set[str] = set()
    for ramdisk, base, member, chunks in _members(f, info):
        parts = _norm(member.name)
        if parts is None:
            raise EIFFormatError(f"ramdisk entry {member.name[:80]!r} climbs out of the root")
        if not parts or parts[0] != "rootfs":
            continue
        parts = parts[1:]
        if not parts:
            os.chmod(root, member.permissions or 0o755)
            continue
        parent = _safe_parent(root, parts, directories)
        target = parent / parts[-1]
        kind = member.file_type
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(target)
            if stat.S_ISDIR(st.st_mode) and kind == stat.S_IFDIR:
                os.chmod(target, member.permissions)
                os.lchown(target, member.uid, member.gid)
                continue
            if stat.S_ISDIR(st.st_mode):
                raise EIFFormatError(f"ramdisk entry {member.name[:80]!r} replaces a directory")
            os.unlink(target)
        if kind == stat.S_IFDIR:
            os.mkdir(target, 0o700)
        elif kind == stat.S_IFREG:
            key = (ramdisk, member.dev_major, member.dev_minor, member.ino)
            if member.nlink > 1 and member.size == 0 and key in links:
                # review: a later entry may have replaced the data's path (by a symlink to a host file, say); a
                # link is made only to the very file that was written
                source, dev, ino = links[key]
                held = os.lstat(source)
                if not stat.S_ISREG(held.st_mode) or (held.st_dev, held.st_ino) != (dev, ino):
                    raise EIFFormatError(f"ramdisk entry {member.name[:80]!r} links to a file a later entry replaced")
                os.link(source, target, follow_symlinks=False)
            elif member.nlink > 1 and member.size == 0:
                pending.setdefault(key, []).append(target)
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            else:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    _copy_data(f, base + member.data_offset, member.size, fd, chunks)
                    written = os.fstat(fd)
                finally:
                    os.close(fd)
                if member.nlink > 1:
                    links[key] = (target, written.st_dev, written.st_ino)
                    for other in pending.pop(key, []):
                        if stat.S_ISREG(os.lstat(other).st_mode):  # else replaced since: not ours to link
                            os.unlink(other)
                            os.link(target, other, follow_symlinks=False)
        elif kind == stat.S_IFLNK:
            os.symlink(b"".join(chunks).decode("utf-8", "surrogateescape"), target)
            os.lchown(target, member.uid, member.gid)
            count += 1
            continue
        elif kind == stat.S_IFIFO:
            os.mkfifo(target, 0o600)
        else:
            continue  # device nodes and sockets: the sandbox provides its own /dev
        if stat.S_IFMT(os.lstat(target).st_mode) != kind:  # chmod follows symlinks: only what was just made
            raise EIFFormatError(f"ramdisk entry {member.name[:80]!r} was replaced while unpacking")
        os.lchown(target, member.uid, member.gid)
        os.chmod(target, member.permissions)
        count += 1
    return count


# ---------------------------------------------------------------- CLI side

def _spawn_by_exec(request: RunRequest, report_w: int) -> None:
    """A fresh interpreter (``python -m enclavekit.runtime.supervisor``) that double-forks the supervisor."""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "enclavekit.runtime.supervisor", str(report_w)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(report_w,), start_new_session=True, close_fds=True, cwd="/")
    except OSError as exc:
        raise EnclaveKitError(f"cannot start the enclave supervisor: {exc.strerror or exc}", code="E05") from exc
    assert proc.stdin is not None
    with contextlib.suppress(OSError):
        proc.stdin.write(json.dumps(request.to_json()).encode() + b"\n")
        proc.stdin.close()
    # the intermediate process exits as soon as it has forked the supervisor (double fork)
    if proc.wait() != 0:
        raise EnclaveKitError("the enclave supervisor could not detach", code="E06")


def _spawn_by_fork(request: RunRequest, report_w: int) -> None:
    """Double fork of this (single-threaded) process: the supervisor starts with every module already imported."""

    def supervise() -> int:
        detach_stdio()
        os.closerange(3, report_w)
        os.closerange(report_w + 1, max_fd())
        return _run_detached(request, _Reporter(report_w))

    try:
        status = double_fork(supervise)
    except OSError as exc:
        raise EnclaveKitError(f"cannot fork the enclave supervisor: {exc.strerror or exc}", code="E05") from exc
    if status != 0:
        raise EnclaveKitError("the enclave supervisor could not detach", code="E06")


def launch(request: RunRequest, *, on_stderr: Callable[[str], None] | None = None,
           timeout: float | None = None, use_server: bool = False,
           start_server_after: bool = False) -> dict[str, Any]:
    """Start a supervisor for ``request`` and wait for its report; returns ``EnclaveRunInfo`` or raises.

    With ``use_server``, the run directory's launch server (:mod:`enclavekit.runtime.launch_server`) takes the
    request when one runs, is this user's and accepts this process's context (and it is not turned off).
    Otherwise a single-threaded caller forks the supervisor directly, saving an interpreter start, and a threaded
    one starts a fresh interpreter (forking a threaded process is unsafe).  ``start_server_after`` starts a
    resident server for the next launches after a direct one (the CLI asks for it; by default a caller is never
    turned into a daemon's parent).
    """
    from enclavekit.runtime import launch_server  # noqa: PLC0415 - it imports this module in its functions

    if use_server:
        via_server = launch_server.launch_via_server(request, on_stderr=on_stderr, timeout=timeout)
        if via_server is not None:
            return via_server
    _trace("cli: launch")
    report_r, report_w = os.pipe()
    try:
        if threading.active_count() == 1:
            _spawn_by_fork(request, report_w)
        else:
            _spawn_by_exec(request, report_w)
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    limit = timeout if timeout is not None else (request.boot_timeout or 180.0) + 60.0
    try:
        result = launch_server.read_report(report_r, limit=limit, on_stderr=on_stderr)
    finally:
        os.close(report_r)
    if start_server_after:
        # the next launches skip the interpreter start, the imports and this fork (started in the background)
        launch_server.start_server(request.run_dir)
    return result


# ---------------------------------------------------------------- cleanup (shared with the registry readers)

def _remove_cgroup_dirs(dirs: Iterable[str]) -> None:
    """Kill what is left in an enclave's cgroup directories and remove them (only enclavekit's own groups)."""
    for d in dirs:
        path = Path(d)
        if not path.name.startswith("enclavekit-") or not str(path).startswith("/sys/fs/cgroup/"):
            continue
        for _ in range(50):
            try:
                pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            except OSError:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


def clean_stale(registry: Registry, state_home: Path) -> list[EnclaveRecord]:
    """Clean up after every enclave whose supervisor is gone: cgroups, allocation, sockets, vsock directory; and
    the image trees of launch servers that are gone."""
    ledger = AllocationLedger(state_home)
    image_store.sweep_dead_stores()

    def release(rec: EnclaveRecord) -> None:
        _remove_cgroup_dirs(rec.cgroup_dirs)
        with contextlib.suppress(EnclaveKitError):
            ledger.release(rec.enclave_id)

    return registry.clean_stale(release)


# ---------------------------------------------------------------- the supervisor process

class _Reporter:
    """JSON lines to the CLI on the report pipe; silently gone once the CLI stopped listening."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def send(self, **msg: Any) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, json.dumps(msg).encode() + b"\n")
        except OSError:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


_TRACE = os.environ.get("ENCLAVEKIT_LAUNCH_TRACE")  # a file: phase timings of each launch (benchmarks)


def _trace(label: str) -> None:
    """Append ``<pid> <monotonic s> <label>`` to ``$ENCLAVEKIT_LAUNCH_TRACE`` (profiling the launch path)."""
    if _TRACE:
        with contextlib.suppress(OSError), open(_TRACE, "a") as fh:
            fh.write(f"{os.getpid()} {time.monotonic():.6f} {label}\n")


def _boot_error(message: str, console: Path, *, code: str = "E36") -> EnclaveKitError:
    lines = tail_lines(console, _CONSOLE_TAIL_LINES)
    details = {"console": "\n".join(lines)} if lines else {}
    details["console log"] = str(console)
    return EnclaveKitError(message, code=code, details=details)


class _DeferredNSM:
    """An NSM handler built on a thread; :meth:`handle` waits for it (the NSM server's handler protocol)."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._module: Any = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

        def run() -> None:
            try:
                self._module = build()
            except BaseException as exc:  # handed to result() and handle()
                self._error = exc
            finally:
                self._ready.set()

        threading.Thread(target=run, name="nsm-build", daemon=True).start()

    def result(self) -> Any:
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._module

    def handle(self, request: bytes) -> bytes:
        response: bytes = self.result().handle(request)
        return response


class _Heartbeat:
    """The enclave's (3, 9000) listener (§3.8): accept, read 0xB7, echo it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        path.chmod(0o600)
        self.sock.listen(4)

    def wait(self, timeout: float, alive: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if not alive():
                raise ChildProcessError
            if not select.select([self.sock], [], [], min(remaining, 0.1))[0]:
                continue
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                # Firecracker's handshake first (the enclave connects to (3, 9000) like any vsock peer)
                line = b""
                while not line.endswith(b"\n") and len(line) < 32:
                    c = conn.recv(1)
                    if not c:
                        break
                    line += c
                if line.strip() != f"CONNECT {HEARTBEAT_PORT}".encode():
                    continue
                conn.sendall(b"OK 1073741824\n")
                data = conn.recv(1)
                if data != bytes([HEARTBEAT_BYTE]):
                    continue
                conn.sendall(bytes([HEARTBEAT_BYTE]))
                return

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Supervisor:
    """One enclave's life; :meth:`run` never returns normally (the process exits when the enclave is gone)."""

    def __init__(self, request: RunRequest, reporter: _Reporter, *, eif_fd: int | None = None) -> None:
        self.req = request
        self.eif_fd = eif_fd  # the EIF as the client opened it (a launch server's supervisor), else None
        self.reporter = reporter
        self.registry = Registry(Path(request.run_dir))
        self.state_home = Path(request.state_home)
        self.ledger = AllocationLedger(self.state_home)
        self.record: EnclaveRecord | None = None
        self.snapshot: IO[bytes] | None = None
        self.image_entry: image_store.StoreEntry | None = None
        self.allocated = False
        self.nsm_server: NSMServer | None = None
        self.nsm: _DeferredNSM | None = None
        self.heartbeat: _Heartbeat | None = None
        self.sandbox: SandboxProcess | None = None
        self.recorder: ConsoleRecorder | None = None
        self.control: ControlServer | None = None
        self.terminate_requested = threading.Event()
        self.terminate_via_control = threading.Event()
        self.cleaned = threading.Event()
        self.replied = threading.Event()
        self._record_lock = threading.Lock()

    # ---- set-up

    def _load(self) -> _LoadedImage:
        """Read the EIF once: CRC-check and measure it, read its application, and say how its root is filled.

        The file is copied into a sealed in-memory file first (:func:`_snapshot`), and everything (measurements,
        application, the unpacked tree) comes from that copy: the enclave runs exactly what its PCRs describe,
        whatever happens to the file meanwhile.  A supervisor forked by a launch server uses the server's image
        store (:mod:`enclavekit.runtime.image_store`): the tree is unpacked there once per image and shared, and
        for a file launched before and unchanged since, nothing is read from the file at all.
        """
        path = self.req.eif_path
        details = {"File": path, "failing operation": "Open"}
        opened, self.eif_fd = self.eif_fd, None
        try:
            # the client's descriptor (opened for reading with its rights, or O_PATH for what is not a file), else
            # O_PATH first: naming a device or a FIFO as the EIF must not open it (side effects, a hang)
            handle = opened if opened is not None else os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise FileOperationError(f"cannot read the EIF {path}: {exc.strerror or exc}", details=details) from exc
        try:
            st = os.fstat(handle)
            if not stat.S_ISREG(st.st_mode):
                raise FileOperationError(f"the EIF {path} is not a regular file", details=details)
            # before reading anything: an image too large for the enclave (E26) is not copied into memory
            check_memory_for_image(self.req.memory_mib, st.st_size)
            identity = FileIdentity.of(st)
            store = self._store()
            if store is not None:
                known = self._known(store, identity)
                if known is not None:
                    return known
            try:
                fd = os.dup(handle) if opened is not None else os.open(f"/proc/self/fd/{handle}",
                                                                        os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as exc:
                raise FileOperationError(f"cannot read the EIF {path}: {exc.strerror or exc}",
                                         details=details) from exc
            try:
                read_from = time.time_ns()
                snapshot = _snapshot(fd, path, st.st_size)
                identity_after = FileIdentity.of(os.fstat(fd))
            finally:
                os.close(fd)
        finally:
            os.close(handle)
        self.snapshot = snapshot
        try:
            info = measure_eif(snapshot)
        except OSError as exc:  # pragma: no cover - a memfd read does not fail
            raise FileOperationError(f"cannot read the EIF {path}: {exc}", details=details) from exc
        if not info.crc_ok:
            raise EIFFormatError(f"the EIF {path} is corrupt: its CRC32 does not match its contents "
                                 f"(header {info.header.eif_crc32:#010x}, computed {info.computed_crc:#010x})")
        if info.is_signed:
            from enclavekit.image.signing import verify_eif_signature  # noqa: PLC0415 - X.509 for signed only

            verify_eif_signature(info, datetime.now(UTC))
        app = read_application(snapshot, info)

        def populate(root: Path) -> None:
            # in the forked launcher (or into the store): the sealed copy, read with pread/sendfile only
            unpack_rootfs(snapshot, info, root)
            _run_directories(root, app)

        loaded = _LoadedImage(measurements=info.measurements.to_json(), file_size=info.file_size,
                              metadata=image_metadata(info) or None, app=app, populate=populate)
        if store is not None:
            key = _store_key(info)
            size = sum(section.size for section in _ramdisks(info))
            files = size // 112 + 16  # at most one member per newc header (110 bytes, 4-aligned): an inode bound

            def share() -> None:
                # once the enclave has its allocation: a launch that fails E26/E27 fills nothing
                entry = store.acquire(key, populate, size_hint=size, files_hint=files)
                if entry is None:
                    return
                self.image_entry = entry
                loaded.lower = str(entry.path)
                loaded.populate = None
                if not info.is_signed:  # a signature is checked against the time of each launch: read each time
                    store.remember(identity, loaded.facts(entry.key), read_from_ns=read_from,
                                   identity_after=identity_after)

            loaded.share = share
        return loaded

    def _store(self) -> image_store.ImageStore | None:
        """The launch server's image store, in a supervisor it forked, unless ``ENCLAVEKIT_IMAGE_STORE=off``."""
        store = image_store.ACTIVE
        off = os.environ.get("ENCLAVEKIT_IMAGE_STORE", "on").strip().lower() in ("0", "off", "no", "false")
        return None if off else store

    def _known(self, store: image_store.ImageStore, identity: FileIdentity) -> _LoadedImage | None:
        facts = store.facts_for(identity)
        if facts is None:
            return None
        try:
            loaded = _LoadedImage.from_facts(facts)
        except (KeyError, TypeError, ValueError):
            return None
        entry = store.hold(str(facts.get("key")))
        if entry is None:
            return None
        self.image_entry = entry
        loaded.lower = str(entry.path)
        return loaded

    def _start_nsm(self, record: EnclaveRecord, image_measurements: dict[str, str]) -> None:
        """Listen on the NSM socket now; build the NSM (X.509, keys: the slow part) on a thread meanwhile.

        The sandbox starts while the module is built; a request that arrives first waits for it.  A failure to
        build it fails the launch (:meth:`_DeferredNSM.result` is checked before ``run-enclave`` returns).
        """
        role, instance = self.req.parent_role_arn, self.req.parent_instance_id
        if role is None or instance is None:
            cfg_role, cfg_instance = load_parent_identity(self.state_home)
            role = role if role is not None else cfg_role
            instance = instance if instance is not None else cfg_instance
        measurements: dict[int | str, bytes | str] = {}
        measurements.update(image_measurements)
        state_home, debug_mode = self.state_home, self.req.debug_mode

        def build() -> Any:
            # deferred: the X.509 stack loads here, on this thread, while the sandbox starts
            from enclavekit.attestation.issuer import DocumentIssuer  # noqa: PLC0415
            from enclavekit.attestation.pki import LocalPKI  # noqa: PLC0415
            from enclavekit.nsm.module import EmulatedNSM  # noqa: PLC0415

            pki = LocalPKI.open(state_home, now=datetime.now(UTC))
            return EmulatedNSM(signer=DocumentIssuer(pki), random_source=os.urandom,
                               clock_ms=lambda: time.time_ns() // 1_000_000, module_id=record.enclave_id,
                               measurements=measurements, parent_role_arn=role,
                               parent_instance_id=instance, debug_mode=debug_mode)

        self.nsm = _DeferredNSM(build)
        server = NSMServer(self.nsm, self.registry.nsm_path(record.enclave_id), idle_timeout=None)
        server.start()
        self.nsm_server = server

    def _channels(self, record: EnclaveRecord, app: ApplicationSpec) -> dict[str, Any]:
        """What of the host the sandbox sees: its NSM socket and the two vsock channel directories (§ module doc)."""
        parent_dir = self.registry.vsock_root / str(PARENT_CID)
        own_dir = self.registry.vsock_root / str(record.cid)
        parent_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        own_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        # the application creates its listeners there, as whatever user the image names; a small private tmpfs,
        # so the enclave can neither store data on the host's disk nor plant executables for the host
        unmount_channel_dir(own_dir)
        mount_channel_dir(own_dir, app.uid, app.gid)
        return {"sockets": {str(self.registry.nsm_path(record.enclave_id)): INSIDE_NSM_SOCKET},
                "directories": {str(parent_dir): f"{INSIDE_VSOCK_DIR}/{PARENT_CID}"},
                "writable_directories": {str(own_dir): f"{INSIDE_VSOCK_DIR}/{record.cid}"}}

    def _device_emulation(self, record: EnclaveRecord, enclave_dir: Path) -> dict[str, Any]:
        """``/dev/nsm`` and AF_VSOCK for unmodified programs (docs/unmodified-apps.md), unless turned off."""
        if not self.req.device_emulation:
            return {}
        from enclavekit.runtime.nsm_device import NSMDevice, prepare_device_node  # noqa: PLC0415
        from enclavekit.runtime.vsock_translate import VsockTranslator  # noqa: PLC0415

        assert self.nsm is not None
        node, identity = prepare_device_node(enclave_dir / "nsm.dev")
        return {"devices": {node: "/dev/nsm"},
                "notification_handlers": (NSMDevice(self.nsm, identity),
                                          VsockTranslator(self.registry.vsock_root, record.cid))}

    def setup(self) -> EnclaveRecord:
        req = self.req
        _trace("supervisor: setup")
        image = self._load()
        _trace("supervisor: measured")
        name = req.enclave_name or default_enclave_name(req.eif_path)
        slot_uid = int.from_bytes(os.urandom(8), "big") >> 4 | (1 << 56)
        record = self.registry.reserve(
            name=name, cid=req.enclave_cid, owner_pid=os.getpid(), slot_uid=slot_uid,
            instance_id=read_instance_id(), owner_uid=req.owner_uid, memory_mib=req.memory_mib,
            debug_mode=req.debug_mode, measurements=image.measurements, metadata=image.metadata,
            eif_path=os.path.abspath(req.eif_path))
        self.record = record
        enclave_dir = self.registry.enclave_dir(record.enclave_id)
        # the supervisor's own diagnostics (tracebacks) go next to the console log
        log_fd = os.open(enclave_dir / "supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self.reporter.send(stderr="Start allocating memory...")
        alloc = self.ledger.allocate(record.enclave_id, req.memory_mib, cpu_count=req.cpu_count,
                                     cpu_ids=req.cpu_ids, eif_size=image.file_size)
        self.allocated = True
        record = self._update(cpu_ids=alloc.cpu_ids, memory_mib=alloc.memory_mib)
        if image.share is not None:
            image.share()
        _trace("supervisor: reserved and allocated")
        (self.registry.vsock_root / str(record.cid)).mkdir(mode=0o755, parents=True, exist_ok=True)
        self._start_nsm(record, image.measurements)
        self.heartbeat = _Heartbeat(self.registry.heartbeat_path(record.enclave_id))
        console_path = self.registry.console_path(record.enclave_id)
        self.recorder = ConsoleRecorder(console_path)
        app = image.app
        env = dict(app.env)
        env.update({"ENCLAVEKIT_NSM_SOCKET": INSIDE_NSM_SOCKET, "ENCLAVEKIT_VSOCK_DIR": INSIDE_VSOCK_DIR,
                    "ENCLAVEKIT_VSOCK_CID": str(record.cid)})

        def nothing(_root: Path) -> None:
            return None

        spec = SandboxSpec(argv=app.argv, rootfs=image.populate or nothing, lower=image.lower,
                           memory_mib=alloc.memory_mib, env=env,
                           workdir=app.workdir, uid=app.uid, gid=app.gid, cpu_ids=alloc.cpu_ids,
                           name=f"enclavekit-{record.enclave_id.rsplit('-enc', 1)[1]}",
                           heartbeat=str(self.registry.heartbeat_path(record.enclave_id)), await_boot=True,
                           inherit_fds=(self.snapshot.fileno(),) if image.populate and self.snapshot else (),
                           **self._channels(record, app), **self._device_emulation(record, enclave_dir))
        _trace("supervisor: NSM listening, application read")
        try:
            # fork: the supervisor's heap is small and the launch is timed by users (docs/runtime.md)
            self.sandbox = Sandbox.start(spec, stage_parent=enclave_dir, launcher="fork")
        except SandboxBootError as exc:
            text = exc.details.get("console", "")
            if text:
                self.recorder.write(text.encode() + b"\n")
            self.recorder.write(f"[enclavekit] {exc.message}\n".encode())
            raise _boot_error(f"the enclave did not boot: {exc.message}", console_path) from exc
        _trace("supervisor: sandbox running (application booted)")
        self._close_snapshot()  # the root is filled: the copy of the EIF is not needed any more
        record = self._update(cgroup_dirs=tuple(str(d) for d in self.sandbox.cgroup.dirs))
        if self.sandbox.cpu_pinning == "affinity":
            # review: without cpuset the pinning is sched_setaffinity only, which the application may undo
            warning = (f"Warning: CPUs {list(alloc.cpu_ids)} are not enforced: the cgroup has no cpuset controller "
                       "(cgroup v2 without cpuset delegation); the application is pinned with sched_setaffinity, "
                       "which it can undo")
            self.recorder.write(f"[enclavekit] {warning}\n".encode())
            self.reporter.send(stderr=warning)
        self.recorder.start(os.dup(self.sandbox.console.fileno()))
        # §3.8: the application has booted (PID 1 saw it wait); now the heartbeat must come, within the timeout
        sandbox = self.sandbox

        def alive() -> bool:
            return sandbox.returncode is None

        limit = req.boot_timeout or boot_timeout(image.file_size, alloc.memory_mib)
        try:
            self.heartbeat.wait(limit, alive)
        except TimeoutError:
            raise _boot_error(f"no heartbeat from the enclave within {limit:g} s", console_path) from None
        except ChildProcessError:
            status = sandbox.wait()
            self.recorder.wait(1.0)
            raise _boot_error(f"the enclave ended with status {status} before its boot heartbeat",
                              console_path) from None
        _trace("supervisor: heartbeat")
        assert self.nsm is not None
        self.nsm.result()  # the NSM was built (or its error is the launch's)
        _trace("supervisor: NSM built")
        self.control = ControlServer(self.registry.control_path(record.enclave_id), self._handle,
                                     owner_uid=req.owner_uid)
        self.control.start()
        return self._update(state="RUNNING")

    def _close_snapshot(self) -> None:
        if self.snapshot is not None:
            self.snapshot.close()
            self.snapshot = None

    def _update(self, **changes: Any) -> EnclaveRecord:
        with self._record_lock:
            assert self.record is not None
            self.record = self.registry.update(self.record, **changes)
            return self.record

    # ---- control requests

    def _handle(self, req: Request, uid: int, conn: socket.socket) -> Any:
        record = self.record
        assert record is not None
        if req.op == "ping":
            return {"EnclaveID": record.enclave_id}
        if req.op == "describe":
            return record.describe(metadata=bool(req.args.get("metadata")))
        if req.op == "terminate":
            self.terminate_via_control.set()
            self.terminate_requested.set()
            self.cleaned.wait(30.0)
            # reply here, then let the process end (the main thread waits for this reply to leave)
            try:
                conn.sendall(encode_reply({"EnclaveName": record.name, "EnclaveID": record.enclave_id,
                                           "Terminated": True}))
            finally:
                conn.close()
                self.replied.set()
            return ControlServer.DETACHED
        if req.op == "console":
            if not record.debug_mode:
                raise EnclaveKitError("The enclave was not started with the debug flag set, include "
                                      "'--debug-mode' in the run-enclave command", code="E44")
            assert self.recorder is not None
            conn.sendall(encode_reply({"EnclaveCID": record.cid}))
            self.recorder.serve_follower(conn)
            return ControlServer.DETACHED
        raise EnclaveKitError(f"unknown operation {req.op}", code="E14")  # pragma: no cover

    # ---- life and death

    def serve(self) -> None:
        assert self.sandbox is not None
        while not self.terminate_requested.is_set():
            try:
                self.sandbox.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.record is not None:
            with contextlib.suppress(EnclaveKitError, OSError):
                self._update(state="TERMINATING")

    def oom_kills(self) -> int:
        """OOM kills the enclave's cgroup counted (0 when it cannot tell); ask before :meth:`cleanup`."""
        if self.sandbox is None:
            return 0
        try:
            return self.sandbox.cgroup.oom_kills()
        except (EnclaveKitError, OSError, ValueError):
            return 0

    def cleanup(self) -> None:
        """Release everything; idempotent and never raises (it runs on every exit path)."""
        steps: list[Callable[[], None]] = []
        if self.control is not None:
            steps.append(self.control.close)
        if self.sandbox is not None:
            steps.append(self.sandbox.close)
        if self.recorder is not None:
            recorder = self.recorder

            def close_console() -> None:
                recorder.wait(2.0)
                recorder.close()

            steps.append(close_console)
        if self.nsm_server is not None:
            steps.append(self.nsm_server.close)
        if self.heartbeat is not None:
            steps.append(self.heartbeat.close)
        if self.allocated and self.record is not None:
            enclave_id = self.record.enclave_id

            def release() -> None:
                self.ledger.release(enclave_id)

            steps.append(release)
        if self.record is not None:
            record = self.record
            steps.append(lambda: self.registry.remove(record))
        steps.append(self._close_snapshot)
        if self.image_entry is not None:
            steps.append(self.image_entry.release)  # after the sandbox: nothing runs on the tree any more
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning: the rest must still go
                print(f"cleanup step failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        self.cleaned.set()


def _run_parameters(request: RunRequest) -> dict[str, Any]:
    """``requestParameters`` of the RunEnclave record: what was asked for (nitro-cli's --config names)."""
    params: dict[str, Any] = {"eifPath": request.eif_path, "memoryMiB": request.memory_mib,
                              "debugMode": request.debug_mode}
    if request.cpu_count is not None:
        params["cpuCount"] = request.cpu_count
    if request.cpu_ids is not None:
        params["cpuIds"] = list(request.cpu_ids)
    if request.enclave_cid is not None:
        params["enclaveCid"] = request.enclave_cid
    return params


def _supervise(request: RunRequest, reporter: _Reporter, eif_fd: int | None = None) -> int:
    sup = Supervisor(request, reporter, eif_fd=eif_fd)
    # issue 6: lifecycle records go to the state directory's trail (runtime/audit.py), never before the report
    audit = RuntimeAudit(Path(request.state_home), owner_uid=request.owner_uid)
    signal.signal(signal.SIGTERM, lambda *_: sup.terminate_requested.set())
    signal.signal(signal.SIGINT, lambda *_: sup.terminate_requested.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        record = sup.setup()
    except EnclaveKitError as exc:
        sup.cleanup()
        if exc.code == "E36" and sup.record is not None:  # §3.8: the enclave existed and died at boot
            # before the report: a failed run-enclave returns with its record delivered and no process left
            # writing to the state directory (only the launch itself must not wait for the audit path)
            audit.boot_failure(sup.record, exc, exc.details.get("console", "").splitlines())
            audit.close()
        reporter.send(error={"code": exc.code, "message": exc.message, "details": exc.details})
        return 1
    except BaseException as exc:
        sup.cleanup()
        reporter.send(error={"code": "E00", "message": f"internal error: {type(exc).__name__}: {exc}"})
        return 1
    reporter.send(stderr=f"Started enclave with enclave-cid: {record.cid}, memory: {record.memory_mib} MiB, "
                         f"cpu-ids: {list(record.cpu_ids)}")
    reporter.send(ok=record.run_info())
    reporter.close()
    _trace("supervisor: reported")
    audit.run_enclave(record, _run_parameters(request))
    try:
        sup.serve()
        # before cleanup: the cgroup's OOM counter goes with the cgroup, and the terminate reply (sent once
        # cleanup is done) must not leave before its record is in the spool
        oom_kills = sup.oom_kills()
        final = sup.record or record
        if oom_kills:
            audit.out_of_memory(final, oom_kills=oom_kills,
                                exit_status=sup.sandbox.returncode if sup.sandbox is not None else None)
        if sup.terminate_requested.is_set():
            audit.terminate_enclave(final, via="control" if sup.terminate_via_control.is_set() else "signal")
    finally:
        sup.cleanup()
        audit.close()
    if sup.terminate_via_control.is_set():
        sup.replied.wait(5.0)  # the terminate reply leaves before the process ends
    return 0


def _run_detached(request: RunRequest, reporter: _Reporter, *, eif_fd: int | None = None) -> int:
    os.chdir("/")
    os.umask(0o022)
    try:
        return _supervise(request, reporter, eif_fd)
    except BaseException:  # last resort; already reported where possible
        return 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()


def _daemonize_and_run(report_fd: int) -> NoReturn:
    raw = sys.stdin.buffer.readline()
    reporter = _Reporter(report_fd)
    try:
        request = RunRequest.from_json(json.loads(raw))
    except (ValueError, TypeError) as exc:
        reporter.send(error={"code": "E17", "message": f"bad run request: {exc}"})
        os._exit(1)
    # double fork: the CLI waits for this process; the supervisor below is nobody's child
    if os.fork() != 0:
        os._exit(0)
    detach_stdio()
    os._exit(_run_detached(request, reporter))


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        sys.stderr.write("usage: python -m enclavekit.runtime.supervisor REPORT_FD < request.json\n")
        os._exit(2)
    _daemonize_and_run(int(args[0]))


if __name__ == "__main__":
    main()
