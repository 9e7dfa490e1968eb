"""The enclave registry: which enclaves run on this host, under which id, name and CID, and where to reach them.

Layout of the run directory (``$ENCLAVEKIT_RUN_DIR``, default ``/run/enclavekit``)::

    <run>/registry.lock              flock serializing reservations (ids, names, CIDs)
    <run>/vsock/                     the vsock emulation root (``3/`` = parent listeners, ``<cid>/`` = an enclave's)
    <run>/<enclave id>/enclave.json  the record of a running enclave (written by its supervisor)
    <run>/<enclave id>/control.sock  the supervisor's control socket (:mod:`enclavekit.runtime.control`)
    <run>/<enclave id>/nsm.sock      that enclave's NSM (bound into its sandbox only)
    <run>/<enclave id>/heartbeat.sock  that enclave's boot heartbeat listener (its own (3, 9000))
    <run>/<enclave id>/console.log   the console; kept after the enclave exits

Naming rules follow nitro-cli (spec eif-pcr-cli §3.4, §3.5):

* ``EnclaveID`` = ``<instance id>-enc<slot uid in lowercase hex>``; the instance id is the board asset tag with
  whitespace removed, or ``i-0000000000000000`` when it is not available;
* ``EnclaveName`` = ``--enclave-name``, else the EIF's file name without ``.eif``; a name already used by a running
  enclave gets ``_1``, ``_2``, … appended;
* CIDs are 4 … 2^32-2 (3 is the parent); without ``--enclave-cid`` the first free CID from 16 is taken; a CID in
  use by a running enclave is refused.

A record belongs to its supervisor, named by PID and process start time.  A record whose supervisor is gone (it
exited, or was killed with SIGKILL) is *stale*: :meth:`Registry.live_records` skips it and
:meth:`Registry.clean_stale` removes everything it left behind except the console log.

The naming and CID decisions are pure functions; :class:`Registry` is the I/O shell.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from enclavekit._internal.state import atomic_write, file_lock
from enclavekit.errors import ConfigError, EnclaveKitError, FileOperationError
from enclavekit.runtime.allocator import process_start_time
from enclavekit.runtime.params import (
    DEFAULT_RUN_DIR,
    MAX_ENCLAVE_CID,
    PARENT_CID,
    RUN_DIR_ENV,
    parse_enclave_cid,
    run_dir,
)

__all__ = [
    "RUN_DIR_ENV",
    "DEFAULT_RUN_DIR",
    "PARENT_CID",
    "MIN_ENCLAVE_CID",
    "MAX_ENCLAVE_CID",
    "AUTO_CID_START",
    "DEFAULT_INSTANCE_ID",
    "run_dir",
    "parse_enclave_cid",
    "read_instance_id",
    "make_enclave_id",
    "slot_of",
    "default_enclave_name",
    "unique_name",
    "choose_cid",
    "EnclaveRecord",
    "Registry",
]

# §3.5: the parent is CID 3 (runtime.params); enclaves get 4 … 2^32-2; auto CIDs are observed to start at 16.
MIN_ENCLAVE_CID = 4
AUTO_CID_START = 16
# §3.4: the id prefix when the board asset tag (the EC2 instance id) is not available.
DEFAULT_INSTANCE_ID = "i-0000000000000000"
_BOARD_ASSET_TAG = Path("/sys/devices/virtual/dmi/id/board_asset_tag")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_ENCLAVE_ID = re.compile(r"^([A-Za-z0-9-]{1,64})-enc([0-9a-f]{1,16})$")
_NAME_MAX = 128
_RECORD_MAX = 1 << 20
# sun_path is 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107
RECORD_VERSION = 1


# ---------------------------------------------------------------- pure naming rules

def read_instance_id(path: Path = _BOARD_ASSET_TAG) -> str:
    """The EC2 instance id from the board asset tag (whitespace removed), else ``i-0000000000000000`` (§3.4)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return DEFAULT_INSTANCE_ID
    value = "".join(text.split())
    return value if _INSTANCE_ID.match(value) else DEFAULT_INSTANCE_ID


def make_enclave_id(instance_id: str, slot_uid: int) -> str:
    """``<instance id>-enc<slot uid as lowercase hex, no padding>`` (§3.4)."""
    if not _INSTANCE_ID.match(instance_id):
        raise ValueError(f"bad instance id {instance_id!r}")
    if not 0 <= slot_uid < 1 << 64:
        raise ValueError("slot_uid must be an unsigned 64-bit number")
    return f"{instance_id}-enc{slot_uid:x}"


