"""The contract between the KMS service core (pure: operations, policies, Recipient) and its I/O shell
(HTTP server, SigV4, storage, audit log).

The HTTP layer authenticates a request (SigV4) to a :class:`Principal`, parses the JSON body, and calls
``KMSService.handle(KMSRequest) -> KMSResult``.  The service either returns the response members (blobs already
base64-encoded exactly as the JSON 1.1 protocol sends them) or raises :class:`KMSError` carrying AWS's exception
name and HTTP status.  Every call, allowed or denied, yields an :class:`AuditInfo` for the CloudTrail-format event:
on success in ``KMSResult.audit``, on failure in ``KMSError.audit`` (filled in as far as the request got).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from enclavekit.errors import EnclaveKitError

__all__ = ["Principal", "KMSRequest", "AuditInfo", "KMSResult", "KMSError", "RecipientContext"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``arn`` such as ``arn:aws:iam::111122223333:user/alice``."""

    access_key_id: str
    arn: str
    account_id: str
    name: str


@dataclass(frozen=True)
class KMSRequest:
    operation: str                 # "Decrypt", from X-Amz-Target "TrentService.Decrypt"
    params: dict[str, Any]         # the parsed JSON body (blobs still base64 strings, as received)
    principal: Principal
    request_id: str                # also returned as x-amzn-RequestId
    now: datetime                  # timezone-aware UTC; the service never reads a clock itself
    source_ip: str = "127.0.0.1"
    user_agent: str = ""


@dataclass(frozen=True)
class RecipientContext:
    """What a verified attestation document contributes to a request (Recipient)."""

    module_id: str
    image_sha384: str              # PCR0, lowercase hex
    pcrs: dict[int, str]           # index -> lowercase hex
    public_key_spki: bytes         # DER SubjectPublicKeyInfo of the enclave's RSA key
    nonce: bytes | None = None
    timestamp_ms: int = 0


@dataclass
class AuditInfo:
    """Facts for the audit event; never plaintext, key material, or whole documents."""

    request_parameters: dict[str, Any] | None = None   # without secrets (no Plaintext, no blobs)
    response_elements: dict[str, Any] | None = None
    resources: list[dict[str, str]] = field(default_factory=list)  # [{accountId, type, ARN}]
    recipient: RecipientContext | None = None
    read_only: bool = False
    decision: str | None = None    # which policy statement/condition decided, for denials and allows


@dataclass
class KMSResult:
    response: dict[str, Any]
    audit: AuditInfo


class KMSError(EnclaveKitError):
    """An AWS KMS exception: ``aws_code`` (``NotFoundException``…), HTTP ``status``, a safe message."""

    code = "E84"

    def __init__(self, aws_code: str, message: str, *, status: int = 400, audit: AuditInfo | None = None) -> None:
        super().__init__(f"{aws_code}: {message}")
        self.aws_code = aws_code
        self.aws_message = message
        self.status = status
        self.audit = audit or AuditInfo()
