"""Delivery health and robustness of the trail writer (issue 6): foreign errors, history conflicts, durability,
a clock that goes backwards, size caps, the settings trail.json keeps."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from audit_helpers import event, files

import enclavekit.audit.spool as spool_module
import enclavekit.audit.trail as trail_module
from enclavekit.audit.digest import DigestKey
from enclavekit.audit.logfile import LogFile, LogFileKey
from enclavekit.audit.spool import Spool
from enclavekit.audit.trail import (
    LocalDestination,
    Trail,
    TrailConfig,
    iter_records,
    read_heads,
    read_health,
    read_pending,
    read_public_keys,
    read_trail_config,
)
from enclavekit.audit.validate import validate_trail
from enclavekit.errors import AuditSpoolError

ACCOUNT, REGION = "111122223333", "us-east-1"


class Clock:
    """A settable clock (the trail takes time as an input)."""

    def __init__(self, when: datetime) -> None:
        self.now = when

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _wait(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def validate(root: Path, **kw: object):  # type: ignore[no-untyped-def]
    return validate_trail(LocalDestination(root), public_keys=read_public_keys(root),
                          heads=read_heads(root / "state" / "heads.jsonl") or None, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ item 1


def test_a_foreign_error_does_not_stop_delivery(tmp_path: Path) -> None:
    """A plain OSError (not one of ours) used to end the delivery thread for good, silently."""
    config = TrailConfig(max_log_age=0.01, poll_interval=0.01, retry_initial=0.01, retry_max=0.05)
    trail = Trail(tmp_path, config=config)
    real_put = trail.destination.put_new
    failures = {"left": 5}

    def flaky_put(*a: object, **kw: object) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        real_put(*a, **kw)  # type: ignore[arg-type]

    trail.destination.put_new = flaky_put  # type: ignore[method-assign]
    try:
        trail.append(event(1))
        assert _wait(lambda: trail.last_error is not None)
        health = read_health(tmp_path)
        assert health is not None and "OSError" in health["lastError"] and not health["healthy"]
        assert trail.wait_delivered(20)              # the thread kept going and delivered after the failures
        assert _wait(lambda: trail.health()["healthy"])
        assert trail._thread is not None and trail._thread.is_alive()
    finally:
        trail.close()
    assert read_health(tmp_path)["lastError"] is None  # type: ignore[index]
    assert len(files(tmp_path, "CloudTrail")) >= 1


def test_state_write_failure_is_a_spool_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600), deliver=False)
    trail.append(event(1))

    def broken(*a: object, **kw: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(trail_module, "_atomic_write", broken)
    with pytest.raises(AuditSpoolError, match="delivery state"):
        trail.flush()
    monkeypatch.undo()
    trail.close(seal=False)


def test_head_log_write_failure_is_a_spool_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600), deliver=False)

    def broken(*a: object, **kw: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(trail_module, "_append_line", broken)
    with pytest.raises(AuditSpoolError, match="head log"):
        trail.step(force_digest=True)
    monkeypatch.undo()
    trail.close(seal=False)


# ------------------------------------------------------------------------------------------------ item 9


def test_digest_key_taken_by_other_bytes_is_rebuilt_later(tmp_path: Path) -> None:
    clock = Clock(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10))
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600), clock=clock, deliver=False)
    trail.append(event(1))
    trail.flush()
    clock.advance(30)
    planted = DigestKey(account_id=ACCOUNT, region=REGION, trail_name="enclavekit", home_region=REGION,
                        end_time=clock.now).to_key()
    (tmp_path / planted).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / planted).write_bytes(b"planted")
    trail.step(force_digest=True)                       # no exception: delivery continues under a new name
    health = trail.health()
    assert health["historyConflicts"] == 1 and "refusing to overwrite" in health["lastHistoryConflict"]
    heads = read_heads(tmp_path / "state" / "heads.jsonl")
    assert len(heads) == 1 and heads[0].key != planted
    assert DigestKey.from_key(heads[0].key).end_time == clock.now + timedelta(seconds=1)
    trail.close()
    report = validate(tmp_path)
    assert {"digest-format"} <= report.rules()          # the planted object is reported ...
    assert report.count("Log file", invalid=False) == 1  # ... and the real chain still covers the log file


def test_log_key_taken_by_other_bytes_gets_a_new_name(tmp_path: Path) -> None:
    names = iter(["A" * 16, "B" * 16, "C" * 16])
    clock = Clock(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10))
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600), clock=clock, unique=lambda: next(names),
                  deliver=False)
    planted = LogFileKey(account_id=ACCOUNT, region=REGION, delivered_at=clock.now, unique="A" * 16).to_key()
    (tmp_path / planted).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / planted).write_bytes(LogFile.from_records([event(9)]).to_bytes())
    trail.append(event(1))
    trail.flush()
    assert trail.health()["historyConflicts"] == 1
    trail.close()
    logs = {p.name for p in files(tmp_path, "CloudTrail")}
    assert any("B" * 16 in n for n in logs)
    report = validate(tmp_path)
    assert "log-unlisted" in report.rules() and report.count("Log file", invalid=False) == 1


# ------------------------------------------------------------------------------------------------ item 15


def test_atomic_write_loops_on_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(trail_module.os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    trail_module._atomic_write(tmp_path / "f", b"0123456789" * 10)
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"0123456789" * 10


def test_new_spool_and_head_log_fsync_their_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    real = spool_module.fsync_dir
    monkeypatch.setattr(spool_module, "fsync_dir", lambda p: (synced.append(Path(p)), real(p))[1])
    monkeypatch.setattr(trail_module, "fsync_dir", lambda p: (synced.append(Path(p)), real(p))[1])
    Spool(tmp_path / "s").close()
    assert tmp_path / "s" in synced
    synced.clear()
    Spool(tmp_path / "s").close()                       # the file exists: nothing to make durable
    assert tmp_path / "s" not in synced
    trail_module._append_line(tmp_path / "heads.jsonl", b"{}\n")
    assert synced == [tmp_path]
    trail_module._append_line(tmp_path / "heads.jsonl", b"{}\n")
    assert synced == [tmp_path]


# ------------------------------------------------------------------------------------------------ item 7


def test_clock_going_backwards_is_warned_recorded_and_found(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2))
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600), clock=clock, deliver=False)
    trail.append(event(1))
    trail.flush()
    clock.advance(600)
    trail.step(force_digest=True)
    clock.advance(-1800)                                 # the clock is set back half an hour
    trail.append(event(2))
    with caplog.at_level(logging.WARNING, logger="enclavekit.audit.trail"):
        trail.flush()
        trail.step(force_digest=True)
    assert any("clock went backwards" in r.getMessage() for r in caplog.records)
    assert trail.clock_skews == 1
    trail.close()
    records = [r for _k, r in iter_records(LocalDestination(tmp_path))]
    skew = [r for r in records if r["eventName"] == "ClockWentBackwards"]
    assert len(skew) == 1 and skew[0]["eventSource"] == "trail.enclavekit.local"
    assert skew[0]["serviceEventDetails"]["secondsBehind"] == 1800
    report = validate(tmp_path)
    assert "log-window" in report.rules() and report.exit_status == 2       # a finding, not tampering


def test_quick_digests_on_an_open_trail_give_no_false_clock_finding(tmp_path: Path) -> None:
    """Windows are at least 1 s, so quick digests run ahead of the clock: that is not a clock going back."""
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600), deliver=False)
    for r in range(6):
        trail.append(event(r))
        trail.flush()
        trail.step(force_digest=True)
    trail.append(event(99))
    trail.flush()                                        # open trail: one log file awaits its digest
    assert trail.clock_skews == 0
    report = validate(tmp_path, now=datetime.now(UTC), max_age=4500,
                      pending=read_pending(tmp_path))
    trail.close(seal=False)
    assert report.exit_status == 0, [f.line() for f in report.failures]
    assert len(report.pending_logs) == 1
    assert not any(r["eventName"] == "ClockWentBackwards" for _k, r in iter_records(LocalDestination(tmp_path)))


# ------------------------------------------------------------------------------------------------ items 14, 17, 3


def test_trail_json_keeps_interval_and_endpoint(tmp_path: Path) -> None:
    class FakeS3(LocalDestination):
        endpoint_url = "http://127.0.0.1:9000"

    Trail(tmp_path, config=TrailConfig(digest_interval=120), destination=FakeS3(tmp_path / "b", bucket="bkt"),
          destination_url="s3://bkt", deliver=False).close(seal=False)
    config = read_trail_config(tmp_path)
    assert config["digestInterval"] == 120 and config["endpointUrl"] == "http://127.0.0.1:9000"
    # settings may change between runs (identity may not)
    Trail(tmp_path, config=TrailConfig(digest_interval=300), destination=FakeS3(tmp_path / "b", bucket="bkt"),
          destination_url="s3://bkt", deliver=False).close(seal=False)
    assert read_trail_config(tmp_path)["digestInterval"] == 300


def test_a_huge_record_is_capped_not_refused(tmp_path: Path) -> None:
    record = {**event(1), "requestParameters": {"blob": "x" * (900 * 1024)}}
    with Trail(tmp_path, config=TrailConfig(max_log_age=3600), deliver=False) as trail:
        trail.append(record)
        trail.flush()
    (stored,) = [r for _k, r in iter_records(LocalDestination(tmp_path))]
    assert stored["requestParameters"]["omitted"] is True and stored["eventID"] == record["eventID"]


def test_health_is_reported_while_delivering(tmp_path: Path) -> None:
    with Trail(tmp_path, config=TrailConfig(max_log_age=0.01, poll_interval=0.01)) as trail:
        trail.append(event(1))
        assert trail.wait_delivered(20)
        assert _wait(lambda: trail.health()["lastDeliveryTime"] is not None)
        health = trail.health()
        assert health["delivering"] and health["healthy"] and health["deliveredLogs"] >= 1
    assert json.loads((tmp_path / "trail.json").read_bytes())["trailName"] == "enclavekit"