def slot_of(enclave_id: str) -> str:
    """The slot part of an enclave id (text after the last ``-enc``); E03 when the id is not well formed."""
    if not isinstance(enclave_id, str):
        raise TypeError("enclave id must be a str")
    m = _ENCLAVE_ID.match(enclave_id)
    if m is None:
        raise ConfigError(f"{enclave_id[:80]!r} is not an enclave id (expected i-<instance>-enc<hex>)")
    return m.group(2)


def default_enclave_name(eif_path: str) -> str:
    """The EIF's file name with a trailing ``.eif`` removed (§3.4)."""
    name = os.path.basename(eif_path)
    return name[:-4] if name.endswith(".eif") and len(name) > 4 else name


def _check_name(name: str) -> str:
    if not name or len(name) > _NAME_MAX or any(ord(c) < 0x20 or c in "/\x7f" for c in name):
        raise ConfigError(f"--enclave-name: expected 1..{_NAME_MAX} printable characters without '/', "
                          f"got {name[:40]!r}")
    return name


def unique_name(requested: str, used: Iterable[str]) -> str:
    """``requested``, or ``requested_1``, ``requested_2``, … if running enclaves already use it (§3.4)."""
    _check_name(requested)
    taken = set(used)
    if requested not in taken:
        return requested
    n = 1
    while f"{requested}_{n}" in taken:
        n += 1
    return f"{requested}_{n}"


