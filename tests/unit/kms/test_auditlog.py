"""Audit events (CloudTrail shape, §4.8) and the hash-chained, fsync'd, group-committed log (kms/auditlog.py)."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from enclavekit.kms import auditlog
from enclavekit.kms.auditlog import (
    GENESIS,
    AuditChainError,
    HashChainedLog,
    RequestFacts,
    cloudtrail_event,
    principal_id,
    verify_chain,
)
from enclavekit.kms.types import AuditInfo, Principal, RecipientContext

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ALICE = Principal("AKIAEXAMPLEKEY000001", "arn:aws:iam::111122223333:user/alice", "111122223333", "alice")
KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def facts(principal: Principal | None = ALICE, **kw: Any) -> RequestFacts:
    base: dict[str, Any] = {"request_id": "req-1", "event_time": NOW, "operation": "Decrypt", "region": "us-east-1",
                            "account_id": "111122223333", "source_ip": "127.0.0.1", "user_agent": "boto3/1.0",
                            "principal": principal}
    base.update(kw)
    return RequestFacts(**base)


def event(n: int = 0) -> dict[str, Any]:
    return cloudtrail_event(facts(request_id=f"req-{n}"), AuditInfo(), event_id=f"ev-{n}")


# --------------------------------------------------------------------------------------------- events


def test_event_has_the_cloudtrail_fields() -> None:
    recipient = RecipientContext(module_id="i-0123-enc0123", image_sha384="ab" * 48, pcrs={0: "ab" * 48, 1: "00" * 48},
                                 public_key_spki=b"\x30\x00")
    info = AuditInfo(request_parameters={"keyId": KEY_ARN, "encryptionAlgorithm": "SYMMETRIC_DEFAULT"},
                     resources=[{"accountId": "111122223333", "type": "AWS::KMS::Key", "ARN": KEY_ARN}],
                     recipient=recipient, read_only=True)
    ev = cloudtrail_event(facts(), info, event_id="ev-1")
    assert ev["eventVersion"] == "1.08"
    assert ev["userIdentity"] == {"type": "IAMUser", "principalId": principal_id(ALICE), "arn": ALICE.arn,
                                  "accountId": "111122223333", "accessKeyId": ALICE.access_key_id,
                                  "userName": "alice"}
    assert ev["eventTime"] == "2026-03-01T12:00:00Z"
    assert ev["eventSource"] == "kms.amazonaws.com"
    assert ev["eventName"] == "Decrypt"
    assert ev["awsRegion"] == "us-east-1"
    assert ev["sourceIPAddress"] == "127.0.0.1"
    assert ev["userAgent"] == "boto3/1.0"
    assert ev["requestParameters"] == info.request_parameters
    assert ev["responseElements"] is None
    assert ev["additionalEventData"]["recipient"] == {
        "attestationDocumentModuleId": "i-0123-enc0123",
        "attestationDocumentEnclaveImageDigest": "ab" * 48,
        "attestationDocumentEnclavePCRs": {"0": "ab" * 48, "1": "00" * 48},
    }
    assert ev["requestID"] == "req-1"
    assert ev["eventID"] == "ev-1"
    assert ev["readOnly"] is True
    assert ev["resources"] == info.resources
    assert ev["eventType"] == "AwsApiCall"
    assert ev["managementEvent"] is True
    assert ev["recipientAccountId"] == "111122223333"
    assert ev["eventCategory"] == "Management"
    assert "errorCode" not in ev
    assert b"public_key" not in json.dumps(ev).encode()


def test_denied_event_carries_error_and_decision() -> None:
    info = AuditInfo(decision="statement 'DenyOthers' (Deny) matched")
    ev = cloudtrail_event(facts(), info, error_code="AccessDeniedException", error_message="denied")
    assert (ev["errorCode"], ev["errorMessage"]) == ("AccessDeniedException", "denied")
    assert ev["additionalEventData"]["policyDecision"] == "statement 'DenyOthers' (Deny) matched"


def test_unauthenticated_event_records_the_claimed_key_only() -> None:
    ev = cloudtrail_event(facts(None, access_key_id="AKIAUNKNOWN", operation=None), None,
                          error_code="UnrecognizedClientException", error_message="invalid")
    assert ev["userIdentity"] == {"type": "Unknown", "accountId": "111122223333", "accessKeyId": "AKIAUNKNOWN"}
    assert ev["eventName"] == "Unknown"
    assert ev["requestParameters"] is None


def test_principal_id_is_stable_and_iam_shaped() -> None:
    pid = principal_id(ALICE)
    assert pid == principal_id(ALICE)
    assert pid.startswith("AIDA")
    assert len(pid) == 21


# --------------------------------------------------------------------------------------------- log


def test_append_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "events.jsonl"
    with HashChainedLog(path) as log:
        for n in range(5):
            log.append(event(n))
    report = verify_chain(path)
    assert report.events == 5
    lines = path.read_bytes().splitlines()
    first = json.loads(lines[0])
    assert first["seq"] == 1
    assert first["prevSha256"] == GENESIS
    assert first["event"]["requestID"] == "req-0"
    assert (path.stat().st_mode & 0o777) == 0o600


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with HashChainedLog(path) as log:
        log.append(event(1))
    with HashChainedLog(path) as log:
        log.append(event(2))
    assert verify_chain(path).events == 2


def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    """Two writers (as two worker processes would be) interleave under flock and continue each other's chain."""
    path = tmp_path / "events.jsonl"
    a, b = HashChainedLog(path), HashChainedLog(path)
    try:
        for n in range(6):
            (a if n % 2 else b).append(event(n))
    finally:
        a.close()
        b.close()
    assert verify_chain(path).events == 6


