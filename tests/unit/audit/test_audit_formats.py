"""Round trips and one negative test per rule for records, log files, digest files and key names."""

from __future__ import annotations

import gzip
import hashlib
import json
from datetime import UTC, datetime

import pytest
from audit_helpers import ACCOUNT, REGION, event
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavekit.audit.digest import (
    DigestFile,
    DigestKey,
    LogFileEntry,
    fingerprint,
    load_public_key_der,
    public_key_der,
    sign_digest,
    string_to_sign,
    verify_digest_signature,
)
from enclavekit.audit.events import (
    cap_record,
    check_record,
    kms_event,
    normalise_pcr,
    parse_event_version,
    runtime_event,
)
from enclavekit.audit.logfile import LogFile, LogFileKey, compress, decompress
from enclavekit.errors import AuditFormatError, AuditValidationError
from enclavekit.kms.auditlog import RequestFacts
from enclavekit.kms.types import AuditInfo, Principal, RecipientContext

T0 = datetime(2026, 3, 2, 9, 14, 52, tzinfo=UTC)
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ------------------------------------------------------------------------------------------------ records


def test_kms_event_matches_spec_shape() -> None:
    facts = RequestFacts(request_id="r-1", event_time=T0, operation="Decrypt", region=REGION, account_id=ACCOUNT,
                         source_ip="203.0.113.25", user_agent="sdk",
                         principal=Principal("AKIAX", f"arn:aws:iam::{ACCOUNT}:user/ops", ACCOUNT, "ops"))
    recipient = RecipientContext(module_id="i-0abc-enc01", image_sha384="AB" * 48, pcrs={1: "cd" * 48, 8: "00" * 48},
                                 public_key_spki=b"k")
    info = AuditInfo(request_parameters={"keyId": "k", "encryptionAlgorithm": "SYMMETRIC_DEFAULT"},
                     resources=[{"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": "arn:k"}], recipient=recipient,
                     read_only=True)
    record = kms_event(facts, info, event_id="e-1")
    check_record(record)
    assert record["eventTime"] == "2026-03-02T09:14:52Z"
    assert record["responseElements"] is None
    assert record["additionalEventData"]["recipient"]["attestationDocumentEnclaveImageDigest"] == "ab" * 48
    assert record["additionalEventData"]["recipient"]["attestationDocumentEnclavePCR8"] == "00" * 48
    denied = kms_event(facts, info, event_id="e-2", error_code="AccessDeniedException", error_message="x" * 5000)
    assert denied["errorCode"] == "AccessDeniedException" and len(denied["errorMessage"]) == 1024


def test_runtime_events() -> None:
    for name in ("RunEnclave", "TerminateEnclave", "EnclaveBootFailure", "EnclaveOutOfMemory"):
        record = runtime_event(name, event_time=T0, event_id="e", region=REGION, account_id=ACCOUNT,
                               enclave_id="i-1", details={"reason": "oom"} if "Memory" in name else None)
        check_record(record)
        assert record["eventSource"] == "enclaves.enclavekit.local"
    with pytest.raises(ValueError, match="unknown runtime event"):
        runtime_event("Reboot", event_time=T0, event_id="e", region=REGION, account_id=ACCOUNT, enclave_id="i")


def test_event_version_parses_as_integers() -> None:
    assert parse_event_version("1.10") == (1, 10)
    assert parse_event_version("1.08") == (1, 8)
    with pytest.raises(AuditFormatError):
        parse_event_version("2.0")
    with pytest.raises(AuditFormatError):
        parse_event_version("1.x")


@pytest.mark.parametrize("mutate", [
    lambda r: r.pop("eventID"),
    lambda r: r.update(eventTime="2026-03-02 09:14:52"),
    lambda r: r.update(userIdentity="root"),
    lambda r: r.update(requestParameters=[1]),
    lambda r: r.update(eventName=5),
])
def test_record_rules(mutate) -> None:  # type: ignore[no-untyped-def]
    record = event()
    mutate(record)
    with pytest.raises(AuditFormatError):
        check_record(record)