def choose_cid(requested: int | None, used: Iterable[int]) -> int:
    """``requested`` if free (a CID in use is E03), else the first free CID from 16 (§3.5)."""
    taken = set(used)
    if requested is not None:
        if not MIN_ENCLAVE_CID <= requested <= MAX_ENCLAVE_CID:
            raise ConfigError(f"enclave CID {requested} is outside {MIN_ENCLAVE_CID}..{MAX_ENCLAVE_CID}")
        if requested in taken:
            raise ConfigError(f"enclave CID {requested} is already used by a running enclave",
                              hint="Choose another --enclave-cid, or omit it to get a free one.")
        return requested
    cid = AUTO_CID_START
    while cid in taken:
        cid += 1
    if cid > MAX_ENCLAVE_CID:  # pragma: no cover - 4 billion enclaves
        raise ConfigError("no free enclave CID")
    return cid


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class EnclaveRecord:
    """What the registry knows about one enclave (``enclave.json``).

    ``state`` is ``STARTING`` while the supervisor sets the enclave up, then ``RUNNING``, then ``TERMINATING``.
    ``measurements`` is the ``Measurements`` object of the EIF actually loaded; ``metadata`` holds
    ``ImageName``/``ImageVersion``/``Metadata`` when the EIF has a metadata section.
    """

    enclave_id: str
    name: str
    cid: int
    owner_pid: int
    owner_start: int
    state: str = "STARTING"
    cpu_ids: tuple[int, ...] = ()
    memory_mib: int = 0
    debug_mode: bool = False
    measurements: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    eif_path: str = ""
    owner_uid: int = 0
    cgroup_dirs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, "enclave_id": self.enclave_id, "name": self.name, "cid": self.cid,
                "owner_pid": self.owner_pid, "owner_start": self.owner_start, "state": self.state,
                "cpu_ids": list(self.cpu_ids), "memory_mib": self.memory_mib, "debug_mode": self.debug_mode,
                "measurements": self.measurements, "metadata": self.metadata, "eif_path": self.eif_path,
                "owner_uid": self.owner_uid, "cgroup_dirs": list(self.cgroup_dirs)}

    @classmethod
    def from_json(cls, obj: object) -> EnclaveRecord:
        """Parse a record strictly; anything unexpected is E17 (the record is damaged)."""
        def bad(what: str) -> EnclaveKitError:
            return EnclaveKitError(f"enclave record: {what}", code="E17")

        if not isinstance(obj, dict) or obj.get("version") != RECORD_VERSION:
            raise bad(f"expected an object with version {RECORD_VERSION}")
        try:
            eid, name, cid = obj["enclave_id"], obj["name"], obj["cid"]
            pid, start, state = obj["owner_pid"], obj["owner_start"], obj["state"]
            cpus, mem, debug = obj["cpu_ids"], obj["memory_mib"], obj["debug_mode"]
            meas, meta, eif = obj["measurements"], obj["metadata"], obj["eif_path"]
            uid, cgroups = obj["owner_uid"], obj["cgroup_dirs"]
        except KeyError as exc:
            raise bad(f"missing field {exc.args[0]}") from exc
        if not isinstance(eid, str) or _ENCLAVE_ID.match(eid) is None:
            raise bad("bad enclave_id")
        if not isinstance(name, str) or not isinstance(state, str) or not isinstance(eif, str):
            raise bad("name, state and eif_path must be strings")
        ints = (cid, pid, start, mem, uid)
        if not all(type(v) is int and v >= 0 for v in ints):
            raise bad("cid, owner_pid, owner_start, memory_mib and owner_uid must be non-negative integers")
        if not isinstance(cpus, list) or not all(type(c) is int and c >= 0 for c in cpus):
            raise bad("cpu_ids must be a list of integers")
        if type(debug) is not bool:
            raise bad("debug_mode must be a boolean")
        if not isinstance(meas, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meas.items()):
            raise bad("measurements must map strings to strings")
        if meta is not None and not isinstance(meta, dict):
            raise bad("metadata must be an object or null")
        if not isinstance(cgroups, list) or not all(isinstance(c, str) for c in cgroups):
            raise bad("cgroup_dirs must be a list of strings")
        return cls(enclave_id=eid, name=name, cid=cid, owner_pid=pid, owner_start=start, state=state,
                   cpu_ids=tuple(cpus), memory_mib=mem, debug_mode=debug, measurements=dict(meas),
                   metadata=meta, eif_path=eif, owner_uid=uid, cgroup_dirs=tuple(cgroups))

    def describe(self, *, metadata: bool = False, state: str | None = None) -> dict[str, Any]:
        """``describe-enclaves``'s ``EnclaveDescribeInfo`` (spec §3.3), keys in nitro-cli's order."""
        out: dict[str, Any] = {}
        if self.name:
            out["EnclaveName"] = self.name
        out.update({"EnclaveID": self.enclave_id, "ProcessID": self.owner_pid, "EnclaveCID": self.cid,
                    "NumberOfCPUs": len(self.cpu_ids), "CPUIDs": list(self.cpu_ids), "MemoryMiB": self.memory_mib,
                    "State": state or ("RUNNING" if self.state == "RUNNING" else self.state),
                    "Flags": "DEBUG_MODE" if self.debug_mode else "NONE",
                    "Measurements": dict(self.measurements)})
        if metadata and self.metadata:
            out.update(self.metadata)
        return out

    def run_info(self) -> dict[str, Any]:
        """``run-enclave``'s ``EnclaveRunInfo`` (spec §3.3)."""
        return {"EnclaveName": self.name, "EnclaveID": self.enclave_id, "ProcessID": self.owner_pid,
                "EnclaveCID": self.cid, "NumberOfCPUs": len(self.cpu_ids), "CPUIDs": list(self.cpu_ids),
                "MemoryMiB": self.memory_mib}


def _owner_alive(record: EnclaveRecord) -> bool:
    """The supervisor runs: its PID exists with the recorded start time and is not a zombie."""
    start = process_start_time(record.owner_pid)
    if start is None or start != record.owner_start:
        return False
    try:
        stat_line = Path(f"/proc/{record.owner_pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    fields = stat_line.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] not in ("Z", "X")


# ---------------------------------------------------------------- the registry (I/O)

# An enclave's own vsock directory is visible inside the enclave, writable, and lives on the host: a small private
# tmpfs (nosuid, nodev, noexec, few inodes) keeps it from becoming host storage or a place to plant executables.
CHANNEL_TMPFS_OPTIONS = "size=256k,nr_inodes=512,mode=0700"
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MNT_DETACH = 0x2


def mount_channel_dir(path: Path, uid: int, gid: int) -> None:
    """Mount the small private tmpfs on an enclave's own vsock directory, owned by the image's user."""
    libc = ctypes.CDLL(None, use_errno=True)
    data = f"{CHANNEL_TMPFS_OPTIONS},uid={uid},gid={gid}".encode()
    if libc.mount(b"enclavekit-vsock", os.fsencode(str(path)), b"tmpfs",
                  ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC), data) != 0:
        err = ctypes.get_errno()
        raise FileOperationError(f"cannot mount the vsock channel directory {path}: {os.strerror(err)}",
                                 details={"File": str(path), "failing operation": "Mount"})


