"""Each tampering case is detected with the rule that names it; a clean trail validates."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from audit_helpers import ACCOUNT, REGION, build_trail, event, files
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavekit.audit.digest import SIGNATURE_ALGORITHM, DigestFile, DigestKey, fingerprint, sign_digest
from enclavekit.audit.logfile import LogFile, LogFileKey, compress, decompress
from enclavekit.audit.trail import (
    LocalDestination,
    Trail,
    TrailConfig,
    read_heads,
    read_pending,
    read_public_keys,
    read_trail_config,
)
from enclavekit.audit.validate import ValidationReport, validate_trail
from enclavekit.cli.main import main


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_trail(tmp_path_factory.mktemp("trail") / "t")


@pytest.fixture
def trail(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "t"))


def check(root: Path, *, heads: bool = True, keys: dict[str, rsa.RSAPublicKey] | None = None,
          **kw: object) -> ValidationReport:
    return validate_trail(LocalDestination(root), public_keys=keys if keys is not None else read_public_keys(root),
                          heads=read_heads(root / "state" / "heads.jsonl") if heads else None, **kw)  # type: ignore[arg-type]


def test_clean_trail_is_valid(trail: Path) -> None:
    report = check(trail)
    assert report.exit_status == 0, [f.line() for f in report.failures]
    assert report.count("Digest file", invalid=False) == 4
    assert report.count("Log file", invalid=False) == 4


def test_log_file_edited(trail: Path) -> None:
    # log file names end in random characters, so pick by content: the one holding the TerminateEnclave record
    # (the final log file holds only that record; the others only RunEnclave ones)
    log = next(p for p in files(trail, "CloudTrail") if b"TerminateEnclave" in decompress(p.read_bytes()))
    original = decompress(log.read_bytes())
    content = original.replace(b"TerminateEnclave", b"TerminateEnclavX", 1)
    assert content != original
    log.write_bytes(compress(content))
    report = check(trail)
    assert report.exit_status == 1 and "log-modified" in report.rules()


def test_log_file_deleted(trail: Path) -> None:
    files(trail, "CloudTrail")[0].unlink()
    assert "log-deleted" in check(trail).rules()


def test_log_file_renamed(trail: Path) -> None:
    log = files(trail, "CloudTrail")[0]
    log.rename(log.with_name(log.name[:-24] + "AAAAAAAAAAAAAAAA.json.gz"))
    assert {"log-deleted", "log-unlisted"} <= check(trail).rules()


def test_log_file_truncated(trail: Path) -> None:
    log = files(trail, "CloudTrail")[0]
    log.write_bytes(log.read_bytes()[:-20])
    assert "log-format" in check(trail).rules()


def test_log_file_appended_data(trail: Path) -> None:
    log = files(trail, "CloudTrail")[0]
    log.write_bytes(log.read_bytes() + LogFile.from_records([event()]).to_bytes())
    assert "log-appended" in check(trail).rules()


def test_log_file_inserted(trail: Path) -> None:
    log = files(trail, "CloudTrail")[0]
    forged = log.with_name(log.name[:-24] + "ZZZZZZZZZZZZZZZZ.json.gz")
    forged.write_bytes(LogFile.from_records([event()]).to_bytes())
    report = check(trail)
    assert report.exit_status == 1 and "log-unlisted" in report.rules()


def test_digest_edited(trail: Path) -> None:
    d = files(trail, "CloudTrail-Digest")[1]
    obj = json.loads(decompress(d.read_bytes()))
    obj["logFiles"] = []
    d.write_bytes(compress(json.dumps(obj).encode()))
    assert "signature" in check(trail).rules()


def test_digest_truncated(trail: Path) -> None:
    d = files(trail, "CloudTrail-Digest")[1]
    d.write_bytes(d.read_bytes()[:30])
    assert "digest-format" in check(trail).rules()


def test_middle_digest_deleted(trail: Path) -> None:
    files(trail, "CloudTrail-Digest")[1].unlink()
    rules = check(trail).rules()
    assert "digest-deleted" in rules


def test_newest_digest_deleted_with_head_log(trail: Path) -> None:
    newest = files(trail, "CloudTrail-Digest")[-1]
    newest.unlink()
    Path(str(newest) + ".meta.json").unlink()
    assert "head-deleted" in check(trail).rules()


def test_newest_digest_deleted_without_head_log(trail: Path) -> None:
    # without the head log the logs the deleted digest listed are no longer covered (AWS would say "valid")
    newest = files(trail, "CloudTrail-Digest")[-1]
    newest.unlink()
    Path(str(newest) + ".meta.json").unlink()
    report = check(trail, heads=False, now=datetime.now(UTC) + timedelta(hours=3), max_age=4500)
    assert report.exit_status != 0
    assert {"log-unlisted", "stale"} & report.rules()


def test_digests_reordered(trail: Path) -> None:
    a, b = files(trail, "CloudTrail-Digest")[1:3]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    assert "moved" in check(trail).rules()


def test_digest_inserted_copy(trail: Path) -> None:
    d = files(trail, "CloudTrail-Digest")[1]
    name = DigestKey.from_key(d.relative_to(trail).as_posix())
    later = DigestKey(account_id=name.account_id, region=name.region, trail_name=name.trail_name,
                      home_region=name.home_region, end_time=name.end_time + timedelta(seconds=30))
    target = trail / later.to_key()
    shutil.copy(d, target)
    rules = check(trail).rules()
    assert rules & {"moved", "head-unknown", "digest-unchained"}


def test_digest_signed_by_another_key(trail: Path) -> None:
    # a complete, self-consistent newest digest signed with a key that is not the trail's
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    newest = files(trail, "CloudTrail-Digest")[-1]
    key = newest.relative_to(trail).as_posix()
    d = DigestFile.from_bytes(newest.read_bytes())
    forged = DigestFile.build(account_id=ACCOUNT, start=datetime.fromisoformat(d.digest_start_time[:-1] + "+00:00"),
                              end=datetime.fromisoformat(d.digest_end_time[:-1] + "+00:00"), bucket="local", key=key,
                              fingerprint=fingerprint(other.public_key()), log_files=list(d.log_files),
                              previous=(d.previous_digest_s3_bucket, d.previous_digest_s3_object,  # type: ignore[arg-type]
                                        d.previous_digest_hash_value, d.previous_digest_signature))
    newest.write_bytes(forged.to_bytes())
    Path(str(newest) + ".meta.json").write_text(json.dumps(
        {"signature": sign_digest(other, forged.string_to_sign()), "signature-algorithm": SIGNATURE_ALGORITHM}))
    assert "unknown-key" in check(trail).rules()
    # and a public key given for validation that is not the trail's: nothing verifies
    report = check(trail, keys={fingerprint(other.public_key()): other.public_key()})
    assert "unknown-key" in report.rules() and report.exit_status == 1


def test_head_signature_metadata_removed(trail: Path) -> None:
    newest = files(trail, "CloudTrail-Digest")[-1]
    Path(str(newest) + ".meta.json").unlink()
    assert "signature" in check(trail).rules()


def test_no_digests_is_a_failure(tmp_path: Path) -> None:
    report = validate_trail(LocalDestination(tmp_path), public_keys={})
    assert report.exit_status == 2 and "no-digests" in report.rules()


def test_clock_going_backwards(tmp_path: Path) -> None:
    """A chain whose second window starts before the first ends (a clock set back) is reported."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    dest = LocalDestination(tmp_path)
    t0 = datetime(2026, 3, 2, 10, 0, 0, tzinfo=UTC)
    previous = None
    windows = [(t0, t0 + timedelta(hours=1)), (t0 + timedelta(minutes=30), t0 + timedelta(hours=2))]
    for start, end in windows:
        name = DigestKey(account_id=ACCOUNT, region=REGION, trail_name="enclavekit", home_region=REGION,
                         end_time=end).to_key()
        d = DigestFile.build(account_id=ACCOUNT, start=start, end=end, bucket="local", key=name,
                             fingerprint=fingerprint(key.public_key()), log_files=[], previous=previous)
        signature = sign_digest(key, d.string_to_sign())
        dest.put_new(name, d.to_bytes(), {"signature": signature, "signature-algorithm": SIGNATURE_ALGORITHM})
        previous = ("local", name, d.sha256, signature)
    report = validate_trail(dest, public_keys={fingerprint(key.public_key()): key.public_key()})
    assert "clock" in report.rules() and report.exit_status == 1


