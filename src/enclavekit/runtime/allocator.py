"""The enclave resource allocator: a pool of memory and CPUs that enclaves draw from, like AWS's.

nitro-cli reserves the pool at boot from ``/etc/nitro_enclaves/allocator.yaml`` (spec §3.7) and the CLI checks
every request against it.  Here the pool is described by ``allocator.yaml`` in the state directory and the
allocations live in a JSON ledger beside it (``allocations.json``), guarded by ``flock`` so several processes
(one supervisor per enclave) share the pool.  Each entry names its owner PID and that process's start time, so
the allocation of a supervisor that died (even by SIGKILL) is reclaimed by the next request.

The parsers and the :class:`ResourcePool` decision logic are pure; :class:`AllocationLedger` is the I/O shell.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from enclavekit._internal.state import atomic_write, ensure_private_dir, file_lock
from enclavekit.errors import AllocatorError, ConfigError, FileOperationError
from enclavekit.runtime.params import parse_memory

__all__ = [
    "MIN_ENCLAVE_MEMORY_MIB",
    "EIF_SIZE_RATIO",
    "AllocatorConfig",
    "Allocation",
    "ResourcePool",
    "AllocationLedger",
    "parse_cpu_list",
    "format_cpu_list",
    "parse_memory",
    "minimum_memory_mib",
    "check_memory_for_image",
    "online_cpus",
    "process_start_time",
]

MIB = 1024 * 1024
# spec §3.7: the driver's minimum enclave memory (NE_MIN_ENCLAVE_MEM_SIZE) …
MIN_ENCLAVE_MEMORY_MIB = 64
# … and the CLI's ENCLAVE_MEMORY_EIF_SIZE_RATIO: memory ≥ 4 × the EIF file size.
EIF_SIZE_RATIO = 4
# Sanity caps on untrusted text (kernel cpu-lists are ≤ 512 chars, spec §3.7).
_MAX_CPU_LIST_LEN = 512
_MAX_CPU_ID = 8191
_MAX_YAML_LEN = 64 * 1024

_CPU_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")
_ENCLAVE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


# ---------------------------------------------------------------- pure parsers

def parse_cpu_list(text: str, *, what: str = "cpu list") -> tuple[int, ...]:
    """Parse kernel cpu-list syntax (``"1-3,6"``, ``"3,5,7,9"``) into sorted unique ids.

    Strict: no spaces, no empty items, ranges ascending, no ``:stride`` form, no id given twice (E20 for a
    duplicate, E23 for anything malformed).
    """
    if not isinstance(text, str):
        raise TypeError("cpu list must be a str")
    if not text or len(text) > _MAX_CPU_LIST_LEN:
        raise AllocatorError(f"{what}: expected a kernel cpu-list such as 1-3,6, got {text[:40]!r}", code="E23")
    ids: list[int] = []
    for item in text.split(","):
        m = _CPU_ITEM.match(item)
        if m is None:
            raise AllocatorError(f"{what}: {item!r} is not a CPU id or an a-b range (in {text!r})", code="E23")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise AllocatorError(f"{what}: range {item!r} is descending", code="E23")
        if hi > _MAX_CPU_ID:
            raise AllocatorError(f"{what}: CPU id {hi} is above {_MAX_CPU_ID}", code="E23")
        ids.extend(range(lo, hi + 1))
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise AllocatorError(f"{what}: CPU id(s) {dup} given more than once", code="E20")
    return tuple(sorted(ids))


def format_cpu_list(ids: Iterable[int]) -> str:
    """The shortest kernel cpu-list for ``ids`` (``[1, 2, 3, 6]`` → ``"1-3,6"``)."""
    out: list[str] = []
    sorted_ids = sorted(set(ids))
    i = 0
    while i < len(sorted_ids):
        j = i
        while j + 1 < len(sorted_ids) and sorted_ids[j + 1] == sorted_ids[j] + 1:
            j += 1
        out.append(str(sorted_ids[i]) if i == j else f"{sorted_ids[i]}-{sorted_ids[j]}")
        i = j + 1
    return ",".join(out)


def check_memory_for_image(memory_mib: int, eif_size: int) -> None:
    """spec §3.7: memory 0 → E26; below the driver minimum or 4 × the EIF size → E26."""
    needed = minimum_memory_mib(eif_size)
    if memory_mib < needed:
        raise AllocatorError(f"--memory {memory_mib}: at least {needed} MB must be allocated "
                             f"(minimum {MIN_ENCLAVE_MEMORY_MIB} MiB and {EIF_SIZE_RATIO}× the image size)",
                             code="E26", details={"requested_mib": str(memory_mib), "minimum_mib": str(needed)})


def minimum_memory_mib(eif_size: int) -> int:
    """The least memory an enclave of an ``eif_size``-byte image may get: max(64 MiB, 4 × ⌈⌈size/1024⌉/1024⌉)."""
    if eif_size < 0:
        raise ValueError("eif_size must be >= 0")
    eif_kib = -(-eif_size // 1024)  # ceil
    eif_mib = -(-eif_kib // 1024)
    return max(MIN_ENCLAVE_MEMORY_MIB, EIF_SIZE_RATIO * eif_mib)


@dataclass(frozen=True)
class AllocatorConfig:
    """``allocator.yaml``: ``memory_mib`` and exactly one of ``cpu_count`` / ``cpu_pool``.

    ``cpu_sharing`` is enclavekit's extension (default false: AWS's semantics, each pool CPU belongs to one
    enclave at a time).  When true, enclaves share the pool's CPUs: each is still pinned to the CPUs it was given
    and ``--cpu-count`` / ``--cpu-ids`` must still fit the pool, but a CPU used by one enclave may be given to
    others.  Memory stays exclusive.
    """

    memory_mib: int
    cpu_count: int | None = None
    cpu_pool: tuple[int, ...] | None = None
    cpu_sharing: bool = False

    @classmethod
    def parse(cls, text: str) -> AllocatorConfig:
        """Parse the file the way AWS's allocator script does (spec §3.7), strictly.

        ``key: value`` lines; ``#`` comments (whole-line or trailing); an optional ``---`` document start as the
        first non-comment line; unknown keys, duplicate keys, empty values and both-or-neither CPU keys are
        errors (E03).
        """
        if not isinstance(text, str):
            raise TypeError("allocator.yaml must be given as str")
        if len(text) > _MAX_YAML_LEN:
            raise ConfigError(f"allocator.yaml: larger than {_MAX_YAML_LEN} bytes")
        values: dict[str, str] = {}
        seen_content = False
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line == "---":
                if seen_content:
                    raise ConfigError(f"allocator.yaml line {lineno}: a second document start '---'")
                seen_content = True
                continue
            seen_content = True
            key, sep, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if not sep or key not in ("memory_mib", "cpu_count", "cpu_pool", "cpu_sharing"):
                raise ConfigError(f"allocator.yaml line {lineno}: expected memory_mib, cpu_count, cpu_pool or "
                                  f"cpu_sharing, got {raw.strip()[:60]!r}")
            if not value:
                raise ConfigError(f"allocator.yaml line {lineno}: {key} has no value")
            if key in values:
                raise ConfigError(f"allocator.yaml line {lineno}: {key} given twice")
            values[key] = value
        if "memory_mib" not in values:
            raise ConfigError("allocator.yaml: memory_mib is required")
        memory_mib = _positive_int(values["memory_mib"], "memory_mib")
        if ("cpu_count" in values) == ("cpu_pool" in values):
            raise ConfigError("allocator.yaml: give exactly one of cpu_count and cpu_pool")
        sharing = values.get("cpu_sharing", "false")
        if sharing not in ("true", "false"):
            raise ConfigError(f"allocator.yaml: cpu_sharing must be true or false, got {sharing[:40]!r}")
        if "cpu_count" in values:
            return cls(memory_mib=memory_mib, cpu_count=_positive_int(values["cpu_count"], "cpu_count"),
                       cpu_sharing=sharing == "true")
        try:
            pool = parse_cpu_list(values["cpu_pool"], what="allocator.yaml cpu_pool")
        except AllocatorError as exc:
            raise ConfigError(exc.message) from exc
        return cls(memory_mib=memory_mib, cpu_pool=pool, cpu_sharing=sharing == "true")

    def to_text(self) -> str:
        lines = ["---", f"memory_mib: {self.memory_mib}"]
        if self.cpu_count is not None:
            lines.append(f"cpu_count: {self.cpu_count}")
        if self.cpu_pool is not None:
            lines.append(f"cpu_pool: {format_cpu_list(self.cpu_pool)}")
        if self.cpu_sharing:
            lines.append("cpu_sharing: true")
        return "\n".join(lines) + "\n"


def _positive_int(value: str, key: str) -> int:
    if not value.isdigit() or len(value) > 12 or int(value) <= 0:
        raise ConfigError(f"allocator.yaml: {key} must be a positive integer, got {value[:40]!r}")
    return int(value)


# ---------------------------------------------------------------- the pool (pure)

@dataclass(frozen=True)
class Allocation:
    """What one enclave holds: memory in MiB and the CPU ids it is pinned to."""

    enclave_id: str
    memory_mib: int
    cpu_ids: tuple[int, ...]
    owner_pid: int = 0
    owner_start: int = 0

    def to_json(self) -> dict[str, object]:
        return {"enclave_id": self.enclave_id, "memory_mib": self.memory_mib, "cpu_ids": list(self.cpu_ids),
                "owner_pid": self.owner_pid, "owner_start": self.owner_start}

    @classmethod
    def from_json(cls, obj: object) -> Allocation:
        if not isinstance(obj, dict):
            raise AllocatorError("allocation ledger: an entry is not an object")
        try:
            eid, mem, cpus = obj["enclave_id"], obj["memory_mib"], obj["cpu_ids"]
            pid, start = obj["owner_pid"], obj["owner_start"]
        except KeyError as exc:
            raise AllocatorError(f"allocation ledger: an entry lacks {exc.args[0]}") from exc
        ints_ok = all(type(v) is int and v >= 0 for v in (mem, pid, start))
        if (not isinstance(eid, str) or not ints_ok or not isinstance(cpus, list)
                or not all(type(c) is int and c >= 0 for c in cpus)):
            raise AllocatorError("allocation ledger: an entry has fields of the wrong type")
        return cls(enclave_id=eid, memory_mib=mem, cpu_ids=tuple(cpus), owner_pid=pid, owner_start=start)


@dataclass
class ResourcePool:
    """The enclave pool and what is drawn from it.  Decisions only; no I/O.

    ``online`` is the host's online CPU ids.  In ``cpu_count`` mode the pool is the lowest ``cpu_count`` online
    CPUs other than CPU 0 (nitro-cli never gives CPU 0 to enclaves; SMT siblings are not modelled here).  A
    ``cpu_pool`` must name online CPUs and leave at least one to the parent.
    """

    config: AllocatorConfig
    online: tuple[int, ...]
    allocations: dict[str, Allocation] = field(default_factory=dict)
    cpus: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        online = tuple(sorted(set(self.online)))
        if not online:
            raise ValueError("no online CPUs given")
        if self.config.cpu_count is not None:
            candidates = [c for c in online if c != 0]
            if self.config.cpu_count > len(candidates):
                raise ConfigError(
                    f"allocator.yaml: cpu_count {self.config.cpu_count} leaves the parent no CPU "
                    f"(online CPUs {format_cpu_list(online)}; CPU 0 always stays with the parent)")
            self.cpus = tuple(candidates[: self.config.cpu_count])
        else:
            pool = self.config.cpu_pool or ()
            offline = sorted(set(pool) - set(online))
            if offline:
                raise ConfigError(f"allocator.yaml: cpu_pool names CPUs that are not online: {offline}")
            if set(pool) >= set(online):
                raise ConfigError("allocator.yaml: cpu_pool holds every online CPU; the parent must keep one")
            self.cpus = tuple(pool)

    @property
    def used_memory_mib(self) -> int:
        return sum(a.memory_mib for a in self.allocations.values())

    @property
    def free_memory_mib(self) -> int:
        return self.config.memory_mib - self.used_memory_mib

    @property
    def free_cpus(self) -> tuple[int, ...]:
        """The CPUs a new enclave may get: the unused ones, or the whole pool when ``cpu_sharing`` is on."""
        if self.config.cpu_sharing:
            return self.cpus
        used = {c for a in self.allocations.values() for c in a.cpu_ids}
        return tuple(c for c in self.cpus if c not in used)

    def allocate(self, enclave_id: str, memory_mib: int, *, cpu_count: int | None = None,
                 cpu_ids: Iterable[int] | None = None, eif_size: int = 0, owner_pid: int = 0,
                 owner_start: int = 0) -> Allocation:
        """Draw memory and CPUs for ``enclave_id``; raise with nitro-cli's code when the request cannot be met."""
        if not isinstance(enclave_id, str) or not _ENCLAVE_ID.match(enclave_id):
            raise ValueError(f"bad enclave id {enclave_id!r}")
        if enclave_id in self.allocations:
            raise ValueError(f"enclave {enclave_id} already holds an allocation")
        if (cpu_count is None) == (cpu_ids is None):
            raise ValueError("give exactly one of cpu_count and cpu_ids")
        if type(memory_mib) is not int:
            raise TypeError("memory_mib must be an int")
        check_memory_for_image(memory_mib, eif_size)
        free_cpus = self.free_cpus
        if cpu_ids is not None:
            ids = list(cpu_ids)
            if not all(type(c) is int for c in ids):
                raise TypeError("cpu_ids must be ints")
            if not ids:
                raise AllocatorError("--cpu-ids: no CPU id given", code="E20")
            if len(set(ids)) != len(ids):
                raise AllocatorError(f"--cpu-ids {ids}: a CPU id is given more than once", code="E20")
            outside = [c for c in ids if c not in self.cpus]
            if outside:
                raise AllocatorError(f"--cpu-ids: CPU(s) {outside} are not in the enclave CPU pool "
                                     f"{format_cpu_list(self.cpus) or '(empty)'}", code="E21")
            busy = [c for c in ids if c not in free_cpus]
            if busy:
                raise AllocatorError(f"--cpu-ids: CPU(s) {busy} are already used by another enclave", code="E22")
            chosen = tuple(sorted(ids))
        else:
            assert cpu_count is not None
            if type(cpu_count) is not int:
                raise TypeError("cpu_count must be an int")
            if cpu_count <= 0:
                raise AllocatorError(f"--cpu-count {cpu_count}: must be at least 1", code="E20")
            if cpu_count > len(free_cpus):
                raise AllocatorError(f"--cpu-count {cpu_count}: only {len(free_cpus)} of the pool's "
                                     f"{len(self.cpus)} CPUs are free", code="E22")
            chosen = free_cpus[:cpu_count]
        if memory_mib > self.free_memory_mib:
            raise AllocatorError(f"--memory {memory_mib}: only {self.free_memory_mib} of the pool's "
                                 f"{self.config.memory_mib} MiB are free", code="E27")
        alloc = Allocation(enclave_id=enclave_id, memory_mib=memory_mib, cpu_ids=chosen, owner_pid=owner_pid,
                           owner_start=owner_start)
        self.allocations[enclave_id] = alloc
        return alloc

    def release(self, enclave_id: str) -> Allocation | None:
        """Give back what ``enclave_id`` holds; None if it holds nothing (release is idempotent)."""
        return self.allocations.pop(enclave_id, None)

    def reclaim(self, is_alive: Callable[[Allocation], bool]) -> list[Allocation]:
        """Release every allocation whose owner ``is_alive`` says is gone; return them."""
        dead = [a for a in self.allocations.values() if not is_alive(a)]
        for a in dead:
            del self.allocations[a.enclave_id]
        return dead


