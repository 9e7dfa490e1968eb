"""Spool group commit and recovery; the trail's rolling, digests, sealing and refusal to overwrite history."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from audit_helpers import build_trail, event, files

from enclavekit.audit.logfile import LogFile
from enclavekit.audit.spool import Spool
from enclavekit.audit.trail import LocalDestination, Trail, TrailConfig, read_heads, read_trail_config
from enclavekit.audit.validate import validate_trail
from enclavekit.errors import AuditError, AuditFormatError, AuditHistoryError, AuditKeyError


def test_spool_group_commit_across_threads(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    threads = [threading.Thread(target=lambda n=n: [spool.append({"n": n, "i": i}) for i in range(50)])
               for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert spool.appended == 400 and spool.batches < 400
    records, cursor = spool.read(spool.start(), 1 << 20)
    assert len(records) == 400 and spool.pending_bytes(cursor) == 0
    spool.close()


def test_spool_torn_tail_is_ignored_then_cut(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append({"a": 1})
    with open(tmp_path / "spool.jsonl", "ab") as fh:
        fh.write(b'{"torn":')                     # a writer killed mid-write
    records, _ = spool.read(spool.start(), 1 << 20)
    assert records == [{"a": 1}]
    spool.append({"b": 2})
    records, _ = spool.read(spool.start(), 1 << 20)
    assert records == [{"a": 1}, {"b": 2}]
    spool.close()


def test_spool_compaction(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append({"a": 1})
    _, cursor = spool.read(spool.start(), 1 << 20)
    new = spool.compact(cursor)
    assert new.offset == 0 and os.path.getsize(tmp_path / "spool.jsonl") == 0
    spool.append({"b": 2})
    assert spool.read(cursor, 1 << 20)[0] == [{"b": 2}]     # an old cursor resolves to the new file
    spool.close()


def test_trail_rejects_malformed_records(tmp_path: Path) -> None:
    with Trail(tmp_path, deliver=False) as trail, pytest.raises(AuditFormatError):
        trail.append({"eventName": "x"})


def test_trail_rolls_by_size(tmp_path: Path) -> None:
    trail = Trail(tmp_path, config=TrailConfig(max_log_bytes=4096, max_log_age=3600), deliver=False)
    for i in range(40):
        trail.append(event(i))
    trail.step()
    trail.close()
    logs = files(tmp_path, "CloudTrail")
    assert len(logs) >= 3
    total = sum(len(LogFile.from_bytes(p.read_bytes()).records) for p in logs)
    assert total == 40


def test_sealed_trail_covers_everything_and_restarts_chain(tmp_path: Path) -> None:
    build_trail(tmp_path, rounds=1)
    build_trail(tmp_path, rounds=1)                 # a restart continues the same chain
    heads = read_heads(tmp_path / "state" / "heads.jsonl")
    assert heads[-1].sealed
    from enclavekit.audit.trail import read_public_keys
    report = validate_trail(LocalDestination(tmp_path), public_keys=read_public_keys(tmp_path), heads=heads)
    assert report.exit_status == 0, [f.line() for f in report.failures]


def test_local_destination_refuses_to_overwrite(tmp_path: Path) -> None:
    dest = LocalDestination(tmp_path)
    dest.put_new("AWSLogs/x.json.gz", b"one")
    dest.put_new("AWSLogs/x.json.gz", b"one")         # an identical retry is accepted
    with pytest.raises(AuditHistoryError):
        dest.put_new("AWSLogs/x.json.gz", b"two")
    assert (tmp_path / "AWSLogs/x.json.gz").read_bytes() == b"one"
    with pytest.raises(ValueError):
        dest.put_new("../escape", b"x")


def test_trail_identity_cannot_change(tmp_path: Path) -> None:
    Trail(tmp_path, deliver=False).close(seal=False)
    assert read_trail_config(tmp_path)["trailName"] == "enclavekit"
    with pytest.raises(AuditError, match="other settings"):
        Trail(tmp_path, config=TrailConfig(trail_name="other"), deliver=False)


def test_signing_key_permissions(tmp_path: Path) -> None:
    build_trail(tmp_path, rounds=1)
    key = tmp_path / "keys" / "private.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)
    trail = Trail(tmp_path, deliver=False)
    with pytest.raises(AuditKeyError, match="readable by others"):
        trail.public_key_pem()
    trail.close(seal=False)


def test_crash_between_intent_and_put_is_repaired(tmp_path: Path) -> None:
    """A state with a pending log file whose object was never written: the restart writes the same bytes."""
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600), deliver=False)
    trail.append(event(1))
    real_put = trail.destination.put_new
    calls = {"n": 0}

    def failing_put(*a: object, **kw: object) -> None:
        calls["n"] += 1
        raise OSError("simulated crash")

    trail.destination.put_new = failing_put  # type: ignore[method-assign]
    with pytest.raises(OSError):
        trail.flush()
    trail.destination.put_new = real_put  # type: ignore[method-assign]
    state = json.loads((tmp_path / "state" / "delivery.json").read_bytes())
    assert state["pendingLog"] is not None
    trail.close(seal=False)
    trail = Trail(tmp_path, deliver=False)
    trail.close()                                    # recovery, then seal
    assert len(files(tmp_path, "CloudTrail")) == 1
    assert json.loads((tmp_path / "state" / "delivery.json").read_bytes())["pendingLog"] is None