# ------------------------------------------------------------------------------------------------ issue 6


def _forge_log(root: Path, when: datetime, unique: str = "FFFFFFFFFFFFFFFF") -> Path:
    key = LogFileKey(account_id=ACCOUNT, region=REGION, delivered_at=when, unique=unique).to_key()
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(LogFile.from_records([event()]).to_bytes())
    return path


def _open_trail(root: Path, *, interval: float = 3600.0) -> Trail:
    """An open (unsealed) trail: two digests, then one delivered log file that awaits the next digest."""
    trail = Trail(root, config=TrailConfig(max_log_age=3600, digest_interval=interval), deliver=False)
    for r in range(2):
        trail.append(event(r))
        trail.flush()
        trail.step(force_digest=True)
    trail.append(event(50))
    trail.flush()
    return trail


def test_forged_log_dated_in_the_future_is_invalid(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _forge_log(trail, datetime.now(UTC) + timedelta(days=30))
    report = check(trail, now=datetime.now(UTC))
    assert report.exit_status == 1 and "log-future" in report.rules()
    # the CLI no longer hides it behind an implicit --end-time now
    assert main(["audit", "validate", "--trail", str(trail), "--trust-trail-keys"]) == 1
    assert "delivered in the future" in capsys.readouterr().err
    # an explicit --end-time still limits what is looked at, but a future stamp is invalid regardless
    report = check(trail, now=datetime.now(UTC), end=datetime.now(UTC) - timedelta(days=1))
    assert "log-future" in report.rules()


def test_log_after_the_seal_is_invalid(trail: Path) -> None:
    _forge_log(trail, datetime.now(UTC) + timedelta(seconds=90))
    report = check(trail, now=datetime.now(UTC))
    assert report.exit_status == 1 and "log-unlisted" in report.rules()


def test_pending_needs_the_writers_record(tmp_path: Path) -> None:
    trail = _open_trail(tmp_path)
    trail.close(seal=False)
    pending = read_pending(tmp_path)
    assert len(pending) == 1
    now = datetime.now(UTC)
    ok = check(tmp_path, now=now, pending=pending)
    assert ok.exit_status == 0 and len(ok.pending_logs) == 1
    assert "1 log file(s) pending (delivered, not yet listed by a digest)" in ok.summary()
    # a forged log next to it, stamped after the head: the state does not know it
    _forge_log(tmp_path, now)
    forged = check(tmp_path, now=now, pending=pending)
    assert forged.exit_status == 1 and "log-unlisted" in forged.rules() and len(forged.pending_logs) == 1
    # the recorded pending log file replaced by other bytes
    (tmp_path / next(iter(pending))).write_bytes(LogFile.from_records([event()]).to_bytes())
    swapped = check(tmp_path, now=now, pending=pending)
    assert any("differs from the log file the writer recorded" in f.status for f in swapped.failures)


def test_pending_without_state_only_within_an_interval(tmp_path: Path) -> None:
    trail = _open_trail(tmp_path, interval=60)
    trail.close(seal=False)
    now = datetime.now(UTC)
    assert check(tmp_path, now=now, digest_interval=60).exit_status == 0
    late = check(tmp_path, now=now + timedelta(minutes=10), digest_interval=60)
    assert "log-unlisted" in late.rules() and late.exit_status == 1


def test_default_max_age_catches_a_deleted_newest_digest_without_heads(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """trail.json keeps digestInterval; --max-age defaults to 1.25 of it, so a truncated tail is stale."""
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600, digest_interval=60), clock=lambda: past,
                  deliver=False)
    trail.append(event(1))
    trail.flush()
    trail.step(force_digest=True)
    trail.close(seal=False)
    assert read_trail_config(tmp_path)["digestInterval"] == 60
    (tmp_path / "state" / "heads.jsonl").unlink()
    assert main(["audit", "validate", "--trail", str(tmp_path), "--trust-trail-keys"]) == 2
    assert "\tGAP: the newest digest ended" in capsys.readouterr().err
    assert main(["audit", "validate", "--trail", str(tmp_path), "--trust-trail-keys", "--max-age", "0"]) == 0
    capsys.readouterr()


