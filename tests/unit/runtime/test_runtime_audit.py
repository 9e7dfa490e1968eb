"""The runtime's audit writer: ``<state>/audit.json``, joining a trail, records, delivery without sealing."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import pytest

from enclavekit.audit.trail import LocalDestination, Trail, TrailConfig, iter_records, read_heads
from enclavekit.errors import ConfigError, EnclaveKitError
from enclavekit.runtime.audit import (
    RuntimeAudit,
    RuntimeAuditConfig,
    console_excerpt,
    load_audit_config,
    open_runtime_trail,
    seal_runtime_trail,
)
from enclavekit.runtime.registry import EnclaveRecord


def _record() -> EnclaveRecord:
    return EnclaveRecord(enclave_id="i-0000000000000000-enc0123456789abcdef", name="app", cid=16,
                         owner_pid=os.getpid(), owner_start=1, state="RUNNING", owner_uid=0,
                         memory_mib=64, cpu_ids=(1,), debug_mode=True, measurements={"PCR0": "00" * 48})


def _records(state_dir: Path) -> list[dict[str, object]]:
    return [r for _, r in iter_records(LocalDestination(state_dir))]


def test_default_config_is_the_state_directorys_audit(tmp_path: Path) -> None:
    cfg = load_audit_config(tmp_path)
    assert cfg == RuntimeAuditConfig()
    assert cfg.state_dir(tmp_path) == tmp_path / "audit"
    assert RuntimeAuditConfig(trail="/elsewhere").state_dir(tmp_path) == Path("/elsewhere")
    assert RuntimeAuditConfig(trail="s3://bucket/p").state_dir(tmp_path) == tmp_path / "audit"


@pytest.mark.parametrize("text", [
    "{not json",
    "[]",
    '{"colour": "red"}',
    '{"trail": 5}',
    '{"trail": ""}',
    '{"region": 1}',
    '{"digest_interval": 0}',
    '{"digest_interval": true}',
])
def test_malformed_config_is_e03(tmp_path: Path, text: str) -> None:
    (tmp_path / "audit.json").write_text(text)
    with pytest.raises(ConfigError):
        load_audit_config(tmp_path)


def test_null_trail_turns_records_off(tmp_path: Path) -> None:
    (tmp_path / "audit.json").write_text(json.dumps({"trail": None}))
    assert open_runtime_trail(tmp_path) is None
    audit = RuntimeAudit(tmp_path)
    audit.terminate_enclave(_record(), via="control")
    audit.close()
    assert audit.appended == [] and not (tmp_path / "audit").exists()
    assert seal_runtime_trail(tmp_path) is False


def test_records_are_delivered_on_close_without_a_digest(tmp_path: Path) -> None:
    audit = RuntimeAudit(tmp_path)
    rec = _record()
    audit.run_enclave(rec, {"eifPath": "/x.eif", "memoryMiB": 64})
    audit.terminate_enclave(rec, via="signal")
    audit.close()
    names = sorted(str(r["eventName"]) for r in _records(tmp_path / "audit"))
    assert names == ["RunEnclave", "TerminateEnclave"]
    assert read_heads(tmp_path / "audit" / "state" / "heads.jsonl") == []  # closed, not sealed
    assert seal_runtime_trail(tmp_path)
    (head,) = read_heads(tmp_path / "audit" / "state" / "heads.jsonl")
    assert head.sealed


def test_boot_failure_and_oom_records(tmp_path: Path) -> None:
    audit = RuntimeAudit(tmp_path)
    rec = _record()
    error = EnclaveKitError("the application exited at boot with status 3", code="E36",
                            details={"console log": "/run/x/console.log"})
    audit.boot_failure(rec, error, ["x" * 500, "exiting with 3"])
    audit.out_of_memory(rec, oom_kills=1, exit_status=137)
    audit.close()
    boot, oom = sorted(_records(tmp_path / "audit"), key=lambda r: str(r["eventName"]))
    assert boot["errorCode"] == "E36" and boot["eventType"] == "AwsServiceEvent"
    details = boot["serviceEventDetails"]
    assert isinstance(details, dict)
    assert details["consoleTail"][-1] == "exiting with 3" and len(details["consoleTail"][0]) == 200
    assert oom["eventName"] == "EnclaveOutOfMemory"
    assert oom["serviceEventDetails"] == {"enclaveCid": 16, "memoryMiB": 64, "oomKills": 1, "exitStatus": 137}


def test_an_existing_trail_keeps_its_identity(tmp_path: Path) -> None:
    state = tmp_path / "audit"
    Trail(state, config=TrailConfig(account_id="444455556666", region="eu-west-1", trail_name="kms"),
          deliver=False).close(seal=False)
    trail = open_runtime_trail(tmp_path)
    assert trail is not None
    try:
        assert (trail.config.account_id, trail.config.region, trail.config.trail_name) == (
            "444455556666", "eu-west-1", "kms")
    finally:
        trail.close(seal=False)


def test_console_excerpt_is_capped() -> None:
    lines = [f"line {i} " + "y" * 300 for i in range(100)]
    out = console_excerpt(lines)
    assert len(out) <= 20 and sum(map(len, out)) <= 2048
    assert out[-1].startswith("line 99 ") and all(len(line) <= 200 for line in out)
    assert console_excerpt([]) == []


# ---------------------------------------------------------------- the launcher's status lines (sandbox.py)


class _FakeSandbox:
    """What ``_converse`` reads of a SandboxProcess: the launcher's PID, the stage, the console."""

    def __init__(self, console_fd: int) -> None:
        self.pid = os.getpid()
        self.stage = Path("/nonexistent")
        self.init_pid: int | None = None
        self.notifications = None
        self.console = os.fdopen(console_fd, "rb")


@pytest.mark.parametrize("line", [b"{not json\n", b"[1, 2]\n", b"\xff\xfe\n", b'{"stage": "pid1", "pid": "1"}\n',
                                  b"x" * 70000])
def test_a_forged_status_line_is_a_sandbox_error(line: bytes) -> None:
    import time

    from enclavekit.errors import SandboxError
    from enclavekit.runtime.sandbox import SandboxSpec, _converse

    ctl_r, ctl_w = os.pipe()
    status_r, status_w = os.pipe()
    console_r, console_w = os.pipe()
    writer = threading.Thread(target=os.write, args=(status_w, line), daemon=True)  # may exceed the pipe's buffer
    writer.start()
    try:
        sandbox = _FakeSandbox(console_r)
        spec = SandboxSpec(argv=("/app",), rootfs=lambda root: None, memory_mib=64)
        with pytest.raises(SandboxError):
            _converse(sandbox, spec, {}, ctl_w, status_r, deadline=time.monotonic() + 30)  # type: ignore[arg-type]
        sandbox.console.close()
        os.set_blocking(status_r, False)
        while writer.is_alive():  # drain what the writer still has to write
            with contextlib.suppress(BlockingIOError):
                os.read(status_r, 1 << 20)
            writer.join(0.01)
    finally:
        for fd in (ctl_r, ctl_w, status_r, status_w, console_w):
            os.close(fd)
