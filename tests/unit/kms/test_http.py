"""The HTTP request pipeline (kms/http.py KMSApp), driven without sockets: AWS JSON 1.1 shapes, every bad input."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from enclavekit.kms.auditlog import MemorySink
from enclavekit.kms.http import MAX_BODY, KMSApp
from enclavekit.kms.sigv4 import sign_request_headers
from enclavekit.kms.types import AuditInfo, KMSError, KMSRequest, KMSResult, Principal

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
AKID = "AKIAEXAMPLEKEY000001"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ALICE = Principal(AKID, "arn:aws:iam::111122223333:user/alice", "111122223333", "alice")
PLAINTEXT_MARKER = "c2VjcmV0LXBsYWludGV4dA=="  # base64 of a would-be secret; must never reach the audit log


class FakeService:
    """Answers a few operations the way the real core does (a KMSResult, or a KMSError with audit facts)."""

    def __init__(self) -> None:
        self.requests: list[KMSRequest] = []

    def handle(self, request: KMSRequest) -> KMSResult:
        self.requests.append(request)
        if request.operation == "Encrypt":
            return KMSResult({"CiphertextBlob": "AAAA", "KeyId": "arn:key"},
                             AuditInfo(request_parameters={"keyId": request.params.get("KeyId")}))
        if request.operation == "DescribeKey":
            raise KMSError("NotFoundException", "Key 'x' does not exist",
                           audit=AuditInfo(request_parameters={"keyId": "x"}))
        if request.operation == "Decrypt":
            raise KMSError("AccessDeniedException", "denied by statement 'OnlyPCR0'",
                           audit=AuditInfo(decision="statement 'OnlyPCR0'"))
        if request.operation == "GenerateRandom":
            raise RuntimeError(f"bug while handling {PLAINTEXT_MARKER}")
        raise KMSError("UnknownOperationException", f"unknown operation {request.operation}")


class FailingSink(MemorySink):
    def append(self, event: Mapping[str, Any]) -> None:
        raise OSError(28, "No space left on device")


def lookup(akid: str) -> tuple[Principal, str] | None:
    return (ALICE, SECRET) if akid == AKID else None


def make_app(sink: MemorySink | None = None) -> tuple[KMSApp, FakeService, MemorySink]:
    service, audit = FakeService(), sink or MemorySink()
    app = KMSApp(service, lookup, audit, region="us-east-1", account_id="111122223333", clock=lambda: NOW,
                 request_ids=iter(f"req-{n}" for n in range(1000)).__next__)
    return app, service, audit


def request(app: KMSApp, operation: str | None = "Encrypt", body: bytes | None = None, *,
            content_type: str = "application/x-amz-json-1.1", sign: bool = True, method: str = "POST",
            path: str = "/", extra: dict[str, str] | None = None, too_large: bool = False) -> tuple[int, Any, dict]:
    if body is None:
        body = json.dumps({"KeyId": "alias/a", "Plaintext": PLAINTEXT_MARKER}).encode()
    headers = {"Host": "127.0.0.1:4566", "Content-Type": content_type, "User-Agent": "test/1.0", **(extra or {})}
    if operation is not None:
        headers["X-Amz-Target"] = f"TrentService.{operation}"
    if sign:
        headers = sign_request_headers(url="http://127.0.0.1:4566/", body=body, headers=headers,
                                       access_key_id=AKID, secret=SECRET, region="us-east-1", now=NOW)
    response = app.handle(method=method, path=path, headers=list(headers.items()), body=body,
                          body_too_large=too_large)
    hdrs = dict(response.headers)
    return response.status, json.loads(response.body), hdrs


def expect_error(result: tuple[int, Any, dict], code: str, status: int = 400) -> str:
    got_status, body, headers = result
    assert (got_status, body["__type"]) == (status, code), body
    assert set(body) == {"__type", "message"}
    assert headers["Content-Type"] == "application/x-amz-json-1.1"
    assert headers["x-amzn-RequestId"].startswith("req-")
    return str(body["message"])


# --------------------------------------------------------------------------------------------- success


def test_success_is_200_json_with_request_id_and_one_audit_event() -> None:
    app, service, audit = make_app()
    status, body, headers = request(app)
    assert status == 200
    assert body == {"CiphertextBlob": "AAAA", "KeyId": "arn:key"}
    assert headers["x-amzn-RequestId"] == "req-0"
    assert headers["Content-Type"] == "application/x-amz-json-1.1"
    (req,) = service.requests
    assert (req.operation, req.principal, req.request_id, req.now) == ("Encrypt", ALICE, "req-0", NOW)
    assert req.params["KeyId"] == "alias/a"
    assert req.user_agent == "test/1.0"
    (event,) = audit.events
    assert event["eventName"] == "Encrypt"
    assert event["requestID"] == "req-0"
    assert event["userIdentity"]["arn"] == ALICE.arn
    assert event["requestParameters"] == {"keyId": "alias/a"}
    assert "errorCode" not in event
    assert PLAINTEXT_MARKER not in json.dumps(audit.events)


def test_json_1_0_content_type_and_empty_body_are_accepted() -> None:
    app, service, _ = make_app()
    status, _, _ = request(app, body=b"", content_type="application/x-amz-json-1.0")
    assert status == 200
    assert service.requests[0].params == {}


# --------------------------------------------------------------------------------------------- service errors


def test_service_error_keeps_its_name_status_and_audit_facts() -> None:
    app, _, audit = make_app()
    message = expect_error(request(app, "DescribeKey"), "NotFoundException")
    assert message == "Key 'x' does not exist"
    assert audit.events[0]["errorCode"] == "NotFoundException"
    assert audit.events[0]["requestParameters"] == {"keyId": "x"}


def test_denial_is_audited_with_the_deciding_statement() -> None:
    app, _, audit = make_app()
    expect_error(request(app, "Decrypt"), "AccessDeniedException")
    assert audit.events[0]["additionalEventData"]["policyDecision"] == "statement 'OnlyPCR0'"


def test_service_bug_is_a_500_internal_exception_without_request_data(caplog: pytest.LogCaptureFixture) -> None:
    app, _, audit = make_app()
    with caplog.at_level(logging.INFO, logger="enclavekit.kms"):
        message = expect_error(request(app, "GenerateRandom"), "KMSInternalException", 500)
    assert "req-0" in message
    assert PLAINTEXT_MARKER not in message
    assert PLAINTEXT_MARKER not in caplog.text
    assert audit.events[0]["errorCode"] == "KMSInternalException"


def test_audit_failure_turns_success_into_500() -> None:
    app, service, _ = make_app(FailingSink())
    expect_error(request(app), "KMSInternalException", 500)
    assert len(service.requests) == 1


# --------------------------------------------------------------------------------------------- bad input


def test_unknown_operation_from_the_service() -> None:
    app, _, _ = make_app()
    expect_error(request(app, "MakeCoffee"), "UnknownOperationException")


@pytest.mark.parametrize("target", ["", "TrentService.", "Trent.Encrypt", "TrentService.Enc rypt",
                                    "TrentService." + "A" * 65])
def test_malformed_target_is_unknown_operation(target: str) -> None:
    app, service, audit = make_app()
    expect_error(request(app, None, extra={"X-Amz-Target": target} if target else None),
                 "UnknownOperationException")
    assert service.requests == []
    assert audit.events[0]["eventName"] == "Unknown"


@pytest.mark.parametrize("body", [b"{", b"[1,2]", b'"text"', b"null", b'{"a":1}{"b":2}', b"\xff\xfe{}",
                                  b'{"a":1,"a":2}', b'{"n":NaN}', b'{"n":Infinity}', b"[" * 100000],
                         ids=["truncated", "array", "string", "null", "trailing", "not-utf8", "duplicate-key",
                              "nan", "infinity", "deep-nesting"])
def test_malformed_json_is_serialization_exception(body: bytes) -> None:
    app, service, audit = make_app()
    expect_error(request(app, body=body), "SerializationException")
    assert service.requests == []
    assert audit.events[0]["errorCode"] == "SerializationException"


def test_wrong_content_type_is_serialization_exception() -> None:
    app, _, _ = make_app()
    expect_error(request(app, content_type="text/plain"), "SerializationException")


def test_oversize_body_is_validation_exception_and_closes() -> None:
    app, service, audit = make_app()
    response = app.handle(method="POST", path="/", headers=[("Host", "x")], body=b"", body_too_large=True)
    assert response.status == 413
    assert response.close
    assert json.loads(response.body)["__type"] == "ValidationException"
    assert str(MAX_BODY) in json.loads(response.body)["message"]
    assert service.requests == []
    assert len(audit.events) == 1


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/", 405), ("POST", "/keys", 404),
                                                        ("PUT", "/", 405)])
def test_other_methods_and_paths_are_refused(method: str, path: str, status: int) -> None:
    app, service, _ = make_app()
    expect_error(request(app, method=method, path=path), "UnknownOperationException", status)
    assert service.requests == []


def test_unsigned_request_is_missing_authentication_token_and_audited() -> None:
    app, service, audit = make_app()
    expect_error(request(app, sign=False), "MissingAuthenticationToken", 403)
    assert service.requests == []
    assert audit.events[0]["userIdentity"]["type"] == "Unknown"
    assert audit.events[0]["eventName"] == "Encrypt"


def test_unknown_key_is_audited_with_the_claimed_access_key() -> None:
    app, _, audit = make_app()
    body = b"{}"
    headers = sign_request_headers(url="http://127.0.0.1:4566/", body=body,
                                   headers={"Host": "127.0.0.1:4566", "X-Amz-Target": "TrentService.Encrypt",
                                            "Content-Type": "application/x-amz-json-1.1"},
                                   access_key_id="AKIANOBODY0000000001", secret="x", region="us-east-1", now=NOW)
    response = app.handle(method="POST", path="/", headers=list(headers.items()), body=body)
    assert json.loads(response.body)["__type"] == "UnrecognizedClientException"
    assert audit.events[0]["userIdentity"]["accessKeyId"] == "AKIANOBODY0000000001"


def test_inflight_counter_returns_to_idle() -> None:
    app, _, _ = make_app()
    request(app)
    assert app.wait_idle(0.1)


# --------------------------------------------------------------------------------------------- server wiring


def test_server_config_rules(tmp_path: Any) -> None:
    from enclavekit.errors import ConfigError
    from enclavekit.kms.server import ServerConfig

    ServerConfig(data_dir=tmp_path)
    for bad in [{"port": 70000}, {"workers": 0}, {"workers": 65}, {"account_id": "12"},
                {"tls_cert": tmp_path / "c.pem"}, {"tls_local_ca": True, "tls_cert": tmp_path, "tls_key": tmp_path},
                {"max_attestation_age": 0}, {"database_url": "mysql://x"}]:
        with pytest.raises(ConfigError):
            ServerConfig(data_dir=tmp_path, **bad)


def test_local_tls_context_creates_a_ca_once(tmp_path: Any) -> None:
    from cryptography import x509

    from enclavekit.kms.server import local_tls_context

    _, ca = local_tls_context(tmp_path / "tls", "127.0.0.1", now=NOW)
    first = ca.read_bytes()
    _, again = local_tls_context(tmp_path / "tls", "127.0.0.1", now=NOW)
    assert again.read_bytes() == first
    leaf = x509.load_pem_x509_certificates((tmp_path / "tls" / "server.pem").read_bytes())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert ((tmp_path / "tls" / "ca.key").stat().st_mode & 0o777) == 0o600


def test_principal_lookups_are_cached_positively_only() -> None:
    from enclavekit.kms.server import _CachedLookup

    class Store:
        calls = 0

        def lookup_principal(self, akid: str) -> tuple[Principal, str] | None:
            Store.calls += 1
            return (ALICE, SECRET) if akid == AKID else None

    cached = _CachedLookup(Store())  # type: ignore[arg-type]
    assert cached(AKID) == (ALICE, SECRET)
    assert cached(AKID) == (ALICE, SECRET)
    assert cached("AKIANOBODY") is None
    assert cached("AKIANOBODY") is None
    assert Store.calls == 3


def _signed_without_target(operation: str) -> tuple[list[tuple[str, str]], bytes]:
    """Headers signed the way the AWS C SDK signs: X-Amz-Target added after signing, so not covered."""
    body = json.dumps({"KeyId": "alias/a"}).encode()
    headers = {"Host": "127.0.0.1:4566", "Content-Type": "application/x-amz-json-1.1"}
    headers = sign_request_headers(url="http://127.0.0.1:4566/", body=body, headers=headers,
                                   access_key_id=AKID, secret=SECRET, region="us-east-1", now=NOW)
    headers["X-Amz-Target"] = f"TrentService.{operation}"
    return list(headers.items()), body


@pytest.mark.parametrize("required", [False, True])
def test_require_signed_target_refuses_an_unsigned_operation(required: bool) -> None:
    service, sink = FakeService(), MemorySink()
    app = KMSApp(service, lookup, sink, region="us-east-1", account_id="111122223333", clock=lambda: NOW,
                 require_signed_target=required)
    headers, body = _signed_without_target("Encrypt")
    response = app.handle(method="POST", path="/", headers=headers, body=body, body_too_large=False)
    if required:
        assert response.status == 400
        assert json.loads(response.body)["__type"] == "IncompleteSignature"
        assert service.requests == []
    else:  # AWS parity: the C SDK's signing is accepted by default
        assert response.status == 200
        assert [r.operation for r in service.requests] == ["Encrypt"]


def test_require_signed_target_accepts_a_signed_target() -> None:
    service = FakeService()
    app = KMSApp(service, lookup, MemorySink(), region="us-east-1", account_id="111122223333", clock=lambda: NOW,
                 require_signed_target=True)
    status, _, _ = request(app, "Encrypt")
    assert status == 200
