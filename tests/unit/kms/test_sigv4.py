"""SigV4 server-side checks (kms/sigv4.py): real botocore-signed requests pass; each tampering fails its rule."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.config import Config

from enclavekit.kms.sigv4 import AuthorizationHeader, sign_request_headers, verify_request
from enclavekit.kms.types import KMSError, Principal

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
AKID = "AKIAEXAMPLEKEY000001"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PRINCIPAL = Principal(AKID, "arn:aws:iam::111122223333:user/alice", "111122223333", "alice")
URL = "http://127.0.0.1:4566/"
BODY = b'{"KeyId":"alias/test","Plaintext":"aGVsbG8="}'


def lookup(akid: str) -> tuple[Principal, str] | None:
    return (PRINCIPAL, SECRET) if akid == AKID else None


def signed(body: bytes = BODY, *, now: datetime = NOW, region: str = "us-east-1", secret: str = SECRET,
           extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.Encrypt",
               "Host": "127.0.0.1:4566", **(extra or {})}
    return sign_request_headers(url=URL, body=body, headers=headers, access_key_id=AKID, secret=secret,
                                region=region, now=now)


def check(headers: dict[str, str] | list[tuple[str, str]], body: bytes = BODY, *, now: datetime = NOW,
          region: str = "us-east-1") -> Principal:
    items = list(headers.items()) if isinstance(headers, dict) else headers
    return verify_request(method="POST", path="/", headers=items, body=body, lookup=lookup, now=now, region=region)


def expect(code: str, status: int, headers: Any, body: bytes = BODY, **kw: Any) -> KMSError:
    with pytest.raises(KMSError) as info:
        check(headers, body, **kw)
    assert info.value.aws_code == code
    assert info.value.status == status
    assert SECRET not in info.value.aws_message
    return info.value


def with_auth(headers: dict[str, str], auth: str) -> dict[str, str]:
    return {**headers, "Authorization": auth}


# --------------------------------------------------------------------------------------------- accepted


def test_botocore_signed_request_is_accepted() -> None:
    assert check(signed()) == PRINCIPAL


def test_real_boto3_client_request_is_accepted() -> None:
    """Capture what boto3's KMS client really sends (its own signer, clock, headers) and verify it."""
    captured: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def before_send(request: Any, **_: Any) -> None:
        captured["headers"] = [(k, v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()]
        captured["body"] = request.body
        raise Stop

    client = boto3.client("kms", region_name="us-east-1", endpoint_url=URL, aws_access_key_id=AKID,
                          aws_secret_access_key=SECRET, config=Config(retries={"max_attempts": 0}))
    client.meta.events.register("before-send.kms", before_send)
    with pytest.raises(Stop):
        client.encrypt(KeyId="alias/test", Plaintext=b"hello", EncryptionContext={"a": "b"})
    headers = captured["headers"]
    if not any(k.lower() == "host" for k, _ in headers):
        headers.append(("Host", "127.0.0.1:4566"))
    principal = verify_request(method="POST", path="/", headers=headers, body=captured["body"], lookup=lookup,
                               now=datetime.now(UTC), region="us-east-1")
    assert principal.arn == PRINCIPAL.arn


def test_additional_signed_headers_are_accepted() -> None:
    headers = signed(extra={"X-Custom": "a"})
    assert check(headers) == PRINCIPAL


def test_skew_just_inside_the_limit_is_accepted() -> None:
    assert check(signed(now=NOW - timedelta(minutes=4, seconds=59))) == PRINCIPAL


def test_matching_content_sha256_is_accepted() -> None:
    headers = signed(extra={"X-Amz-Content-SHA256": hashlib.sha256(BODY).hexdigest()})
    assert check(headers) == PRINCIPAL


# --------------------------------------------------------------------------------------------- rejected


def test_missing_authorization_is_missing_authentication_token() -> None:
    headers = signed()
    del headers["Authorization"]
    expect("MissingAuthenticationToken", 403, headers)


def test_tampered_body_is_invalid_signature() -> None:
    expect("InvalidSignatureException", 400, signed(), BODY.replace(b"aGVsbG8=", b"aGVsbG9="))


def test_tampered_signed_header_is_invalid_signature() -> None:
    headers = {**signed(), "X-Amz-Target": "TrentService.Decrypt"}
    expect("InvalidSignatureException", 400, headers)


def test_tampered_signature_is_invalid_signature() -> None:
    headers = signed()
    sig = headers["Authorization"][-64:]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    expect("InvalidSignatureException", 400, with_auth(headers, headers["Authorization"][:-64] + flipped))


def test_wrong_secret_is_invalid_signature() -> None:
    expect("InvalidSignatureException", 400, signed(secret="not-the-secret"))


def test_unknown_access_key_is_unrecognized_client() -> None:
    headers = signed()
    expect("UnrecognizedClientException", 400,
           with_auth(headers, headers["Authorization"].replace(AKID, "AKIAUNKNOWNKEY000001")))


def test_malformed_access_key_is_unrecognized_client() -> None:
    headers = signed()
    expect("UnrecognizedClientException", 400,
           with_auth(headers, headers["Authorization"].replace(AKID, "akia-lower")))


def test_expired_date_says_signature_expired() -> None:
    error = expect("InvalidSignatureException", 400, signed(now=NOW - timedelta(minutes=5, seconds=1)))
    assert error.aws_message.startswith("Signature expired:")


def test_future_date_is_not_yet_current() -> None:
    error = expect("InvalidSignatureException", 400, signed(now=NOW + timedelta(minutes=6)))
    assert "not yet current" in error.aws_message


def test_wrong_region_scope_is_invalid_signature() -> None:
    expect("InvalidSignatureException", 400, signed(region="eu-west-1"))


def test_wrong_service_scope_is_invalid_signature() -> None:
    headers = signed()
    expect("InvalidSignatureException", 400,
           with_auth(headers, headers["Authorization"].replace("/kms/aws4_request", "/s3/aws4_request")))


def test_scope_date_not_matching_x_amz_date_is_invalid_signature() -> None:
    headers = signed()
    expect("InvalidSignatureException", 400,
           with_auth(headers, headers["Authorization"].replace("/20260301/", "/20260302/")))


def test_content_sha256_not_matching_body_is_invalid_signature() -> None:
    headers = signed(extra={"X-Amz-Content-SHA256": hashlib.sha256(b"other").hexdigest()})
    expect("InvalidSignatureException", 400, headers)


def test_host_not_signed_is_incomplete_signature() -> None:
    headers = signed()
    auth = headers["Authorization"].replace("SignedHeaders=content-type;host;", "SignedHeaders=content-type;")
    expect("IncompleteSignature", 400, with_auth(headers, auth))


def test_x_amz_date_not_signed_is_incomplete_signature() -> None:
    headers = signed()
    auth = headers["Authorization"].replace(";x-amz-date;", ";")
    expect("IncompleteSignature", 400, with_auth(headers, auth))


def test_signed_header_absent_from_request_is_incomplete_signature() -> None:
    headers = signed()
    del headers["X-Amz-Target"]
    expect("IncompleteSignature", 400, headers)


def test_unparsable_x_amz_date_is_incomplete_signature() -> None:
    headers = {**signed(), "X-Amz-Date": "yesterday"}
    expect("IncompleteSignature", 400, headers)


def test_two_authorization_headers_are_incomplete_signature() -> None:
    headers = signed()
    items = [*headers.items(), ("Authorization", headers["Authorization"])]
    expect("IncompleteSignature", 400, items)


@pytest.mark.parametrize("auth", [
    "AWS4-HMAC-SHA1 Credential=AKIAEXAMPLEKEY000001/20260301/us-east-1/kms/aws4_request, SignedHeaders=host, "
    "Signature=" + "0" * 64,
    "AWS4-HMAC-SHA256 SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
    "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEY000001/20260301/us-east-1/kms/aws4_request, Signature=" + "0" * 64,
    "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEY000001/20260301/us-east-1/kms/aws4_request, SignedHeaders=host",
    "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEY000001/20260301/us-east-1/kms, SignedHeaders=host;x-amz-date, "
    "Signature=" + "0" * 64,
    "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEY000001/2026-03-01/us-east-1/kms/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
    "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEY000001/20260301/us-east-1/kms/aws4_request, "
    "SignedHeaders=x-amz-date;host, Signature=" + "0" * 64,
    "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEY000001/20260301/us-east-1/kms/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=XYZ",
    "AWS4-HMAC-SHA256 Credential=A/20260301/us-east-1/kms/aws4_request, Credential=B, "
    "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
    "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEY000001/20260301/us-east-1/kms/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64 + ", Extra=1",
    "AWS4-HMAC-SHA256 " + "x" * 5000,
    "garbage",
], ids=["algorithm", "no-credential", "no-signed-headers", "no-signature", "short-scope", "scope-date",
        "unsorted-headers", "signature-not-hex", "repeated-part", "unknown-part", "too-long", "garbage"])
def test_malformed_authorization_is_incomplete_signature(auth: str) -> None:
    expect("IncompleteSignature", 400, with_auth(signed(), auth))


def test_parse_returns_the_parts() -> None:
    header = AuthorizationHeader.parse(signed()["Authorization"])
    assert header.access_key_id == AKID
    assert (header.date, header.region, header.service) == ("20260301", "us-east-1", "kms")
    assert header.signed_headers == ("content-type", "host", "x-amz-date", "x-amz-target")


def test_naive_now_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        check(signed(), now=NOW.replace(tzinfo=None))


# --------------------------------------------------------------------------------------------- x-amz-target


def _signed_without_target() -> dict[str, str]:
    """What the AWS C SDK sends: X-Amz-Target present but not among the signed headers."""
    headers = {"Content-Type": "application/x-amz-json-1.1", "Host": "127.0.0.1:4566"}
    out = sign_request_headers(url=URL, body=BODY, headers=headers, access_key_id=AKID, secret=SECRET,
                               region="us-east-1", now=NOW)
    assert "x-amz-target" not in out["Authorization"]
    return {**out, "X-Amz-Target": "TrentService.Encrypt"}


def test_unsigned_target_is_accepted_by_default_like_aws() -> None:
    assert check(_signed_without_target()) == PRINCIPAL


def test_unsigned_target_can_be_swapped_by_default() -> None:
    # the gap require_signed_target closes: the same signature is valid for another operation
    replayed = {**_signed_without_target(), "X-Amz-Target": "TrentService.ScheduleKeyDeletion"}
    assert check(replayed) == PRINCIPAL


def test_require_signed_target_refuses_an_unsigned_target() -> None:
    with pytest.raises(KMSError) as info:
        verify_request(method="POST", path="/", headers=list(_signed_without_target().items()), body=BODY,
                       lookup=lookup, now=NOW, region="us-east-1", require_signed_target=True)
    assert info.value.aws_code == "IncompleteSignature"
    assert info.value.status == 400
    assert "x-amz-target" in info.value.aws_message


def test_require_signed_target_accepts_a_signed_target_and_detects_a_swap() -> None:
    headers = signed()
    assert "x-amz-target" in headers["Authorization"]
    principal = verify_request(method="POST", path="/", headers=list(headers.items()), body=BODY, lookup=lookup,
                               now=NOW, region="us-east-1", require_signed_target=True)
    assert principal == PRINCIPAL
    swapped = {**headers, "X-Amz-Target": "TrentService.ScheduleKeyDeletion"}
    with pytest.raises(KMSError) as info:
        verify_request(method="POST", path="/", headers=list(swapped.items()), body=BODY, lookup=lookup,
                       now=NOW, region="us-east-1", require_signed_target=True)
    assert info.value.aws_code == "InvalidSignatureException"