def test_pcr_hex_or_base64() -> None:
    raw = bytes(range(48))
    import base64
    assert normalise_pcr(raw.hex()) == raw
    assert normalise_pcr(base64.b64encode(raw).decode()) == raw
    with pytest.raises(AuditFormatError):
        normalise_pcr("!!")


# ------------------------------------------------------------------------------------------------ log files


def test_log_file_round_trip_and_determinism() -> None:
    lf = LogFile.from_records([event(1), event(2)])
    data = lf.to_bytes()
    assert data == lf.to_bytes()                     # mtime 0: same records, same bytes
    back = LogFile.from_bytes(data)
    assert back.records == lf.records and back.sha256 == hashlib.sha256(back.content).hexdigest()
    assert json.loads(decompress(data)) == {"Records": list(lf.records)}


def test_log_file_rules() -> None:
    good = LogFile.from_records([event()]).to_bytes()
    with pytest.raises(AuditFormatError, match="after end"):
        LogFile.from_bytes(good + gzip.compress(b"{}"))          # appended member
    with pytest.raises(AuditFormatError, match="truncated"):
        LogFile.from_bytes(good[:-9])
    with pytest.raises(AuditFormatError, match="gzip"):
        LogFile.from_bytes(b"not gzip")
    with pytest.raises(AuditFormatError, match="exceeds"):
        decompress(compress(b"x" * 5000), limit=100)
    with pytest.raises(AuditFormatError, match="exactly"):
        LogFile.from_bytes(compress(b'{"Records":[],"x":1}'))
    with pytest.raises(AuditFormatError, match="no records"):
        LogFile.from_bytes(compress(b'{"Records":[]}'))
    with pytest.raises(AuditFormatError, match="JSON"):
        LogFile.from_bytes(compress(b"{"))


def test_log_file_key_round_trip() -> None:
    key = LogFileKey(account_id=ACCOUNT, region="eu-west-1", delivered_at=T0, unique="Q3mZp8Lx2VbN0tKe",
                     prefix="my/prefix")
    text = key.to_key()
    assert text == ("my/prefix/AWSLogs/111122223333/CloudTrail/eu-west-1/2026/03/02/"
                    "111122223333_CloudTrail_eu-west-1_20260302T0914Z_Q3mZp8Lx2VbN0tKe.json.gz")
    assert LogFileKey.from_key(text) == key
    with pytest.raises(AuditFormatError, match="not under"):
        LogFileKey.from_key(text.replace("/03/02/", "/03/03/"))
    with pytest.raises(AuditFormatError):
        LogFileKey.from_key(text.replace("_Q3mZ", "_Q3m"))


# ------------------------------------------------------------------------------------------------ digests


def test_string_to_sign_vector() -> None:
    # spec §3.5 test vector (aws-cli unit test)
    assert string_to_sign("a", "b", "c", b"abc", None) == (
        b"a\nb/c\nba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\nnull")


def test_digest_key_round_trip() -> None:
    key = DigestKey(account_id=ACCOUNT, region=REGION, trail_name="my_trail-1", home_region="eu-west-1",
                    end_time=T0, backfill=True)
    text = key.to_key()
    assert text.endswith("_my_trail-1_eu-west-1_20260302T091452Z_backfill.json.gz")
    assert DigestKey.from_key(text) == key
    with pytest.raises(AuditFormatError):
        DigestKey.from_key(text.replace("CloudTrail-Digest_", "CloudTrail_"))


def _digest(previous: tuple[str, str, str, str] | None = None) -> DigestFile:
    entry = LogFileEntry(s3_bucket="b", s3_object="k", hash_value="0" * 64, oldest_event_time="2026-03-02T09:00:00Z",
                         newest_event_time="2026-03-02T09:10:00Z")
    return DigestFile.build(account_id=ACCOUNT, start=T0, end=T0, bucket="b", key="d", fingerprint=fingerprint(
        KEY.public_key()), log_files=[entry], previous=previous)


def test_digest_round_trip_sign_verify() -> None:
    d = _digest()
    back = DigestFile.from_bytes(d.to_bytes())
    assert back == d and back.content == d.content and back.is_chain_start
    assert back.oldest_event_time == "2026-03-02T09:00:00Z"
    signature = sign_digest(KEY, d.string_to_sign())
    assert len(signature) == 512
    verify_digest_signature(KEY.public_key(), back.string_to_sign(), signature)
    with pytest.raises(AuditValidationError):
        verify_digest_signature(KEY.public_key(), back.string_to_sign().replace(b"null", b"nul1"), signature)
    linked = _digest(("b", "d", d.sha256, signature))
    assert linked.string_to_sign().endswith(signature.encode())


