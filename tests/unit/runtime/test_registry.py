"""The enclave registry: nitro-cli's naming rules (ids, names, CIDs) and the record store (spec §3.4, §3.5)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from enclavekit.errors import ConfigError, EnclaveKitError
from enclavekit.runtime.registry import (
    AUTO_CID_START,
    DEFAULT_INSTANCE_ID,
    EnclaveRecord,
    Registry,
    choose_cid,
    default_enclave_name,
    make_enclave_id,
    parse_enclave_cid,
    read_instance_id,
    run_dir,
    slot_of,
    unique_name,
)

# ---------------------------------------------------------------- naming rules


def test_run_dir_default_and_env() -> None:
    assert run_dir({}) == Path("/run/enclavekit")
    assert run_dir({"ENCLAVEKIT_RUN_DIR": ""}) == Path("/run/enclavekit")
    assert run_dir({"ENCLAVEKIT_RUN_DIR": "/tmp/x"}) == Path("/tmp/x")


def test_enclave_id_shape_matches_nitro_cli() -> None:
    # §3.3's public example
    assert make_enclave_id("i-085fa5ca0e3bda2cb", 0x199A65672B92A8D) == "i-085fa5ca0e3bda2cb-enc199a65672b92a8d"
    assert make_enclave_id(DEFAULT_INSTANCE_ID, 0x0123456789012345) == "i-0000000000000000-enc123456789012345"
    assert slot_of("i-0000000000000000-enc0123456789012345") == "0123456789012345"


@pytest.mark.parametrize("bad", ["", "enc12", "i-0000000000000000-encXYZ", "i-0-enc12/../x", "../i-0-enc1"])
def test_slot_of_rejects_malformed_ids(bad: str) -> None:
    with pytest.raises(ConfigError):
        slot_of(bad)


def test_make_enclave_id_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        make_enclave_id("i-0/..", 1)
    with pytest.raises(ValueError):
        make_enclave_id(DEFAULT_INSTANCE_ID, 1 << 64)


def test_instance_id_from_board_asset_tag(tmp_path: Path) -> None:
    tag = tmp_path / "board_asset_tag"
    tag.write_text(" i-085fa5ca0e3bda2cb \n")
    assert read_instance_id(tag) == "i-085fa5ca0e3bda2cb"
    assert read_instance_id(tmp_path / "missing") == DEFAULT_INSTANCE_ID
    tag.write_text("not/an id")
    assert read_instance_id(tag) == DEFAULT_INSTANCE_ID


def test_default_name_strips_eif_suffix() -> None:
    assert default_enclave_name("/images/hello.eif") == "hello"
    assert default_enclave_name("hello.img") == "hello.img"
    assert default_enclave_name(".eif") == ".eif"


def test_unique_name_appends_suffixes() -> None:
    assert unique_name("hello", []) == "hello"
    assert unique_name("hello", ["hello"]) == "hello_1"
    assert unique_name("hello", ["hello", "hello_1", "hello_3"]) == "hello_2"


@pytest.mark.parametrize("bad", ["", "a/b", "x\n", "x" * 129])
def test_unique_name_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ConfigError):
        unique_name(bad, [])


@pytest.mark.parametrize("text,expected", [("0", None), ("4", 4), ("16", 16), ("4294967294", 4294967294)])
def test_parse_enclave_cid_accepts(text: str, expected: int | None) -> None:
    assert parse_enclave_cid(text) == expected


@pytest.mark.parametrize("text", ["1", "2", "3", "4294967295", "99999999999", "-5", "abc", "", "1e3"])
def test_parse_enclave_cid_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_enclave_cid(text)


def test_choose_cid_auto_starts_at_16_and_skips_used() -> None:
    assert choose_cid(None, []) == AUTO_CID_START == 16
    assert choose_cid(None, [16, 17, 19]) == 18
    assert choose_cid(5, [16]) == 5


def test_choose_cid_refuses_a_cid_in_use() -> None:
    with pytest.raises(ConfigError, match="already used"):
        choose_cid(20, [20])


def test_choose_cid_refuses_out_of_range() -> None:
    with pytest.raises(ConfigError):
        choose_cid(3, [])


# ---------------------------------------------------------------- records


def _record(**kw: object) -> EnclaveRecord:
    fields: dict[str, object] = {"enclave_id": make_enclave_id(DEFAULT_INSTANCE_ID, 0xABC), "name": "hello",
                                 "cid": 16, "owner_pid": os.getpid(), "owner_start": 1}
    fields.update(kw)
    return EnclaveRecord(**fields)  # type: ignore[arg-type]


def test_record_round_trip() -> None:
    rec = _record(cpu_ids=(1, 3), memory_mib=512, debug_mode=True, state="RUNNING",
                  measurements={"HashAlgorithm": "Sha384 { ... }", "PCR0": "00"}, metadata={"ImageName": "x"},
                  cgroup_dirs=("/sys/fs/cgroup/pids/enclavekit-abc",))
    assert EnclaveRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("cid"),
    lambda d: d.update(version=2),
    lambda d: d.update(cid=-1),
    lambda d: d.update(cid=True),
    lambda d: d.update(enclave_id="../x"),
    lambda d: d.update(cpu_ids=["1"]),
    lambda d: d.update(debug_mode=1),
    lambda d: d.update(measurements={"PCR0": 1}),
    lambda d: d.update(metadata=[]),
    lambda d: d.update(cgroup_dirs="x"),
    lambda d: d.update(name=None),
])
def test_record_parser_rejects_damage(mutate: object) -> None:
    doc = _record().to_json()
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(EnclaveKitError) as info:
        EnclaveRecord.from_json(doc)
    assert info.value.code == "E17"


def test_describe_and_run_info_key_order() -> None:
    rec = _record(cpu_ids=(1, 3), memory_mib=512, state="RUNNING",
                  measurements={"HashAlgorithm": "h", "PCR0": "a", "PCR1": "b", "PCR2": "c"},
                  metadata={"ImageName": "n", "ImageVersion": "v", "Metadata": {}})
    assert list(rec.run_info()) == ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs",
                                    "CPUIDs", "MemoryMiB"]
    d = rec.describe()
    assert list(d) == ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs",
                       "MemoryMiB", "State", "Flags", "Measurements"]
    assert d["Flags"] == "NONE" and d["NumberOfCPUs"] == 2
    assert list(rec.describe(metadata=True))[-3:] == ["ImageName", "ImageVersion", "Metadata"]
    assert _record(debug_mode=True).describe()["Flags"] == "DEBUG_MODE"
    assert "EnclaveName" not in _record(name="").describe()


# ---------------------------------------------------------------- the store


class _Alive:
    def __init__(self) -> None:
        self.dead: set[str] = set()

    def __call__(self, rec: EnclaveRecord) -> bool:
        return rec.enclave_id not in self.dead


def test_reserve_gives_unique_names_and_cids(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "run", is_alive=_Alive())
    a = reg.reserve(name="hello", cid=None, owner_pid=os.getpid(), slot_uid=1)
    b = reg.reserve(name="hello", cid=None, owner_pid=os.getpid(), slot_uid=2)
    c = reg.reserve(name="hello", cid=40, owner_pid=os.getpid(), slot_uid=3)
    assert (a.name, a.cid) == ("hello", 16)
    assert (b.name, b.cid) == ("hello_1", 17)
    assert (c.name, c.cid) == ("hello_2", 40)
    assert [r.enclave_id for r in reg.live_records()] == [a.enclave_id, b.enclave_id, c.enclave_id]
    with pytest.raises(ConfigError):
        reg.reserve(name="x", cid=40, owner_pid=os.getpid(), slot_uid=4)


def test_find_by_id_and_name(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "run", is_alive=_Alive())
    a = reg.reserve(name="hello", cid=None, owner_pid=os.getpid(), slot_uid=1)
    assert reg.find(enclave_id=a.enclave_id) == a
    assert reg.find(name="hello") == a
    with pytest.raises(EnclaveKitError) as missing:
        reg.find(enclave_id=make_enclave_id(DEFAULT_INSTANCE_ID, 99))
    assert missing.value.code == "E40"
    with pytest.raises(EnclaveKitError) as unnamed:
        reg.find(name="nobody")
    assert unnamed.value.code == "E58"


def test_stale_records_are_cleaned_but_console_log_stays(tmp_path: Path) -> None:
    alive = _Alive()
    reg = Registry(tmp_path / "run", is_alive=alive)
    a = reg.reserve(name="hello", cid=None, owner_pid=os.getpid(), slot_uid=1)
    (reg.vsock_root / str(a.cid)).mkdir(parents=True)
    reg.console_path(a.enclave_id).write_text("last words\n")
    reg.control_path(a.enclave_id).write_text("")
    alive.dead.add(a.enclave_id)
    assert reg.live_records() == []
    released: list[str] = []
    cleaned = reg.clean_stale(lambda r: released.append(r.enclave_id))
    assert [r.enclave_id for r in cleaned] == released == [a.enclave_id]
    assert sorted(os.listdir(reg.enclave_dir(a.enclave_id))) == ["console.log"]
    assert not (reg.vsock_root / str(a.cid)).exists()
    # the CID and the name are free again
    b = reg.reserve(name="hello", cid=None, owner_pid=os.getpid(), slot_uid=2)
    assert (b.name, b.cid) == ("hello", 16)


def test_failed_launch_without_console_output_leaves_nothing(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "run", is_alive=_Alive())
    a = reg.reserve(name="hello", cid=None, owner_pid=os.getpid(), slot_uid=1)
    reg.console_path(a.enclave_id).write_bytes(b"")
    reg.remove(a)
    assert not reg.enclave_dir(a.enclave_id).exists()


def test_damaged_record_is_skipped(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "run", is_alive=_Alive())
    a = reg.reserve(name="hello", cid=None, owner_pid=os.getpid(), slot_uid=1)
    reg.record_path(a.enclave_id).write_text("{not json")
    assert reg.all_records() == []


def test_record_of_a_dead_process_is_stale(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "run")  # the real liveness check: PID + start time
    a = reg.reserve(name="hello", cid=None, owner_pid=os.getpid(), slot_uid=1)
    assert reg.is_live(a)
    assert not reg.is_live(EnclaveRecord(**{**a.__dict__, "owner_start": a.owner_start + 1}))


def test_too_deep_run_directory_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    reg = Registry(deep, is_alive=_Alive())
    with pytest.raises(ConfigError, match="too deep"):
        reg.reserve(name="hello", cid=None, owner_pid=os.getpid(), slot_uid=1)
