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
from enclavekit.audit.logfile import LogFile, compress, decompress
from enclavekit.audit.trail import LocalDestination, read_heads, read_public_keys
from enclavekit.audit.validate import ValidationReport, validate_trail


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
    log = files(trail, "CloudTrail")[1]
    content = decompress(log.read_bytes()).replace(b"RunEnclave", b"RunEnclavX", 1)
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
