"""Helpers for the KMS core tests: a service over a SQLite store in a temp dir, requests, and attestation
documents signed by a local PKI with an RSA recipient key."""

from __future__ import annotations

import base64
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclavekit.attestation.issuer import DocumentIssuer
from enclavekit.attestation.pki import LocalPKI
from enclavekit.attestation.verifier import ChainCache, TrustRoot
from enclavekit.formats.cms import open_envelope
from enclavekit.kms.service import KMSService
from enclavekit.kms.store import RootKey, SQLiteStore
from enclavekit.kms.types import KMSError, KMSRequest, KMSResult, Principal

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ACCOUNT = "111122223333"
REGION = "us-east-1"
ALICE = Principal("AKIAALICE00000000000", f"arn:aws:iam::{ACCOUNT}:user/alice", ACCOUNT, "alice")
BOB = Principal("AKIABOB0000000000000", f"arn:aws:iam::{ACCOUNT}:user/bob", ACCOUNT, "bob")
ENCLAVE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ENCLAVE_SPKI = ENCLAVE_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
PCR0 = bytes.fromhex("aa" * 48)
PCRS = {i: bytes([0xA0 + i]) * 48 for i in range(16)} | {0: PCR0}
DEBUG_PCRS = {i: (bytes(48) if i in (0, 1, 2, 8) else bytes([i + 1]) * 48) for i in range(16)}
_counter = itertools.count(1)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


@dataclass
class KMS:
    """A service plus the things tests need to drive it."""

    service: KMSService
    store: SQLiteStore
    pki: LocalPKI
    issuer: DocumentIssuer
    now: datetime = NOW
    principal: Principal = ALICE
    extra: dict[str, Any] = field(default_factory=dict)

    def call(self, operation: str, principal: Principal | None = None, now: datetime | None = None,
             **params: Any) -> dict[str, Any]:
        return self.result(operation, principal, now, **params).response

    def result(self, operation: str, principal: Principal | None = None, now: datetime | None = None,
               **params: Any) -> KMSResult:
        request = KMSRequest(operation=operation, params=params, principal=principal or self.principal,
                             request_id=f"req-{next(_counter)}", now=now or self.now)
        return self.service.handle(request)

    def error(self, operation: str, principal: Principal | None = None, now: datetime | None = None,
              **params: Any) -> KMSError:
        with pytest.raises(KMSError) as info:
            self.call(operation, principal, now, **params)
        return info.value

    def create_key(self, **params: Any) -> str:
        return str(self.call("CreateKey", **params)["KeyMetadata"]["KeyId"])

    def document(self, *, pcrs: dict[int, bytes] | None = None, public_key: bytes | None = ENCLAVE_SPKI,
                 nonce: bytes | None = None, at: datetime | None = None, module_id: str | None = None) -> bytes:
        when = at or self.now
        return self.issuer.issue(module_id=module_id or "i-0123456789abcdef0-enc0123456789abcdef",
                                 timestamp_ms=int(when.timestamp() * 1000), pcrs=pcrs or PCRS,
                                 public_key=public_key, user_data=None, nonce=nonce)

    def recipient(self, **kw: Any) -> dict[str, str]:
        return {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": b64(self.document(**kw))}


def open_for_enclave(ciphertext_for_recipient: str) -> bytes:
    return open_envelope(unb64(ciphertext_for_recipient), ENCLAVE_KEY)


def make_kms(tmp: Path, **service_kw: Any) -> KMS:
    pki = LocalPKI.open(tmp / "home", now=NOW - timedelta(days=1))
    store = SQLiteStore(tmp / "data", root_key=RootKey(os.urandom(32)), account_id=ACCOUNT)
    roots = [TrustRoot.from_certificate(pki.root.certificate, name="local")]
    service = KMSService(store, trust_roots=roots, account_id=ACCOUNT, region=REGION,
                         verifier_cache=ChainCache(), **service_kw)
    return KMS(service, store, pki, DocumentIssuer(pki))


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[KMS]:
    k = make_kms(tmp_path)
    yield k
    k.store.close()


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())
