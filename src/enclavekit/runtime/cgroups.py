"""Control groups for enclaves: memory, pids and cpuset limits on cgroup v1 and v2.

An enclave's group is always created *below this process's own cgroup* (per controller on v1: the path that
``/proc/self/cgroup`` gives for that controller), never anywhere else.  The layout is read from a mountinfo text
and a ``/proc/self/cgroup`` text by a pure parser (:func:`parse_layout`); ``root`` prefixes every mount point so
tests run the v2 code against a fake cgroup tree in a temporary directory.

v2: ``memory.max`` + ``memory.swap.max = 0`` + ``memory.oom.group = 1`` (an OOM kills the whole enclave),
``pids.max``, ``cpuset.cpus`` (when the cpuset controller is available; ``+cpuset`` etc. are enabled in the
parent's ``cgroup.subtree_control``), OOM kills from ``memory.events``, ``cgroup.kill`` to kill.
v1: ``memory.limit_in_bytes`` (+ ``memory.memsw.limit_in_bytes`` when swap accounting exists), ``pids.max``,
``cpuset.cpus`` with ``cpuset.mems`` copied from the parent, OOM kills from ``memory.oom_control``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from enclavekit.errors import CgroupError
from enclavekit.runtime.allocator import format_cpu_list

__all__ = [
    "CONTROLLERS",
    "CgroupMount",
    "CgroupLayout",
    "Cgroup",
    "CgroupV1",
    "CgroupV2",
    "parse_layout",
    "current_layout",
    "create_cgroup",
]

# The controllers an enclave needs.
CONTROLLERS = ("memory", "pids", "cpuset")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_REMOVE_TIMEOUT = 5.0


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup hierarchy: where it is mounted, the mount's root inside the hierarchy, its v1 controllers."""

    mount_point: str
    root: str
    version: int
    controllers: frozenset[str]


@dataclass(frozen=True)
class CgroupLayout:
    """Which cgroup version serves the enclave controllers, and this process's own group directory for each.

    ``own_dirs`` maps a controller (v1) or ``""`` (v2) to the filesystem directory of this process's cgroup.
    """

    version: int
    own_dirs: dict[str, Path]

    def own_dir(self, controller: str) -> Path:
        return self.own_dirs["" if self.version == 2 else controller]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _parse_mounts(mountinfo: str) -> list[CgroupMount]:
    mounts: list[CgroupMount] = []
    for line in mountinfo.splitlines():
        if not line.strip():
            continue
        left, sep, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if not sep or len(lf) < 6 or len(rf) < 3:
            raise CgroupError(f"mountinfo: malformed line {line[:80]!r}")
        fstype, superopts = rf[0], rf[2].split(",")
        if fstype == "cgroup2":
            mounts.append(CgroupMount(_unescape(lf[4]), _unescape(lf[3]), 2, frozenset()))
        elif fstype == "cgroup":
            ctrls = frozenset(o for o in superopts if o in CONTROLLERS)
            if ctrls:
                mounts.append(CgroupMount(_unescape(lf[4]), _unescape(lf[3]), 1, ctrls))
    return mounts


