"""SigV4 authentication of incoming KMS requests (spec §4.1, §4.7).

The server side of AWS Signature Version 4 for ``Authorization: AWS4-HMAC-SHA256 Credential=AKID/yyyymmdd/region/
kms/aws4_request, SignedHeaders=..., Signature=...``.  The canonical request and the string to sign are rebuilt
with botocore's own signer (:class:`botocore.auth.SigV4Auth`) from exactly the headers the client says it signed,
and the signature is compared in constant time.

Checks, in order, each raising :class:`~enclavekit.kms.types.KMSError` with AWS's exception name and status:

1. no ``Authorization`` header -> ``MissingAuthenticationToken`` (403);
2. an unparsable header, a missing ``Credential``/``SignedHeaders``/``Signature`` part, ``host`` or ``x-amz-date``
   not signed (``x-amz-target`` too with ``require_signed_target``), a signed header that is absent ->
   ``IncompleteSignature`` (400);
3. a credential scope whose date is not the ``X-Amz-Date`` day, whose region is not ours, or whose service is not
   ``kms`` -> ``InvalidSignatureException`` (400);
4. ``X-Amz-Date`` more than five minutes away from ``now`` -> ``InvalidSignatureException`` "Signature expired"
   (AWS's wording);
5. an access key id nobody holds -> ``UnrecognizedClientException`` (400);
6. an ``X-Amz-Content-SHA256`` that is not the SHA-256 of the body, or a signature that does not match ->
   ``InvalidSignatureException`` (400).

Time and the credential lookup are parameters; nothing here reads the clock or a store.

``X-Amz-Target`` names the operation, and AWS does not require it to be signed (the AWS C SDK used by kmstool
does not sign it).  A request seen on the wire can then be replayed, within the clock skew window, as another
operation with the same body: any body with a ``KeyId`` (an ``Encrypt``, a ``DescribeKey``) becomes a valid
``DisableKey`` or ``ScheduleKeyDeletion``.  ``require_signed_target=True`` refuses requests that do not sign it;
off by default for parity with AWS.  TLS keeps requests off the wire in the first place: plain HTTP is for
loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest, HTTPHeaders  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from enclavekit.kms.types import KMSError, Principal

__all__ = [
    "ALGORITHM",
    "MAX_SKEW",
    "SERVICE",
    "AuthorizationHeader",
    "PrincipalLookup",
    "verify_request",
    "sign_request_headers",
]

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "kms"
# §4.7: AWS refuses requests whose X-Amz-Date is more than 5 minutes off ("Signature expired")
MAX_SKEW = timedelta(minutes=5)
_MAX_HEADER_LEN = 4096
_AMZ_DATE = "%Y%m%dT%H%M%SZ"

# (access key id) -> (principal, secret access key), or None for a key nobody holds
PrincipalLookup = Callable[[str], "tuple[Principal, str] | None"]

_KEY_ID_RE = re.compile(r"[A-Z0-9]{16,128}")
_DATE_RE = re.compile(r"[0-9]{8}")
_HEADER_NAME_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
_AMZ_DATE_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z", re.ASCII)


def _incomplete(message: str) -> KMSError:
    return KMSError("IncompleteSignature", message, status=400)


def _invalid(message: str) -> KMSError:
    return KMSError("InvalidSignatureException", message, status=400)


@dataclass(frozen=True)
class AuthorizationHeader:
    """The parts of an ``AWS4-HMAC-SHA256`` Authorization header."""

    access_key_id: str
    date: str            # yyyymmdd of the credential scope
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @classmethod
    def parse(cls, value: str) -> AuthorizationHeader:
        """Parse ``AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...``; IncompleteSignature if not."""
        if len(value) > _MAX_HEADER_LEN:
            raise _incomplete("Authorization header is too long")
        algorithm, _, rest = value.strip().partition(" ")
        if algorithm != ALGORITHM:
            raise _incomplete(f"Authorization header requires the {ALGORITHM} algorithm")
        parts: dict[str, str] = {}
        for item in rest.split(","):
            name, eq, val = item.strip().partition("=")
            if not eq or name in parts:
                raise _incomplete("Authorization header is malformed: expected Credential=..., SignedHeaders=..., "
                                  "Signature=... each once")
            parts[name] = val.strip()
        for required in ("Credential", "SignedHeaders", "Signature"):
            if required not in parts:
                raise _incomplete(f"Authorization header requires '{required}' parameter")
        if set(parts) - {"Credential", "SignedHeaders", "Signature"}:
            raise _incomplete("Authorization header has unknown parameters")
        scope = parts["Credential"].split("/")
        # §4.1: Credential=<AKID>/<yyyymmdd>/<region>/kms/aws4_request
        if len(scope) != 5 or scope[4] != "aws4_request" or not all(scope):
            raise _incomplete("Credential must have the form <AccessKeyId>/<yyyymmdd>/<region>/<service>/aws4_request")
        akid, date, region, service, _ = scope
        if not _DATE_RE.fullmatch(date):
            raise _incomplete("Credential date must be yyyymmdd")
        signed = tuple(parts["SignedHeaders"].split(";"))
        if not all(_HEADER_NAME_RE.fullmatch(h) for h in signed):
            raise _incomplete("SignedHeaders must be lower-case header names separated by ';'")
        if list(signed) != sorted(set(signed)):
            raise _incomplete("SignedHeaders must be sorted and without repeats")
        if not _SIGNATURE_RE.fullmatch(parts["Signature"]):
            raise _incomplete("Signature must be 64 lower-case hexadecimal digits")
        return cls(access_key_id=akid, date=date, region=region, service=service, signed_headers=signed,
                   signature=parts["Signature"])


class _ServerSigV4Auth(SigV4Auth):  # type: ignore[misc]
    """botocore's signer, told to sign exactly the headers the client listed (no blacklist, no added host)."""

    def __init__(self, credentials: Credentials, region: str, signed: tuple[str, ...]) -> None:
        super().__init__(credentials, SERVICE, region)
        self._signed = signed

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        header_map = HTTPHeaders()
        for name in self._signed:
            for value in request.headers.get_all(name) or ():
                header_map[name] = value
        return header_map