def test_everything_deleted_with_head_log_intact_is_invalid(trail: Path) -> None:
    for path in trail.rglob("*.json.gz"):
        path.unlink()
    report = check(trail)
    assert report.exit_status == 1 and "head-deleted" in report.rules()
    assert check(trail, heads=False).exit_status == 2          # without the head log: only "No digests found"


def test_several_trails_under_one_prefix(tmp_path: Path) -> None:
    shared = LocalDestination(tmp_path / "bucket")
    for name in ("alpha", "beta"):
        t = Trail(tmp_path / name, config=TrailConfig(trail_name=name, max_log_age=3600), destination=shared,
                  deliver=False)
        t.append(event(1))
        t.flush()
        t.close()
    heads = read_heads(tmp_path / "alpha" / "state" / "heads.jsonl")
    report = validate_trail(shared, public_keys=read_public_keys(tmp_path / "alpha"), heads=heads,
                            trail_name="alpha")
    assert report.exit_status == 0, [f.line() for f in report.failures]
    assert report.count("Log file", invalid=False) == 1 and "other-trail" in {f.rule for f in report.findings}
    # the head log of alpha says nothing about beta's chain (it used to report beta's head as deleted)
    both = validate_trail(shared, public_keys={**read_public_keys(tmp_path / "alpha"),
                                               **read_public_keys(tmp_path / "beta")}, heads=heads)
    assert both.exit_status == 0, [f.line() for f in both.failures]