def test_group_commit_shares_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one fsync is in progress, every event queued meanwhile goes out in the next single write + fsync."""
    path = tmp_path / "events.jsonl"
    writers = 20
    release = threading.Event()
    real_fsync = os.fsync
    calls: list[int] = []

    def slow_fsync(fd: int) -> None:
        calls.append(fd)
        release.wait(10)
        real_fsync(fd)

    log = HashChainedLog(path)
    monkeypatch.setattr(auditlog.os, "fsync", slow_fsync)
    threads = [threading.Thread(target=log.append, args=(event(n),)) for n in range(writers)]
    for t in threads:
        t.start()
    # wait until the first batch is inside fsync and at least two more events are queued behind it
    for _ in range(2000):
        with log._cond:
            queued = len(log._queue)
        if calls and queued >= 2:
            break
        threading.Event().wait(0.005)
    release.set()
    for t in threads:
        t.join()
    log.close()
    assert log.appended == writers
    assert log.batches < writers
    assert len(calls) == log.batches
    assert verify_chain(path).events == writers


def test_append_returns_after_the_line_is_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(auditlog.os, "fsync", recording_fsync)
    with HashChainedLog(path) as log:
        log.append(event(1))
        assert synced and synced[-1] == path.stat().st_size


def test_write_failure_is_reported_to_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from enclavekit.errors import FileOperationError

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    log = HashChainedLog(tmp_path / "events.jsonl")
    monkeypatch.setattr(auditlog.os, "fsync", failing_fsync)
    with pytest.raises(FileOperationError):
        log.append(event(1))
    monkeypatch.undo()
    log.close()


def test_torn_last_line_is_dropped_on_open(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with HashChainedLog(path) as log:
        log.append(event(1))
    with path.open("ab") as fh:
        fh.write(b'{"seq":2,"prevSha256":"ab')   # a crash mid-write: never acknowledged
    with HashChainedLog(path) as log:
        log.append(event(2))
    assert verify_chain(path).events == 2


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = HashChainedLog(tmp_path / "events.jsonl")
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError):
        log.append(event(1))


# --------------------------------------------------------------------------------------------- verify: one rule each


def _written(tmp_path: Path, n: int = 3) -> tuple[Path, list[bytes]]:
    path = tmp_path / "events.jsonl"
    with HashChainedLog(path) as log:
        for i in range(n):
            log.append(event(i))
    return path, path.read_bytes().splitlines(keepends=True)


def _expect(path: Path, rule: str, line: int) -> None:
    with pytest.raises(AuditChainError) as info:
        verify_chain(path)
    assert info.value.rule == rule
    assert info.value.line == line


def test_verify_detects_a_changed_event(tmp_path: Path) -> None:
    path, lines = _written(tmp_path)
    lines[1] = lines[1].replace(b"req-1", b"req-X")
    path.write_bytes(b"".join(lines))
    _expect(path, "audit-chain", 3)


def test_verify_detects_a_removed_line(tmp_path: Path) -> None:
    path, lines = _written(tmp_path)
    path.write_bytes(lines[0] + lines[2])
    _expect(path, "audit-seq", 2)


def test_verify_detects_a_changed_prev_hash(tmp_path: Path) -> None:
    path, lines = _written(tmp_path)
    record = json.loads(lines[1])
    record["prevSha256"] = "00" * 32
    lines[1] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    _expect(path, "audit-chain", 2)


def test_verify_detects_a_non_json_line(tmp_path: Path) -> None:
    path, lines = _written(tmp_path)
    lines[1] = b"not json\n"
    path.write_bytes(b"".join(lines))
    _expect(path, "audit-json", 2)


def test_verify_detects_a_foreign_record(tmp_path: Path) -> None:
    path, lines = _written(tmp_path)
    lines[1] = b'{"seq":2}\n'
    path.write_bytes(b"".join(lines))
    _expect(path, "audit-record", 2)


def test_verify_detects_a_non_object_event(tmp_path: Path) -> None:
    path, lines = _written(tmp_path, 1)
    record = json.loads(lines[0])
    record["event"] = [1]
    path.write_bytes(json.dumps(record).encode() + b"\n")
    _expect(path, "audit-record", 1)


def test_verify_detects_a_torn_line(tmp_path: Path) -> None:
    path, lines = _written(tmp_path)
    path.write_bytes(b"".join(lines)[:-5])
    _expect(path, "audit-torn-line", 3)


def test_verify_empty_log(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"")
    assert verify_chain(path).events == 0
    assert verify_chain(path).last_sha256 == GENESIS