# ---------------------------------------------------------------- I/O shell

def online_cpus(path: Path = Path("/sys/devices/system/cpu/online")) -> tuple[int, ...]:
    """The host's online CPU ids."""
    try:
        return parse_cpu_list(path.read_text(encoding="ascii").strip(), what=str(path))
    except OSError as exc:
        raise FileOperationError(f"cannot read {path}: {exc.strerror}") from exc


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot, /proc/PID/stat field 22) of ``pid``, or None if it is gone.

    A PID plus its start time names one process even after the PID is reused.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _owner_alive(alloc: Allocation) -> bool:
    if alloc.owner_pid <= 0:
        return True  # no owner recorded: only an explicit release frees it
    start = process_start_time(alloc.owner_pid)
    return start is not None and alloc.owner_start in (0, start)


class AllocationLedger:
    """The shared pool: ``allocator.yaml`` + ``allocations.json`` in ``state_dir``, serialized by ``flock``."""

    CONFIG_NAME = "allocator.yaml"
    LEDGER_NAME = "allocations.json"
    LOCK_NAME = "allocations.lock"

    def __init__(self, state_dir: Path, *, online: tuple[int, ...] | None = None,
                 is_alive: Callable[[Allocation], bool] = _owner_alive) -> None:
        self.state_dir = Path(state_dir)
        self._online = online
        self._is_alive = is_alive

    def config(self) -> AllocatorConfig:
        path = self.state_dir / self.CONFIG_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ConfigError(f"no allocator configuration at {path}",
                              hint="Write memory_mib and cpu_count (or cpu_pool) into it; see docs/sandbox.md.") \
                from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise FileOperationError(f"cannot read {path}: {exc}") from exc
        return AllocatorConfig.parse(text)

    def _load(self) -> ResourcePool:
        pool = ResourcePool(self.config(), self._online if self._online is not None else online_cpus())
        path = self.state_dir / self.LEDGER_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return pool
        except OSError as exc:
            raise FileOperationError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AllocatorError(f"allocation ledger {path} is not JSON") from exc
        if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("allocations"), list):
            raise AllocatorError(f"allocation ledger {path}: expected {{version: 1, allocations: [...]}}")
        for entry in doc["allocations"]:
            alloc = Allocation.from_json(entry)
            if alloc.enclave_id in pool.allocations:
                raise AllocatorError(f"allocation ledger {path}: enclave {alloc.enclave_id} listed twice")
            pool.allocations[alloc.enclave_id] = alloc
        return pool

    def _store(self, pool: ResourcePool) -> None:
        doc = {"version": 1, "allocations": [a.to_json() for a in pool.allocations.values()]}
        atomic_write(self.state_dir / self.LEDGER_NAME, json.dumps(doc, indent=2).encode() + b"\n")

    def allocate(self, enclave_id: str, memory_mib: int, *, cpu_count: int | None = None,
                 cpu_ids: Iterable[int] | None = None, eif_size: int = 0, owner_pid: int | None = None) -> Allocation:
        """Draw from the shared pool for ``enclave_id`` owned by ``owner_pid`` (default: this process)."""
        pid = os.getpid() if owner_pid is None else owner_pid
        start = process_start_time(pid) or 0
        ensure_private_dir(self.state_dir)
        with file_lock(self.state_dir / self.LOCK_NAME):
            pool = self._load()
            pool.reclaim(self._is_alive)
            alloc = pool.allocate(enclave_id, memory_mib, cpu_count=cpu_count, cpu_ids=cpu_ids,
                                  eif_size=eif_size, owner_pid=pid, owner_start=start)
            self._store(pool)
            return alloc

    def release(self, enclave_id: str) -> Allocation | None:
        ensure_private_dir(self.state_dir)
        with file_lock(self.state_dir / self.LOCK_NAME):
            pool = self._load()
            alloc = pool.release(enclave_id)
            pool.reclaim(self._is_alive)
            self._store(pool)
            return alloc

    def allocations(self) -> Mapping[str, Allocation]:
        """The live allocations (dead owners' entries are reclaimed on the way)."""
        ensure_private_dir(self.state_dir)
        with file_lock(self.state_dir / self.LOCK_NAME):
            pool = self._load()
            if pool.reclaim(self._is_alive):
                self._store(pool)
            return dict(pool.allocations)