@dataclass
class _SigningRequest:
    """What botocore's signer reads from a request (method, url, headers, body, params, context).

    :class:`botocore.awsrequest.AWSRequest` would do, but building and preparing one per request costs more than
    the rest of the check; the signer only reads these attributes, and the body is always bytes here.
    """

    method: str
    url: str
    body: bytes
    headers: HTTPHeaders = field(default_factory=HTTPHeaders)
    params: dict[str, str] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)


class _SigningKeys:
    """Derived SigV4 signing keys by (secret, date, region, service), as the AWS SDKs cache them (bounded LRU).

    kDate = HMAC("AWS4" + secret, date), then region, service and "aws4_request": four HMACs that only change
    once a day per credential.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._keys: OrderedDict[tuple[str, str, str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, secret: str, date: str, region: str, service: str) -> bytes:
        index = (secret, date, region, service)
        with self._lock:
            hit = self._keys.get(index)
            if hit is not None:
                self._keys.move_to_end(index)
                return hit
        key = f"AWS4{secret}".encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        with self._lock:
            self._keys[index] = key
            if len(self._keys) > self.max_entries:
                self._keys.popitem(last=False)
        return key


_SIGNING_KEYS = _SigningKeys()


def _parse_amz_date(value: str) -> datetime:
    """``yyyymmddThhmmssZ`` as UTC; the common exact form without strptime (same result, ValueError alike)."""
    if _AMZ_DATE_RE.fullmatch(value):
        return datetime(int(value[0:4]), int(value[4:6]), int(value[6:8]), int(value[9:11]), int(value[11:13]),
                        int(value[13:15]), tzinfo=UTC)
    return datetime.strptime(value, _AMZ_DATE).replace(tzinfo=UTC)


def _header_values(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)
    return values


def verify_request(
    *,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    lookup: PrincipalLookup,
    now: datetime,
    region: str,
    max_skew: timedelta = MAX_SKEW,
    require_signed_target: bool = False,
) -> Principal:
    """Authenticate one request; returns the caller or raises :class:`KMSError` (see the module doc).

    ``require_signed_target``: ``x-amz-target`` must be among the signed headers (beyond AWS, which does not
    require it), so that a captured request cannot be replayed as another operation.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    values = _header_values(headers)
    auth_values = values.get("authorization")
    # §4.7 step 1: no Authorization header at all
    if not auth_values:
        raise KMSError("MissingAuthenticationToken", "Missing Authentication Token", status=403)
    if len(auth_values) != 1:
        raise _incomplete("more than one Authorization header")
    auth = AuthorizationHeader.parse(auth_values[0])
    # step 2: host and x-amz-date must be signed, and every signed header must be present
    required_signed = ("host", "x-amz-date", "x-amz-target") if require_signed_target else ("host", "x-amz-date")
    for required in required_signed:
        if required not in auth.signed_headers:
            raise _incomplete(f"SignedHeaders must include '{required}'")
    for name in auth.signed_headers:
        if name not in values:
            raise _incomplete(f"the signed header '{name}' is missing from the request")
    amz_date_values = values["x-amz-date"]
    if len(amz_date_values) != 1:
        raise _incomplete("more than one X-Amz-Date header")
    amz_date = amz_date_values[0].strip()
    try:
        when = _parse_amz_date(amz_date)
    except ValueError:
        raise _incomplete("X-Amz-Date must have the form yyyymmddThhmmssZ") from None
    # step 3: the credential scope names this day, this region, and KMS
    if auth.date != amz_date[:8]:
        raise _invalid(f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
                       f"'{auth.date}' != '{amz_date[:8]}', from '{amz_date}'.")
    if auth.service != SERVICE:
        raise _invalid(f"Credential should be scoped to correct service: '{SERVICE}'.")
    if auth.region != region:
        raise _invalid(f"Credential should be scoped to a valid region, not '{auth.region[:64]}'.")
    # step 4: clock skew (AWS's own message shape)
    minutes = int(max_skew.total_seconds() // 60)
    if when < now - max_skew:
        raise _invalid(f"Signature expired: {amz_date} is now earlier than "
                       f"{(now - max_skew).strftime(_AMZ_DATE)} ({now.strftime(_AMZ_DATE)} - {minutes} min.)")
    if when > now + max_skew:
        raise _invalid(f"Signature not yet current: {amz_date} is still later than "
                       f"{(now + max_skew).strftime(_AMZ_DATE)} ({now.strftime(_AMZ_DATE)} + {minutes} min.)")
    # step 5: the access key
    if not _KEY_ID_RE.fullmatch(auth.access_key_id):
        raise KMSError("UnrecognizedClientException", "The security token included in the request is invalid.",
                       status=400)
    found = lookup(auth.access_key_id)
    if found is None:
        raise KMSError("UnrecognizedClientException", "The security token included in the request is invalid.",
                       status=400)
    principal, secret = found
    # step 6: a declared body hash must be the body's hash (else the signature would cover a claimed hash only)
    declared = values.get("x-amz-content-sha256")
    if declared is not None and (len(declared) != 1 or declared[0].strip() != hashlib.sha256(body).hexdigest()):
        raise _invalid("The provided 'x-amz-content-sha256' header does not match what was computed.")
    expected = _signature(method=method, path=path, values=values, body=body, auth=auth, secret=secret,
                          amz_date=amz_date)
    if not hmac.compare_digest(expected, auth.signature):
        raise _invalid("The request signature we calculated does not match the signature you provided. Check your "
                       "AWS Secret Access Key and signing method. Consult the service documentation for details.")
    return principal


def _signature(*, method: str, path: str, values: dict[str, list[str]], body: bytes, auth: AuthorizationHeader,
               secret: str, amz_date: str) -> str:
    host = values["host"][0].strip()
    if not path.startswith("/"):
        raise _incomplete("the request path must start with '/'")
    # http:// so botocore always hashes the payload (it may skip that for https)
    request = _SigningRequest(method=method.upper(), url=f"http://{host}{path}", body=body)
    for name in auth.signed_headers:
        for value in values[name]:
            request.headers[name] = value  # HTTPHeaders appends: repeated headers keep every value
    request.context["timestamp"] = amz_date
    signer = _ServerSigV4Auth(Credentials(auth.access_key_id, secret), auth.region, auth.signed_headers)
    canonical = signer.canonical_request(request)
    string_to_sign: str = signer.string_to_sign(request, canonical)
    # the last step of botocore's signer.signature(), with the derived key cached (same bytes, same result)
    key = _SIGNING_KEYS.get(secret, amz_date[:8], auth.region, SERVICE)
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_request_headers(*, url: str, body: bytes, headers: dict[str, str], access_key_id: str, secret: str,
                         region: str, now: datetime) -> dict[str, str]:
    """Client side, for tests and tools: sign a POST with botocore at ``now``; returns the headers to send."""
    request = AWSRequest(method="POST", url=url, data=body, headers=dict(headers))
    signer = SigV4Auth(Credentials(access_key_id, secret), SERVICE, region)
    stamp = now.astimezone(UTC).strftime(_AMZ_DATE)
    request.context["timestamp"] = stamp
    request.headers["X-Amz-Date"] = stamp
    canonical = signer.canonical_request(request)
    string_to_sign = signer.string_to_sign(request, canonical)
    signature = signer.signature(string_to_sign, request)
    signer._inject_signature_to_request(request, signature)
    return {k: str(v) for k, v in request.headers.items()}
