"""enclavekit.sdk.kms against the real KMS pipeline (KMSApp + KMSService over SQLite) in-process.

The client's stream is one end of a Unix socket pair; a thread on the other end reads the HTTP request and answers
with ``KMSApp.handle`` (the pipeline ``kms serve`` runs: SigV4 checked with botocore, key policies, Recipient).
The NSM is a :class:`~enclavekit.testing.nsm.FakeNSM` whose documents are signed by a local PKI the KMS trusts.
No AF_INET socket is opened (tests/conftest.py guards it).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from enclavekit.attestation.issuer import DocumentIssuer
from enclavekit.attestation.pki import LocalPKI
from enclavekit.attestation.verifier import ChainCache, TrustRoot
from enclavekit.errors import TransportError
from enclavekit.formats.cms import CMSFormatError
from enclavekit.kms.auditlog import MemorySink
from enclavekit.kms.http import KMSApp
from enclavekit.kms.service import KMSService
from enclavekit.kms.store import RootKey, SQLiteStore
from enclavekit.kms.types import KMSError, KMSRequest, Principal
from enclavekit.sdk.kms import AWSCredentials, KMSClient, default_endpoint
from enclavekit.testing.nsm import FakeNSM

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ACCOUNT = "111122223333"
AKID = "AKIAENCLAVE000000001"
SECRET = "enclave/secret/key/0000000000000000000000"
ALICE = Principal(AKID, f"arn:aws:iam::{ACCOUNT}:user/alice", ACCOUNT, "alice")
PCR0 = bytes.fromhex("ab" * 48)
OTHER_PCR0 = bytes.fromhex("cd" * 48)


def _policy(pcr0: bytes) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": ["kms:Encrypt", "kms:DescribeKey", "kms:GenerateDataKey*", "kms:PutKeyPolicy"], "Resource": "*"},
        {"Sid": "EnclaveOnly", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom"], "Resource": "*",
         "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": pcr0.hex()}}},
    ]})


@dataclass
class Setup:
    service: KMSService
    app: KMSApp
    pki: LocalPKI
    requests: list[bytes]

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        request = KMSRequest(operation=operation, params=params, principal=ALICE, request_id="r", now=NOW)
        return self.service.handle(request).response

    def nsm(self, pcr0: bytes = PCR0, *, debug: bool = False) -> FakeNSM:
        return FakeNSM(signer=DocumentIssuer(self.pki), measurements={0: pcr0, 1: b"\x01" * 48, 2: b"\x02" * 48},
                       debug_mode=debug, start_ms=int(NOW.timestamp() * 1000))

    def connector(self, respond: Callable[[bytes], bytes] | None = None) -> Callable[[float], socket.socket]:
        """A stream whose far end answers one HTTP request with the KMS pipeline (or ``respond``)."""

        def connect(timeout: float) -> socket.socket:
            near, far = socket.socketpair()
            threading.Thread(target=self._serve, args=(far, respond), daemon=True).start()
            return near

        return connect

    def _serve(self, sock: socket.socket, respond: Callable[[bytes], bytes] | None) -> None:
        with sock:
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
            length = int(next(v for k, v in headers if k.lower() == "content-length"))
            while len(body) < length:
                body += sock.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            if respond is not None:
                sock.sendall(respond(body))
                return
            method, path, _ = lines[0].split(" ")
            response = self.app.handle(method=method, path=path, headers=headers, body=body)  # type: ignore[arg-type]
            out = f"HTTP/1.1 {response.status} X\r\nContent-Length: {len(response.body)}\r\n"
            out += "".join(f"{k}: {v}\r\n" for k, v in response.headers) + "\r\n"
            sock.sendall(out.encode("latin-1") + response.body)


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Setup]:
    pki = LocalPKI.open(tmp_path / "home", now=NOW - timedelta(days=1))
    store = SQLiteStore(tmp_path / "data", root_key=RootKey(os.urandom(32)), account_id=ACCOUNT)
    service = KMSService(store, trust_roots=[TrustRoot.from_certificate(pki.root.certificate, name="local")],
                         account_id=ACCOUNT, region="us-east-1", verifier_cache=ChainCache())
    app = KMSApp(service, lambda akid: (ALICE, SECRET) if akid == AKID else None, MemorySink(),
                 region="us-east-1", account_id=ACCOUNT, clock=lambda: NOW)
    yield Setup(service, app, pki, [])
    store.close()


def _key(kms: Setup, pcr0: bytes = PCR0) -> str:
    return str(kms.call("CreateKey", Policy=_policy(pcr0))["KeyMetadata"]["KeyId"])


def _encrypt(kms: Setup, key_id: str, plaintext: bytes, **extra: Any) -> bytes:
    blob = kms.call("Encrypt", KeyId=key_id, Plaintext=base64.b64encode(plaintext).decode(), **extra)
    return base64.b64decode(blob["CiphertextBlob"])


def _client(kms: Setup, nsm: FakeNSM, *, secret: str = SECRET, endpoint: str | None = "http://kms.local",
            respond: Callable[[bytes], bytes] | None = None) -> KMSClient:
    return KMSClient("us-east-1", credentials=AWSCredentials(AKID, secret), endpoint=endpoint,
                     connect=kms.connector(respond), nsm=nsm.client(), clock=lambda: NOW)


# ------------------------------------------------------------------------------------------ happy paths


def test_decrypt_opens_the_envelope_in_the_enclave(kms: Setup) -> None:
    key_id = _key(kms)
    blob = _encrypt(kms, key_id, b"the secret", EncryptionContext={"app": "demo"})
    client = _client(kms, kms.nsm())
    assert client.decrypt(blob, {"app": "demo"}) == b"the secret"
    # §4.2: the response carried no plaintext, only the envelope; the request carried Recipient
    (raw,) = kms.requests
    head, _, body = raw.partition(b"\r\n\r\n")
    sent = json.loads(body)
    assert list(sent["Recipient"]) == ["KeyEncryptionAlgorithm", "AttestationDocument"]
    assert b"X-Amz-Target: TrentService.Decrypt" in head and b"Host: kms.local" in head
    assert client.last_attestation_document == base64.b64decode(sent["Recipient"]["AttestationDocument"])


def test_decrypt_with_key_id_and_algorithm(kms: Setup) -> None:
    key_id = _key(kms)
    blob = _encrypt(kms, key_id, b"x")
    assert _client(kms, kms.nsm()).decrypt(blob, key_id=key_id, encryption_algorithm="SYMMETRIC_DEFAULT") == b"x"


def test_generate_data_key_and_random(kms: Setup) -> None:
    key_id = _key(kms)
    client = _client(kms, kms.nsm())
    data_key = client.generate_data_key(key_id, "AES_128")
    assert len(data_key.plaintext) == 16 and data_key.key_id.endswith(key_id)
    assert client.decrypt(data_key.ciphertext_blob) == data_key.plaintext
    assert "plaintext" not in repr(data_key)
    assert len(client.generate_random(1024)) == 1024


def test_a_fresh_key_per_call(kms: Setup) -> None:
    key_id = _key(kms)
    client = _client(kms, kms.nsm())
    blob = _encrypt(kms, key_id, b"x")
    client.decrypt(blob)
    first = client.last_attestation_document
    client.decrypt(blob)
    assert first is not None and first != client.last_attestation_document


def test_session_token_is_sent_and_signed(kms: Setup) -> None:
    def respond(body: bytes) -> bytes:
        return b'HTTP/1.1 400 Bad\r\nContent-Length: 2\r\n\r\n{}'

    client = KMSClient("us-east-1", credentials=AWSCredentials(AKID, SECRET, "TOKEN"), endpoint="http://kms.local",
                       connect=kms.connector(respond), nsm=kms.nsm().client(), clock=lambda: NOW)
    with pytest.raises(KMSError):
        client.generate_random(8)
    seen = kms.requests
    head = seen[0].split(b"\r\n\r\n")[0].decode()
    assert "X-Amz-Security-Token: TOKEN" in head
    assert "x-amz-security-token" in head.split("SignedHeaders=")[1].split(",")[0]


# ------------------------------------------------------------------------------------- denials (AWS errors)


def test_other_image_is_denied_naming_the_condition(kms: Setup) -> None:
    key_id = _key(kms)
    blob = _encrypt(kms, key_id, b"the secret")
    with pytest.raises(KMSError) as info:
        _client(kms, kms.nsm(OTHER_PCR0)).decrypt(blob)
    assert info.value.aws_code == "AccessDeniedException" and info.value.status == 400
    assert "kms:RecipientAttestation:ImageSha384" in info.value.aws_message
    assert info.value.code == "E84"


def test_debug_mode_enclave_is_denied(kms: Setup) -> None:
    key_id = _key(kms)
    blob = _encrypt(kms, key_id, b"the secret")
    with pytest.raises(KMSError) as info:
        _client(kms, kms.nsm(debug=True)).decrypt(blob)
    assert info.value.aws_code == "AccessDeniedException"


def test_wrong_secret_is_a_signature_error(kms: Setup) -> None:
    with pytest.raises(KMSError) as info:
        _client(kms, kms.nsm(), secret="wrong" * 8).generate_random(4)
    assert info.value.aws_code == "InvalidSignatureException"


def test_wrong_host_in_signature_is_still_consistent(kms: Setup) -> None:
    # the Host header sent is the one signed, whatever the endpoint name
    key_id = _key(kms)
    blob = _encrypt(kms, key_id, b"y")
    assert _client(kms, kms.nsm(), endpoint="http://kms.us-east-1.amazonaws.com:8443").decrypt(blob) == b"y"


# ------------------------------------------------------------------------------- malformed KMS responses


def _raw(status: int, body: bytes, extra: str = "") -> Callable[[bytes], bytes]:
    return lambda _: f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@pytest.mark.parametrize(("body", "code", "message"), [
    (b'{"__type":"com.amazonaws.kms#NotFoundException","message":"gone"}', "NotFoundException", "gone"),
    (b'{"__type":"AccessDeniedException:http://internal","Message":"no"}', "AccessDeniedException", "no"),
    (b'{"__type":"InvalidCiphertextException"}', "InvalidCiphertextException", "HTTP 400"),
    (b"not json", "UnknownError", "HTTP 400"),
])
def test_error_shapes_as_botocore_reads_them(kms: Setup, body: bytes, code: str, message: str) -> None:
    with pytest.raises(KMSError) as info:
        _client(kms, kms.nsm(), respond=_raw(400, body)).generate_random(4)
    assert (info.value.aws_code, info.value.aws_message) == (code, message)


def test_server_fault_without_type(kms: Setup) -> None:
    with pytest.raises(KMSError) as info:
        _client(kms, kms.nsm(), respond=_raw(503, b"")).generate_random(4)
    assert (info.value.aws_code, info.value.status) == ("KMSInternalException", 503)


@pytest.mark.parametrize("body", [b"[]", b"{not json", b'{"CiphertextForRecipient": 5}',
                                  b'{"CiphertextForRecipient": "@@@"}'])
def test_malformed_success_bodies_are_transport_errors(kms: Setup, body: bytes) -> None:
    with pytest.raises(TransportError):
        _client(kms, kms.nsm(), respond=_raw(200, body)).generate_random(4)


def test_plaintext_in_a_recipient_response_is_refused(kms: Setup) -> None:
    body = b'{"Plaintext":"c2VjcmV0","CiphertextForRecipient":"AAAA"}'
    with pytest.raises(TransportError, match="Plaintext despite Recipient"):
        _client(kms, kms.nsm(), respond=_raw(200, body)).generate_random(4)


def test_envelope_for_another_key_does_not_open(kms: Setup) -> None:
    key_id = _key(kms)
    blob = _encrypt(kms, key_id, b"z")
    captured: list[str] = []
    real = _client(kms, kms.nsm())
    real.decrypt(blob)
    last = kms.requests[-1]
    assert last  # a real envelope for a previous key: replay it to a client with a fresh key
    response = kms.app.handle(method="POST", path="/", headers=[
        tuple(line.split(": ", 1)) for line in last.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
    ], body=last.split(b"\r\n\r\n", 1)[1])  # type: ignore[misc]
    captured.append(response.body.decode())
    with pytest.raises(CMSFormatError):
        _client(kms, kms.nsm(), respond=_raw(200, captured[0].encode())).generate_random(4)


def test_decrypt_response_without_key_id(kms: Setup) -> None:
    key_id = _key(kms)
    blob = _encrypt(kms, key_id, b"z")
    client = _client(kms, kms.nsm())
    original = client.call

    def without_key_id(operation: str, params: Any) -> dict[str, Any]:
        response = original(operation, params)
        response.pop("KeyId")
        return response

    client.call = without_key_id  # type: ignore[method-assign]
    with pytest.raises(TransportError, match="no KeyId"):
        client.decrypt(blob)


def test_truncated_http_response(kms: Setup) -> None:
    with pytest.raises(TransportError):
        _client(kms, kms.nsm(), respond=lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}").generate_random(4)


def test_oversize_response_is_refused(kms: Setup) -> None:
    with pytest.raises(TransportError, match="exceeds"):
        _client(kms, kms.nsm(), respond=lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n"
                ).generate_random(4)


def test_unreachable_proxy_is_a_transport_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVEKIT_VSOCK_DIR", str(tmp_path / "vsock"))
    monkeypatch.setenv("ENCLAVEKIT_VSOCK_CID", "16")
    (tmp_path / "vsock" / "3").mkdir(parents=True)
    client = KMSClient(credentials=AWSCredentials(AKID, SECRET), endpoint="http://kms.local",
                       nsm=FakeNSM().client(), timeout=2)
    with pytest.raises(TransportError):
        client.generate_random(4)


# ------------------------------------------------------------------------------------------- caller bugs


def test_caller_bugs_raise_value_errors(kms: Setup) -> None:
    client = _client(kms, kms.nsm())
    with pytest.raises(ValueError):
        client.generate_random(0)
    with pytest.raises(ValueError):
        client.generate_random(1025)
    with pytest.raises(ValueError):
        client.decrypt(b"")
    with pytest.raises(ValueError):
        client.decrypt(b"x", encryption_algorithm="ROT13")
    with pytest.raises(ValueError):
        client.generate_data_key("k", "AES-256")
    with pytest.raises(ValueError):
        KMSClient(credentials=AWSCredentials(AKID, SECRET), endpoint="ftp://x")
    with pytest.raises(ValueError):
        AWSCredentials("", SECRET)
    with pytest.raises(TypeError):
        KMSClient(credentials=(AKID, SECRET))  # type: ignore[arg-type]


def test_default_endpoints_and_secret_free_repr() -> None:
    assert default_endpoint("eu-west-1") == "kms.eu-west-1.amazonaws.com"
    assert default_endpoint("cn-north-1") == "kms.cn-north-1.amazonaws.com.cn"
    assert SECRET not in repr(AWSCredentials(AKID, SECRET))
    client = KMSClient("eu-west-1", credentials=AWSCredentials(AKID, SECRET))
    assert (client.scheme, client.host) == ("https", "kms.eu-west-1.amazonaws.com")