def test_over_long_window_is_a_warning(tmp_path: Path) -> None:
    clock_now = [datetime.now(UTC).replace(microsecond=0) - timedelta(hours=5)]
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600, digest_interval=600), clock=lambda: clock_now[0],
                  deliver=False)
    trail.append(event(1))
    trail.flush()
    trail.step(force_digest=True)
    clock_now[0] += timedelta(hours=3)                  # the writer was stuck: one 3-hour window
    trail.append(event(2))
    trail.flush()
    trail.step(force_digest=True)
    trail.close()
    report = check(tmp_path, digest_interval=600)
    assert "window-long" in {f.rule for f in report.findings if f.warning}
    assert report.exit_status == 0 and "1 warning(s)" in report.summary()


def test_events_reads_only_listed_log_files(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _forge_log(trail, datetime.now(UTC) - timedelta(minutes=5))
    broken = _forge_log(trail, datetime.now(UTC) - timedelta(minutes=6), unique="BBBBBBBBBBBBBBBB")
    broken.write_bytes(b"not gzip")
    assert main(["audit", "events", "--trail", str(trail), "--json", "--trust-trail-keys"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 16 and "validation problem(s)" in captured.err
    assert main(["audit", "events", "--trail", str(trail), "--json", "--unverified"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 17                 # the forged record too ...
    assert f"WARNING: skipped {broken.relative_to(trail).as_posix()}" in captured.err   # ... unreadable skipped


def test_events_of_a_trail_without_digests_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No digest, no key yet: the log files the writer recorded as pending are still shown, marked pending."""
    trail = Trail(tmp_path, config=TrailConfig(max_log_age=3600), deliver=False)
    trail.append(event(1))
    trail.flush()
    trail.close(seal=False)
    assert main(["audit", "events", "--trail", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 1 and "1 event(s) come from log files not yet listed" in captured.err
