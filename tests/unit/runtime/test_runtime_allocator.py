"""allocator.yaml, cpu-lists, --memory units, the pool's decisions (nitro-cli's codes) and the shared ledger."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from enclavekit.errors import AllocatorError, ConfigError
from enclavekit.runtime.allocator import (
    Allocation,
    AllocationLedger,
    AllocatorConfig,
    ResourcePool,
    format_cpu_list,
    minimum_memory_mib,
    parse_cpu_list,
    parse_memory,
    process_start_time,
)

# ---------------------------------------------------------------- cpu-lists


@pytest.mark.parametrize(("text", "ids"), [
    ("1-3,4-6,7-9", tuple(range(1, 10))),
    ("3,5,7,9", (3, 5, 7, 9)),
    ("2,3,6-9", (2, 3, 6, 7, 8, 9)),
    ("0", (0,)),
    ("5-5", (5,)),
])
def test_cpu_list_valid(text: str, ids: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == ids


@pytest.mark.parametrize("text", ["3+5", "3-a", "", "1,,2", " 1", "1-", "-1", "3-1", "1-2:1/2", "9999"])
def test_cpu_list_malformed_is_e23(text: str) -> None:
    with pytest.raises(AllocatorError) as info:
        parse_cpu_list(text)
    assert info.value.code == "E23"


def test_cpu_list_duplicate_is_e20() -> None:
    with pytest.raises(AllocatorError) as info:
        parse_cpu_list("1-3,2")
    assert info.value.code == "E20"


def test_format_cpu_list_round_trip() -> None:
    assert format_cpu_list([9, 1, 2, 3, 6]) == "1-3,6,9"
    assert parse_cpu_list(format_cpu_list([1, 2, 3, 6, 9])) == (1, 2, 3, 6, 9)


# ---------------------------------------------------------------- --memory (spec §3.2)


@pytest.mark.parametrize(("text", "mib"), [
    ("512", 512), ("512M", 512), ("512m", 512), ("2G", 2048), ("2g", 2048), ("1T", 1024 * 1024),
    ("1t", 1024 * 1024), ("0", 0),
])
def test_memory_units(text: str, mib: int) -> None:
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text", ["256_mb", "1.5G", "-1", "", "256 M", "256MB", "G", "256K"])
def test_memory_invalid_is_e03(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_memory(text)
    assert info.value.code == "E03"


def test_minimum_memory() -> None:
    assert minimum_memory_mib(0) == 64
    assert minimum_memory_mib(16 * 1024 * 1024) == 64
    assert minimum_memory_mib(16 * 1024 * 1024 + 1) == 68  # ⌈17 MiB⌉ × 4
    assert minimum_memory_mib(100 * 1024 * 1024) == 400


# ---------------------------------------------------------------- allocator.yaml


def test_config_cpu_count() -> None:
    cfg = AllocatorConfig.parse("---\n# comment\nmemory_mib: 512   # MiB\ncpu_count: 2\n")
    assert cfg == AllocatorConfig(memory_mib=512, cpu_count=2)
    assert AllocatorConfig.parse(cfg.to_text()) == cfg


def test_config_cpu_pool() -> None:
    cfg = AllocatorConfig.parse("memory_mib: 1024\ncpu_pool: 2,3,6-9\n")
    assert cfg.cpu_pool == (2, 3, 6, 7, 8, 9)
    assert AllocatorConfig.parse(cfg.to_text()) == cfg


@pytest.mark.parametrize(("text", "why"), [
    ("cpu_count: 2\n", "memory_mib is required"),
    ("memory_mib: 512\n", "exactly one"),
    ("memory_mib: 512\ncpu_count: 2\ncpu_pool: 1\n", "exactly one"),
    ("memory_mib: 512\ncpu_count: 2\nhuge: 1\n", "expected memory_mib"),
    ("memory_mib:\ncpu_count: 2\n", "no value"),
    ("memory_mib: 512\nmemory_mib: 512\ncpu_count: 2\n", "given twice"),
    ("memory_mib: 0\ncpu_count: 2\n", "positive integer"),
    ("memory_mib: 512\ncpu_count: -2\n", "positive integer"),
    ("memory_mib: 512M\ncpu_count: 2\n", "positive integer"),
    ("memory_mib: 512\ncpu_pool: 3+5\n", "cpu_pool"),
    ("memory_mib: 512\ncpu_pool: 3-a\n", "cpu_pool"),
    ("memory_mib: 512\ncpu_pool: 1,1\n", "more than once"),
    ("---\nmemory_mib: 512\n---\ncpu_count: 1\n", "second document"),
    ("memory_mib 512\ncpu_count: 1\n", "expected memory_mib"),
    ("memory_mib: 512\ncpu_count: 1\ncpu_sharing: yes\n", "true or false"),
    ("memory_mib: 512\ncpu_count: 1\ncpu_sharing:\n", "no value"),
    ("memory_mib: 512\ncpu_count: 1\ncpu_sharing: true\ncpu_sharing: true\n", "given twice"),
])
def test_config_invalid_is_e03(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        AllocatorConfig.parse(text)
    assert info.value.code == "E03"
    assert why in str(info.value)


# ---------------------------------------------------------------- the pool


def _pool(text: str = "memory_mib: 1024\ncpu_count: 3\n", online: tuple[int, ...] = (0, 1, 2, 3)) -> ResourcePool:
    return ResourcePool(AllocatorConfig.parse(text), online)


def test_cpu_count_mode_never_uses_cpu0() -> None:
    assert _pool().cpus == (1, 2, 3)


def test_cpu_count_leaving_parent_nothing_is_refused() -> None:
    with pytest.raises(ConfigError):
        _pool("memory_mib: 512\ncpu_count: 4\n")


def test_cpu_pool_with_every_online_cpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="parent must keep one"):
        _pool("memory_mib: 512\ncpu_pool: 0-3\n")


def test_cpu_pool_offline_cpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="not online"):
        _pool("memory_mib: 512\ncpu_pool: 1,7\n")


def test_cpu_pool_may_hold_cpu0_when_the_parent_keeps_another() -> None:
    assert _pool("memory_mib: 512\ncpu_pool: 0,1\n").cpus == (0, 1)


def test_allocate_and_release() -> None:
    pool = _pool()
    a = pool.allocate("i-1-enc1", 256, cpu_count=2)
    assert a.cpu_ids == (1, 2) and a.memory_mib == 256
    b = pool.allocate("i-1-enc2", 768, cpu_ids=[3])
    assert pool.free_memory_mib == 0 and pool.free_cpus == ()
    assert pool.release("i-1-enc1") == a
    assert pool.release("i-1-enc1") is None
    assert pool.free_cpus == (1, 2) and pool.free_memory_mib == 256
    assert b.cpu_ids == (3,)


def _code(exc: pytest.ExceptionInfo[AllocatorError]) -> str:
    return exc.value.code


def test_duplicate_cpu_ids_e20() -> None:
    with pytest.raises(AllocatorError) as info:
        _pool().allocate("e", 128, cpu_ids=[1, 1])
    assert _code(info) == "E20"


def test_zero_cpu_count_e20() -> None:
    with pytest.raises(AllocatorError) as info:
        _pool().allocate("e", 128, cpu_count=0)
    assert _code(info) == "E20"


def test_cpu_id_not_in_pool_e21() -> None:
    with pytest.raises(AllocatorError) as info:
        _pool().allocate("e", 128, cpu_ids=[0])
    assert _code(info) == "E21"


def test_not_enough_cpus_e22() -> None:
    pool = _pool()
    pool.allocate("a", 128, cpu_count=2)
    with pytest.raises(AllocatorError) as info:
        pool.allocate("b", 128, cpu_count=2)
    assert _code(info) == "E22"


def test_cpu_in_use_e22() -> None:
    pool = _pool()
    pool.allocate("a", 128, cpu_ids=[2])
    with pytest.raises(AllocatorError) as info:
        pool.allocate("b", 128, cpu_ids=[2])
    assert _code(info) == "E22"


@pytest.mark.parametrize(("memory", "eif_size"), [(0, 0), (63, 0), (100, 30 * 1024 * 1024)])
def test_too_little_memory_e26(memory: int, eif_size: int) -> None:
    with pytest.raises(AllocatorError) as info:
        _pool().allocate("e", memory, cpu_count=1, eif_size=eif_size)
    assert _code(info) == "E26"
    assert "must be allocated" in str(info.value)


# ---------------------------------------------------------------- cpu_sharing (enclavekit's extension)

_SHARED = "memory_mib: 1024\ncpu_pool: 1\ncpu_sharing: true\n"


def test_config_cpu_sharing_round_trip() -> None:
    cfg = AllocatorConfig.parse(_SHARED)
    assert cfg.cpu_sharing is True
    assert AllocatorConfig.parse(cfg.to_text()) == cfg
    assert AllocatorConfig.parse("memory_mib: 1\ncpu_count: 1\n").cpu_sharing is False  # AWS's default
    assert AllocatorConfig.parse("memory_mib: 1\ncpu_count: 1\ncpu_sharing: false\n").cpu_sharing is False


def test_shared_cpus_go_to_several_enclaves_and_stay_pinned() -> None:
    pool = _pool(_SHARED, online=(0, 1))
    got = [pool.allocate(f"e{i}", 64, cpu_count=1).cpu_ids for i in range(8)]
    got.append(pool.allocate("by-id", 64, cpu_ids=[1]).cpu_ids)
    assert got == [(1,)] * 9


def test_shared_pool_still_refuses_cpus_outside_it_e21_and_too_many_e22() -> None:
    pool = _pool(_SHARED, online=(0, 1))
    with pytest.raises(AllocatorError) as info:
        pool.allocate("a", 64, cpu_ids=[0])
    assert _code(info) == "E21"
    with pytest.raises(AllocatorError) as info:
        pool.allocate("b", 64, cpu_count=2)
    assert _code(info) == "E22"


def test_shared_pool_keeps_memory_exclusive_e27() -> None:
    pool = _pool(_SHARED, online=(0, 1))
    pool.allocate("a", 1000, cpu_count=1)
    with pytest.raises(AllocatorError) as info:
        pool.allocate("b", 64, cpu_count=1)
    assert _code(info) == "E27"


def test_not_enough_memory_e27() -> None:
    pool = _pool()
    pool.allocate("a", 1000, cpu_count=1)
    with pytest.raises(AllocatorError) as info:
        pool.allocate("b", 64, cpu_count=1)
    assert _code(info) == "E27"


def test_caller_bugs_are_value_errors() -> None:
    pool = _pool()
    with pytest.raises(ValueError):
        pool.allocate("e", 128, cpu_count=1, cpu_ids=[1])
    with pytest.raises(ValueError):
        pool.allocate("e", 128)
    with pytest.raises(ValueError):
        pool.allocate("../x", 128, cpu_count=1)
    pool.allocate("e", 128, cpu_count=1)
    with pytest.raises(ValueError):
        pool.allocate("e", 128, cpu_count=1)


def test_failed_request_changes_nothing() -> None:
    pool = _pool()
    with pytest.raises(AllocatorError):
        pool.allocate("e", 4096, cpu_count=1)
    assert pool.allocations == {} and pool.free_cpus == (1, 2, 3)


# ---------------------------------------------------------------- the ledger (files in a temp state dir)


def _ledger(tmp_path: Path, text: str = "memory_mib: 1024\ncpu_count: 2\n") -> AllocationLedger:
    (tmp_path / "allocator.yaml").write_text(text)
    return AllocationLedger(tmp_path, online=(0, 1, 2))


def test_ledger_is_shared_between_instances(tmp_path: Path) -> None:
    one, two = _ledger(tmp_path), AllocationLedger(tmp_path, online=(0, 1, 2))
    a = one.allocate("enc-a", 512, cpu_count=1)
    assert a.owner_pid == os.getpid() and a.owner_start == process_start_time(os.getpid())
    b = two.allocate("enc-b", 512, cpu_count=1)
    assert {a.cpu_ids, b.cpu_ids} == {(1,), (2,)}
    with pytest.raises(AllocatorError) as info:
        one.allocate("enc-c", 64, cpu_count=1)
    assert info.value.code == "E22"
    assert set(two.allocations()) == {"enc-a", "enc-b"}
    assert one.release("enc-a") == a
    assert set(two.allocations()) == {"enc-b"}
    assert (tmp_path / "allocations.json").stat().st_mode & 0o777 == 0o600


def test_dead_owner_is_reclaimed(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # pid is now dead
    ledger.allocate("dead", 1024, cpu_count=2, owner_pid=pid)
    assert ledger.allocate("alive", 1024, cpu_count=2).enclave_id == "alive"
    assert set(ledger.allocations()) == {"alive"}


def test_reused_pid_is_detected_by_start_time(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    stale = Allocation("old", 1024, (1, 2), owner_pid=os.getpid(), owner_start=1)  # same PID, other process
    (tmp_path / "allocations.json").write_text(json.dumps({"version": 1, "allocations": [stale.to_json()]}))
    assert ledger.allocations() == {}


def test_missing_config_is_e03(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no allocator configuration"):
        AllocationLedger(tmp_path, online=(0, 1)).allocate("e", 64, cpu_count=1)


@pytest.mark.parametrize("content", [
    "not json",
    '{"version": 2, "allocations": []}',
    '{"version": 1}',
    '{"version": 1, "allocations": [{"enclave_id": "x"}]}',
    '{"version": 1, "allocations": [{"enclave_id": "x", "memory_mib": "64", "cpu_ids": [], "owner_pid": 0,'
    ' "owner_start": 0}]}',
    '{"version": 1, "allocations": [1]}',
])
def test_damaged_ledger_is_e83(tmp_path: Path, content: str) -> None:
    ledger = _ledger(tmp_path)
    (tmp_path / "allocations.json").write_text(content)
    with pytest.raises(AllocatorError) as info:
        ledger.allocations()
    assert info.value.code == "E83"


def test_duplicate_ledger_entry_is_e83(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    entry = Allocation("x", 64, (1,)).to_json()
    (tmp_path / "allocations.json").write_text(json.dumps({"version": 1, "allocations": [entry, entry]}))
    with pytest.raises(AllocatorError) as info:
        ledger.allocations()
    assert info.value.code == "E83"