def _parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """``/proc/self/cgroup`` → (v1 controller → path, v2 path or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            raise CgroupError(f"/proc/self/cgroup: malformed line {line[:80]!r}")
        hier, ctrls, path = parts
        if hier == "0" and ctrls == "":
            v2 = path
        else:
            for c in ctrls.split(","):
                v1[c] = path
    return v1, v2


def _join(mount: CgroupMount, cg_path: str, root: Path) -> Path:
    # The process's path is relative to the hierarchy's root; the mount may expose only a subtree of it.
    rel = cg_path
    if mount.root != "/":
        if not (cg_path == mount.root or cg_path.startswith(mount.root.rstrip("/") + "/")):
            raise CgroupError(f"own cgroup {cg_path} is not visible under the mount of {mount.root}")
        rel = cg_path[len(mount.root.rstrip("/")):]
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise CgroupError(f"own cgroup path {cg_path!r} is not canonical")
    return root.joinpath(mount.mount_point.lstrip("/"), *parts)


def parse_layout(mountinfo: str, proc_cgroup: str, *, root: Path = Path("/")) -> CgroupLayout:
    """Decide v1 or v2 and find this process's own cgroup directories.  Pure (``root`` is only joined).

    v1 wins when the memory, pids and cpuset controllers are all mounted as v1 hierarchies (the hybrid layout
    of systemd's "legacy" and "hybrid" modes); otherwise the cgroup2 mount is used.
    """
    mounts = _parse_mounts(mountinfo)
    v1_paths, v2_path = _parse_proc_cgroup(proc_cgroup)
    v1_mounts = {c: m for m in mounts if m.version == 1 for c in m.controllers}
    if all(c in v1_mounts for c in CONTROLLERS):
        dirs: dict[str, Path] = {}
        for c in CONTROLLERS:
            if c not in v1_paths:
                raise CgroupError(f"/proc/self/cgroup has no line for the {c} controller")
            dirs[c] = _join(v1_mounts[c], v1_paths[c], root)
        return CgroupLayout(1, dirs)
    v2_mounts = [m for m in mounts if m.version == 2]
    if not v2_mounts or v2_path is None:
        missing = [c for c in CONTROLLERS if c not in v1_mounts]
        raise CgroupError(f"no cgroup v2 mount and no v1 hierarchy for {', '.join(missing)}")
    return CgroupLayout(2, {"": _join(v2_mounts[0], v2_path, root)})


def current_layout(*, root: Path = Path("/"), mountinfo: Path = Path("/proc/self/mountinfo"),
                   proc_cgroup: Path = Path("/proc/self/cgroup")) -> CgroupLayout:
    try:
        return parse_layout(mountinfo.read_text(encoding="utf-8"), proc_cgroup.read_text(encoding="utf-8"),
                            root=root)
    except OSError as exc:
        raise CgroupError(f"cannot read the cgroup layout: {exc}") from exc


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as fh:
            fh.write(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii")
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _pids_in(dirs: Iterable[Path]) -> set[int]:
    pids: set[int] = set()
    for d in dirs:
        with contextlib.suppress(FileNotFoundError):
            pids.update(int(x) for x in (d / "cgroup.procs").read_text(encoding="ascii").split())
    return pids


class Cgroup(ABC):
    """An enclave's cgroup.  Create with :func:`create_cgroup`; always finish with :meth:`destroy`."""

    name: str

    @property
    @abstractmethod
    def dirs(self) -> tuple[Path, ...]:
        """Every directory that makes up this group (one on v2, one per controller on v1)."""

    @abstractmethod
    def set_memory_limit(self, limit_bytes: int) -> None: ...

    @abstractmethod
    def set_pids_max(self, pids_max: int) -> None: ...

    @abstractmethod
    def set_cpus(self, cpu_ids: Iterable[int]) -> bool:
        """Pin the group to ``cpu_ids``; False when the cpuset controller is unavailable (v2 only)."""

    @abstractmethod
    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer killed in this group."""

    @abstractmethod
    def _write_procs(self, pid: int) -> None: ...

    def add_pid(self, pid: int) -> None:
        if type(pid) is not int or pid <= 0:
            raise ValueError("pid must be a positive int")
        self._write_procs(pid)

    def pids(self) -> set[int]:
        return _pids_in(self.dirs)

    def kill_all(self, *, timeout: float = _REMOVE_TIMEOUT) -> None:
        """SIGKILL every process in the group and wait until the group is empty."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            self._kill(pids)
            if time.monotonic() > deadline:
                raise CgroupError(f"processes {sorted(pids)[:10]} survive in cgroup {self.name}")
            time.sleep(0.01)

    def _kill(self, pids: set[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, *, timeout: float = _REMOVE_TIMEOUT) -> None:
        """rmdir the group's directories once empty; retries briefly (exiting tasks keep it busy a moment)."""
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove cgroup {d}: {exc.strerror}") from exc
                    time.sleep(0.01)

    def destroy(self) -> None:
        """Kill everything in the group and remove it.  Safe to call twice."""
        self.kill_all()
        self.remove()


def _make_child(parent: Path, name: str) -> Path:
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"bad cgroup name {name!r}")
    child = parent / name
    try:
        child.mkdir(mode=0o755)
    except FileExistsError as exc:
        raise CgroupError(f"cgroup {child} already exists") from exc
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {child}: {exc.strerror}") from exc
    return child


class CgroupV2(Cgroup):
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.cpuset_enabled = False

    @classmethod
    def create(cls, parent: Path, name: str) -> CgroupV2:
        """Create ``parent/name`` and enable the controllers it needs in ``parent/cgroup.subtree_control``."""
        available = set(_read(parent / "cgroup.controllers").split())
        missing = [c for c in ("memory", "pids") if c not in available]
        if missing:
            raise CgroupError(f"cgroup v2: controllers {missing} are not delegated to {parent}")
        wanted = ["memory", "pids"] + (["cpuset"] if "cpuset" in available else [])
        enabled = set(_read(parent / "cgroup.subtree_control").split())
        todo = [c for c in wanted if c not in enabled]
        if todo:
            # Fails with EBUSY when the parent still holds processes ("no internal processes" rule):
            # run enclavekit in a delegated cgroup of its own (e.g. systemd-run --scope -p Delegate=yes).
            _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))
        group = cls(name, _make_child(parent, name))
        group.cpuset_enabled = "cpuset" in wanted
        return group

    @property
    def dirs(self) -> tuple[Path, ...]:
        return (self.path,)

    def set_memory_limit(self, limit_bytes: int) -> None:
        _write(self.path / "memory.max", str(int(limit_bytes)))
        if (self.path / "memory.swap.max").exists():
            _write(self.path / "memory.swap.max", "0")
        if (self.path / "memory.oom.group").exists():
            _write(self.path / "memory.oom.group", "1")

    def set_pids_max(self, pids_max: int) -> None:
        _write(self.path / "pids.max", str(int(pids_max)))

    def set_cpus(self, cpu_ids: Iterable[int]) -> bool:
        if not self.cpuset_enabled:
            return False
        _write(self.path / "cpuset.cpus", format_cpu_list(cpu_ids))
        return True

    def oom_kills(self) -> int:
        for line in _read(self.path / "memory.events").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def _write_procs(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def kill_all(self, *, timeout: float = _REMOVE_TIMEOUT) -> None:
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists() and self.path.exists():
            with contextlib.suppress(CgroupError):
                _write(kill_file, "1")  # 5.14+: kills the group atomically, forks included
        super().kill_all(timeout=timeout)


class CgroupV1(Cgroup):
    def __init__(self, name: str, paths: dict[str, Path]) -> None:
        self.name = name
        self.paths = paths

    @classmethod
    def create(cls, parents: dict[str, Path], name: str) -> CgroupV1:
        paths: dict[str, Path] = {}
        try:
            for c in CONTROLLERS:
                paths[c] = _make_child(parents[c], name)
                if c == "cpuset":
                    # v1 cpuset: a new group starts with empty cpus/mems and refuses tasks until both are set.
                    _write(paths[c] / "cpuset.mems", _read(parents[c] / "cpuset.mems").strip())
                    _write(paths[c] / "cpuset.cpus", _read(parents[c] / "cpuset.cpus").strip())
        except BaseException:
            for p in paths.values():
                with contextlib.suppress(OSError):
                    os.rmdir(p)
            raise
        return cls(name, paths)

    @property
    def dirs(self) -> tuple[Path, ...]:
        return tuple(self.paths[c] for c in CONTROLLERS)

    def set_memory_limit(self, limit_bytes: int) -> None:
        mem = self.paths["memory"]
        _write(mem / "memory.limit_in_bytes", str(int(limit_bytes)))
        if (mem / "memory.memsw.limit_in_bytes").exists():
            # memsw = memory + swap; equal to the memory limit means no swap (must be set after the limit).
            _write(mem / "memory.memsw.limit_in_bytes", str(int(limit_bytes)))

    def set_pids_max(self, pids_max: int) -> None:
        _write(self.paths["pids"] / "pids.max", str(int(pids_max)))

    def set_cpus(self, cpu_ids: Iterable[int]) -> bool:
        _write(self.paths["cpuset"] / "cpuset.cpus", format_cpu_list(cpu_ids))
        return True

    def oom_kills(self) -> int:
        mem = self.paths["memory"]
        for line in _read(mem / "memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        # Kernels before 4.13 have no oom_kill counter: report whether the limit was ever hit.
        return 1 if int(_read(mem / "memory.failcnt").strip() or "0") > 0 else 0

    def _write_procs(self, pid: int) -> None:
        for c in CONTROLLERS:
            _write(self.paths[c] / "cgroup.procs", str(pid))


def create_cgroup(name: str, *, layout: CgroupLayout | None = None) -> Cgroup:
    """Create the enclave group ``name`` below this process's own cgroup (v1: in each controller)."""
    lay = layout if layout is not None else current_layout()
    if lay.version == 2:
        return CgroupV2.create(lay.own_dir(""), name)
    return CgroupV1.create({c: lay.own_dir(c) for c in CONTROLLERS}, name)