def unmount_channel_dir(path: Path) -> None:
    """Detach the channel tmpfs (if any) so the directory can be removed; idempotent."""
    libc = ctypes.CDLL(None, use_errno=True)
    while os.path.ismount(path):
        if libc.umount2(os.fsencode(str(path)), _MNT_DETACH) != 0:
            return


class Registry:
    """The enclaves recorded under ``root`` (the run directory).

    ``is_alive`` decides whether a record's supervisor still runs (default: its PID exists with the recorded
    start time).
    """

    RECORD = "enclave.json"
    CONTROL = "control.sock"
    CONSOLE = "console.log"
    NSM = "nsm.sock"
    HEARTBEAT = "heartbeat.sock"
    LOCK = "registry.lock"

    def __init__(self, root: Path, *, is_alive: Callable[[EnclaveRecord], bool] = _owner_alive) -> None:
        self.root = Path(root)
        self._is_alive = is_alive

    # ---- paths

    @property
    def vsock_root(self) -> Path:
        return self.root / "vsock"

    def enclave_dir(self, enclave_id: str) -> Path:
        slot_of(enclave_id)  # validates: the id becomes a path component
        return self.root / enclave_id

    def control_path(self, enclave_id: str) -> Path:
        return self.enclave_dir(enclave_id) / self.CONTROL

    def console_path(self, enclave_id: str) -> Path:
        return self.enclave_dir(enclave_id) / self.CONSOLE

    def nsm_path(self, enclave_id: str) -> Path:
        return self.enclave_dir(enclave_id) / self.NSM

    def heartbeat_path(self, enclave_id: str) -> Path:
        return self.enclave_dir(enclave_id) / self.HEARTBEAT

    def record_path(self, enclave_id: str) -> Path:
        return self.enclave_dir(enclave_id) / self.RECORD

    def ensure(self) -> None:
        """Create the run directory (0755: other users may describe enclaves) and the vsock root."""
        try:
            self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            (self.vsock_root / str(PARENT_CID)).mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise FileOperationError(f"cannot create the run directory {self.root}: {exc.strerror}",
                                     details={"File": str(self.root), "failing operation": "Create"}) from exc

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.ensure()
        with file_lock(self.root / self.LOCK):
            yield

    # ---- records

    def _read(self, enclave_id: str) -> EnclaveRecord | None:
        path = self.record_path(enclave_id)
        try:
            with open(path, "rb") as fh:
                raw = fh.read(_RECORD_MAX + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FileOperationError(f"cannot read {path}: {exc.strerror}") from exc
        if len(raw) > _RECORD_MAX:
            raise EnclaveKitError(f"enclave record {path} is larger than {_RECORD_MAX} bytes", code="E17")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnclaveKitError(f"enclave record {path} is not JSON", code="E17") from exc
        return EnclaveRecord.from_json(obj)

    def all_records(self) -> list[EnclaveRecord]:
        """Every readable record, live or stale, sorted by CID.  Damaged records are skipped."""
        out: list[EnclaveRecord] = []
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise EnclaveKitError(f"cannot read the run directory {self.root}: {exc.strerror}", code="E07") \
                from exc
        for entry in entries:
            if _ENCLAVE_ID.match(entry) is None:
                continue
            try:
                rec = self._read(entry)
            except EnclaveKitError:
                continue
            if rec is not None and rec.enclave_id == entry:
                out.append(rec)
        return sorted(out, key=lambda r: r.cid)

    def is_live(self, record: EnclaveRecord) -> bool:
        return self._is_alive(record)

    def live_records(self) -> list[EnclaveRecord]:
        return [r for r in self.all_records() if self._is_alive(r)]

    def stale_records(self) -> list[EnclaveRecord]:
        return [r for r in self.all_records() if not self._is_alive(r)]

    def write(self, record: EnclaveRecord) -> None:
        directory = self.enclave_dir(record.enclave_id)
        atomic_write(directory / self.RECORD, json.dumps(record.to_json(), indent=2).encode() + b"\n",
                     mode=0o644)

    def reserve(self, *, name: str, cid: int | None, owner_pid: int, slot_uid: int,
                instance_id: str = DEFAULT_INSTANCE_ID, owner_uid: int = 0, **fields: Any) -> EnclaveRecord:
        """Take an id, a unique name and a CID for a new enclave owned by ``owner_pid``, atomically.

        The record is written at once (state ``STARTING``) so concurrent launches see the name and CID as used.
        """
        enclave_id = make_enclave_id(instance_id, slot_uid)
        start = process_start_time(owner_pid)
        if start is None:
            raise ValueError(f"owner process {owner_pid} does not exist")
        with self.lock():
            live = self.live_records()
            if any(r.enclave_id == enclave_id for r in live):
                raise ValueError(f"enclave id {enclave_id} is already in use")
            final_name = unique_name(name, (r.name for r in live))
            final_cid = choose_cid(cid, (r.cid for r in live))
            directory = self.enclave_dir(enclave_id)
            self._clear(enclave_id, keep_console=False)
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            longest = directory / self.HEARTBEAT
            if len(os.fsencode(str(longest))) > _SUN_PATH_MAX:
                raise ConfigError(f"the run directory {self.root} is too deep for Unix socket paths "
                                  f"({len(str(longest))} > {_SUN_PATH_MAX} bytes)",
                                  hint=f"Set {RUN_DIR_ENV} to a shorter path.")
            record = EnclaveRecord(enclave_id=enclave_id, name=final_name, cid=final_cid, owner_pid=owner_pid,
                                   owner_start=start, owner_uid=owner_uid, **fields)
            self.write(record)
            return record

    def update(self, record: EnclaveRecord, **changes: Any) -> EnclaveRecord:
        new = replace(record, **changes)
        self.write(new)
        return new

    def find(self, *, enclave_id: str | None = None, name: str | None = None) -> EnclaveRecord:
        """The live enclave with this id (E40 if none) or name (E58 unless exactly one matches)."""
        if (enclave_id is None) == (name is None):
            raise ValueError("give exactly one of enclave_id and name")
        live = self.live_records()
        if enclave_id is not None:
            slot_of(enclave_id)
            for rec in live:
                if rec.enclave_id == enclave_id:
                    return rec
            raise EnclaveKitError(f"no running enclave has the id {enclave_id}", code="E40",
                                  hint="Run `enclavekit describe-enclaves` to list the running enclaves.")
        matches = [r for r in live if r.name == name]
        if len(matches) != 1:
            raise EnclaveKitError(f"{len(matches)} running enclaves are named {name!r}; expected exactly one",
                                  code="E58")
        return matches[0]

    # ---- cleanup

    def _clear(self, enclave_id: str, *, keep_console: bool) -> None:
        directory = self.enclave_dir(enclave_id)
        if not directory.is_dir():
            return
        for entry in os.listdir(directory):
            if keep_console and entry.startswith(self.CONSOLE):
                continue
            path = directory / entry
            with contextlib.suppress(FileNotFoundError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def remove(self, record: EnclaveRecord) -> None:
        """Remove what the enclave left in the run directory: record, sockets, its vsock channel directory.

        The console log stays (``<run>/<id>/console.log``) so a crashed enclave can still be debugged.
        """
        self._clear(record.enclave_id, keep_console=True)
        directory = self.enclave_dir(record.enclave_id)
        # nothing was ever written to the console (the launch failed early): keep no empty directory
        with contextlib.suppress(OSError):
            if (directory / self.CONSOLE).stat().st_size == 0:
                (directory / self.CONSOLE).unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()  # only succeeds when empty
        with self.lock():
            # the vsock directory of the CID, unless a live enclave took the CID over meanwhile
            if not any(r.cid == record.cid and r.enclave_id != record.enclave_id for r in self.live_records()):
                unmount_channel_dir(self.vsock_root / str(record.cid))
                shutil.rmtree(self.vsock_root / str(record.cid), ignore_errors=True)

    def clean_stale(self, release: Callable[[EnclaveRecord], None] | None = None) -> list[EnclaveRecord]:
        """Remove the leftovers of every enclave whose supervisor is gone; ``release`` frees its resources."""
        cleaned = []
        for rec in self.stale_records():
            if release is not None:
                release(rec)
            self.remove(rec)
            cleaned.append(rec)
        return cleaned