# a fixed 2048-bit modulus (0xc333...3, top bit set) and e = 65537: a public key needs no primes to be encoded
FIXED_N = int("c" + "3" * 511, 16)
# MD5 of the DER below, cross-checked with `openssl rsa -RSAPublicKey_in -inform DER ... | openssl md5`
FIXED_FINGERPRINT = "28ffab35e378f4e019978c458f8b597a"


def test_fingerprint_is_md5_of_pkcs1_der() -> None:
    key = rsa.RSAPublicNumbers(65537, FIXED_N).public_key()
    der = public_key_der(key)
    # §3.6: PKCS#1 RSAPublicKey ::= SEQUENCE (len 0x010a) { INTEGER n (0x0101 bytes, leading 00), INTEGER e }
    assert der[:8] == bytes.fromhex("3082010a02820101")
    assert der == bytes.fromhex("3082010a0282010100") + FIXED_N.to_bytes(256, "big") + bytes.fromhex("0203010001")
    assert fingerprint(key) == FIXED_FINGERPRINT
    assert fingerprint(load_public_key_der(der)) == FIXED_FINGERPRINT
    # not SubjectPublicKeyInfo (whose DER starts 30 82 01 22 30 0d ...)
    assert public_key_der(KEY.public_key())[:8] == bytes.fromhex("3082010a02820101")


@pytest.mark.parametrize("mutate,match", [
    (lambda o: o.pop("digestS3Object"), "lacks"),
    (lambda o: o.update(digestEndTime="yesterday"), "time"),
    (lambda o: o.update(digestPublicKeyFingerprint="XYZ"), "Fingerprint"),
    (lambda o: o.update(logFiles={}), "array"),
    (lambda o: o.update(previousDigestS3Object="x"), "all null"),
    (lambda o: o.update(logFiles=[{"s3Bucket": "b"}]), "lacks"),
    (lambda o: o.update(awsAccountId=7), "string"),
])
def test_digest_rules(mutate, match) -> None:  # type: ignore[no-untyped-def]
    obj = json.loads(_digest().content)
    mutate(obj)
    with pytest.raises(AuditFormatError, match=match):
        DigestFile.from_bytes(compress(json.dumps(obj).encode()))


def test_digest_trailing_gzip_rejected() -> None:
    with pytest.raises(AuditFormatError, match="after end"):
        DigestFile.from_bytes(_digest().to_bytes() + b"\x1f\x8b")


# ------------------------------------------------------------------------------------------------ size caps (§1.1)


def test_oversize_fields_are_replaced_by_a_marker() -> None:
    facts = RequestFacts(request_id="r-1", event_time=T0, operation="CreateKey", region=REGION, account_id=ACCOUNT,
                         source_ip="203.0.113.25", user_agent="u" * 3000)
    info = AuditInfo(request_parameters={"description": "d" * (101 * 1024)},
                     response_elements={"keyMetadata": {"k": "v"}}, decision="y" * (29 * 1024))
    record = kms_event(facts, info, event_id="e-1")
    check_record(record)
    assert record["requestParameters"] == {"omitted": True, "originalSizeBytes": 101 * 1024 + 18}
    assert record["responseElements"] == {"keyMetadata": {"k": "v"}}       # under the cap: untouched
    assert record["additionalEventData"]["omitted"] is True                  # 28 KB cap
    assert len(record["userAgent"]) == 1024
    big = runtime_event("EnclaveBootFailure", event_time=T0, event_id="e", region=REGION, account_id=ACCOUNT,
                        enclave_id="i-1", details={"console": "c" * (200 * 1024)})
    assert big["serviceEventDetails"]["omitted"] is True
    # exactly at the cap stays
    at_cap = cap_record({**event(), "requestParameters": {"a": "x" * (100 * 1024 - 8)}})
    assert "omitted" not in at_cap["requestParameters"]
