"""KMS for enclave applications: attest, call KMS with ``Recipient``, open the answer inside the enclave.

What kmstool_enclave_cli does on every call (spec nsm-attestation-kms §5.1), in Python:

1. generate a fresh RSA-2048 key pair (e = 65537, §5.4);
2. ask the NSM for an attestation document whose ``public_key`` is the key's DER SubjectPublicKeyInfo (no
   ``user_data``, no ``nonce``);
3. send the request with ``Recipient = {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument"}``
   (§4.2), signed with SigV4 by botocore's own signer, over a stream to vsock-proxy on the parent
   (CID 3, ``proxy_port``, §5.3), which forwards the bytes to the KMS endpoint;
4. open ``CiphertextForRecipient`` (a CMS EnvelopedData, §4.4) with the private key, which never leaves the
   process.

The plaintext therefore never crosses the proxy or the parent.  The transport is plain HTTP/1.1 (one request per
connection, ``Connection: close``) or, for an ``https://`` endpoint, TLS end to end between the enclave and KMS
(§5.3: the proxy forwards raw bytes).  ``endpoint`` is the host name in the ``Host`` header and the signature
(default ``kms.<region>.amazonaws.com``); a bare host name means HTTPS, as on AWS; ``http://HOST`` selects plain
HTTP, for a local KMS reached through vsock-proxy on the same machine.

Errors: KMS's answers raise :class:`~enclavekit.kms.types.KMSError` with the AWS exception name (``aws_code``) and
HTTP status; an unreachable proxy or a response that is not HTTP/JSON raises
:class:`~enclavekit.errors.TransportError`; an envelope that does not open raises
:class:`~enclavekit.formats.cms.CMSFormatError`; NSM failures raise :class:`~enclavekit.errors.NSMError`.

Example (inside an enclave)::

    client = KMSClient("us-east-1", credentials=AWSCredentials(akid, secret, token))
    plaintext = client.decrypt(ciphertext_blob)
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavekit.errors import TransportError
from enclavekit.formats.cms import open_envelope
from enclavekit.kms.types import KMSError
from enclavekit.sdk import vsock
from enclavekit.sdk.nsm import NSMClient

__all__ = [
    "AWSCredentials",
    "DataKey",
    "KMSClient",
    "Connector",
    "default_endpoint",
    "generate_recipient_key",
    "DEFAULT_PROXY_PORT",
    "DEFAULT_REGION",
    "KEY_SPECS",
    "ENCRYPTION_ALGORITHMS",
    "MAX_RESPONSE_SIZE",
]

DEFAULT_REGION = "us-east-1"
DEFAULT_PROXY_PORT = 8000          # §5.1: kmstool_enclave_cli's --proxy-port default
KEY_SPECS = ("AES_256", "AES_128")  # §4.2 GenerateDataKey KeySpec
ENCRYPTION_ALGORITHMS = ("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256")  # §5.1 decrypt
MAX_RESPONSE_SIZE = 1024 * 1024    # a KMS answer is a few KiB (blobs ≤ 6144 bytes); refuse anything absurd
_USER_AGENT = "enclavekit-sdk-kms"
_TARGET_PREFIX = "TrentService"     # §4.1
_CONTENT_TYPE = "application/x-amz-json-1.1"
_AMZ_DATE = "%Y%m%dT%H%M%SZ"

Connector = Callable[[float], socket.socket]
"""Opens a connected stream to the KMS (through vsock-proxy by default); the argument is the timeout."""


@dataclass(frozen=True)
class AWSCredentials:
    """The credentials SigV4 signs with; ``session_token`` for temporary (STS) credentials."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __post_init__(self) -> None:
        if not self.access_key_id or not self.secret_access_key:
            raise ValueError("access_key_id and secret_access_key must not be empty")

    def __repr__(self) -> str:  # never print the secret
        return f"AWSCredentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"


@dataclass(frozen=True)
class _BotocoreCredentials:
    """The attribute names botocore's signer reads (``access_key``, ``secret_key``, ``token``)."""

    access_key: str
    secret_key: str
    token: str | None


@dataclass(frozen=True)
class DataKey:
    """GenerateDataKey's result: the data key in plaintext (opened in the enclave) and under the KMS key."""

    plaintext: bytes
    ciphertext_blob: bytes
    key_id: str

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r}, ciphertext_blob=<{len(self.ciphertext_blob)} bytes>)"


def default_endpoint(region: str) -> str:
    """§4.1: ``kms.<region>.amazonaws.com``; the DNS suffix is ``amazonaws.com.cn`` for ``cn-*`` regions."""
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"kms.{region}.{suffix}"


def generate_recipient_key() -> rsa.RSAPrivateKey:
    """§5.4: RSA-2048 with e = 65537, fresh for every request."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, member: str) -> bytes:
    if not isinstance(value, str):
        raise TransportError(f"the KMS response member {member} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TransportError(f"the KMS response member {member} is not valid base64") from exc


def _aws_error(status: int, body: bytes) -> KMSError:
    """§4.1: ``{"__type", "message"|"Message"}``; strip a ``namespace#`` prefix and a ``:suffix`` as botocore does."""
    code, message = "", ""
    try:
        document = json.loads(body.decode("utf-8")) if body else {}
    except (UnicodeDecodeError, ValueError):
        document = {}
    if isinstance(document, dict):
        raw = document.get("__type")
        if isinstance(raw, str):
            code = raw.rsplit("#", 1)[-1].split(":", 1)[0]
        text = document.get("message", document.get("Message"))
        if isinstance(text, str):
            message = text
    if not code:
        code = "KMSInternalException" if status >= 500 else "UnknownError"
    return KMSError(code[:128], message[:2048] or f"HTTP {status}", status=status)


class KMSClient:
    """A KMS client for code running inside an enclave (see the module docstring).

    ``credentials`` sign every request.  ``proxy_cid``/``proxy_port`` locate vsock-proxy (CID 3, port 8000 by
    default, as kmstool).  Injectable for tests and other set-ups: ``connect`` (open the stream some other way),
    ``nsm`` (an NSM client; default :meth:`NSMClient.open` per call), ``key_factory`` (the per-call RSA key),
    ``clock`` (the SigV4 time).  ``ca_bundle`` is the PEM file of CAs trusted for an ``https://`` endpoint
    (default: the system's, which an enclave image usually lacks).
    """

    def __init__(self, region: str = DEFAULT_REGION, *, credentials: AWSCredentials, endpoint: str | None = None,
                 proxy_port: int = DEFAULT_PROXY_PORT, proxy_cid: int = vsock.VMADDR_CID_PARENT,
                 ca_bundle: str | None = None, timeout: float = 30.0, connect: Connector | None = None,
                 nsm: NSMClient | None = None, key_factory: Callable[[], rsa.RSAPrivateKey] = generate_recipient_key,
                 clock: Callable[[], datetime] | None = None) -> None:
        if not region or "/" in region or any(c.isspace() for c in region):
            raise ValueError(f"invalid region {region!r}")
        if not isinstance(credentials, AWSCredentials):
            raise TypeError("credentials must be an AWSCredentials")
        self.region = region
        self._credentials = credentials
        text = endpoint or default_endpoint(region)
        parts = urlsplit(text if "://" in text else f"https://{text}")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.fragment or parts.username:
            raise ValueError(f"endpoint must be a host name or http(s)://HOST[:PORT], got {text!r}")
        self.scheme = parts.scheme
        self.host = parts.netloc      # Host header and signature (with a port if one was given)
        self._server_hostname = parts.hostname
        self.proxy_cid = proxy_cid
        self.proxy_port = proxy_port
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._connect = connect
        self._nsm = nsm
        self._key_factory = key_factory
        self._clock = clock or (lambda: datetime.now(UTC))
        self.last_attestation_document: bytes | None = None

    # ---------------------------------------------------------------------------------------- operations

    def decrypt(self, ciphertext: bytes, encryption_context: Mapping[str, str] | None = None,
                key_id: str | None = None, encryption_algorithm: str | None = None) -> bytes:
        """Decrypt ``ciphertext`` (a CiphertextBlob) with Recipient; the plaintext is opened here."""
        if not isinstance(ciphertext, (bytes, bytearray)) or not 1 <= len(ciphertext) <= 6144:
            raise ValueError("ciphertext must be 1..6144 bytes (§4.2 CiphertextBlob)")
        if encryption_algorithm is not None and encryption_algorithm not in ENCRYPTION_ALGORITHMS:
            raise ValueError(f"encryption_algorithm must be one of {', '.join(ENCRYPTION_ALGORITHMS)}")
        params: dict[str, Any] = {"CiphertextBlob": _b64(bytes(ciphertext))}
        if encryption_context:
            params["EncryptionContext"] = dict(encryption_context)
        if key_id is not None:
            params["KeyId"] = key_id
        if encryption_algorithm is not None:
            params["EncryptionAlgorithm"] = encryption_algorithm
        response, plaintext = self._call_with_recipient("Decrypt", params)
        # §5.4: sdk-c requires KeyId in a Decrypt response
        if not isinstance(response.get("KeyId"), str):
            raise TransportError("the KMS Decrypt response has no KeyId")
        return plaintext

    def generate_data_key(self, key_id: str, key_spec: str = "AES_256",
                          encryption_context: Mapping[str, str] | None = None) -> DataKey:
        """A new data key: plaintext opened in the enclave, and its CiphertextBlob under ``key_id``."""
        if key_spec not in KEY_SPECS:
            raise ValueError(f"key_spec must be one of {', '.join(KEY_SPECS)}, got {key_spec!r}")
        params: dict[str, Any] = {"KeyId": key_id, "KeySpec": key_spec}
        if encryption_context:
            params["EncryptionContext"] = dict(encryption_context)
        response, plaintext = self._call_with_recipient("GenerateDataKey", params)
        # §5.4: sdk-c requires KeyId and CiphertextBlob in a GenerateDataKey response
        key_arn = response.get("KeyId")
        if not isinstance(key_arn, str):
            raise TransportError("the KMS GenerateDataKey response has no KeyId")
        blob = _unb64(response.get("CiphertextBlob"), "CiphertextBlob")
        return DataKey(plaintext=plaintext, ciphertext_blob=blob, key_id=key_arn)

    def generate_random(self, number_of_bytes: int) -> bytes:
        """``number_of_bytes`` (1..1024) random bytes from KMS, delivered to the enclave's key only."""
        if isinstance(number_of_bytes, bool) or not isinstance(number_of_bytes, int) \
                or not 1 <= number_of_bytes <= 1024:
            raise ValueError("number_of_bytes must be an integer in 1..1024 (§4.2 GenerateRandom)")
        _, plaintext = self._call_with_recipient("GenerateRandom", {"NumberOfBytes": number_of_bytes})
        return plaintext

    # ----------------------------------------------------------------------------------------- internals

    def _attest(self, public_key_der: bytes) -> bytes:
        """§5.1 step 2: a document binding ``public_key``; no user_data, no nonce."""
        if self._nsm is not None:
            return self._nsm.attestation(public_key=public_key_der)
        with NSMClient.open() as nsm:
            return nsm.attestation(public_key=public_key_der)

    def _call_with_recipient(self, operation: str, params: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        # §5.1 steps 1-4
        private_key = self._key_factory()
        spki = private_key.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        document = self._attest(spki)
        self.last_attestation_document = document
        # §4.2: sdk-c serialises KeyEncryptionAlgorithm first
        params = {**params, "Recipient": {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                                          "AttestationDocument": _b64(document)}}
        response = self.call(operation, params)
        if response.get("Plaintext"):
            # §4.2: with Recipient the plaintext must be null or empty; a KMS that sends it broke the contract
            raise TransportError(f"the KMS answered {operation} with a Plaintext despite Recipient")
        envelope = _unb64(response.get("CiphertextForRecipient"), "CiphertextForRecipient")
        return response, open_envelope(envelope, private_key)

    def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """One signed JSON 1.1 request (§4.1); returns the parsed response or raises KMSError."""
        if not operation.isalnum():
            raise ValueError(f"invalid operation name {operation!r}")
        body = json.dumps(params, separators=(",", ":")).encode("utf-8")
        headers = self._signed_headers(operation, body)
        status, payload = self._exchange(headers, body)
        if status != 200:  # §5.4: any non-200 status is a failure
            raise _aws_error(status, payload)
        try:
            document = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise TransportError(f"the KMS answered {operation} with a body that is not JSON") from exc
        if not isinstance(document, dict):
            raise TransportError(f"the KMS answered {operation} with JSON that is not an object")
        return document

    def _signed_headers(self, operation: str, body: bytes) -> list[tuple[str, str]]:
        """§4.1 headers, signed by botocore's SigV4Auth at ``clock()``; Host is the endpoint's host name."""
        request = AWSRequest(method="POST", url=f"{self.scheme}://{self.host}/", data=body, headers={
            "Host": self.host,
            "Content-Type": _CONTENT_TYPE,
            "X-Amz-Target": f"{_TARGET_PREFIX}.{operation}",
        })
        stamp = self._clock().astimezone(UTC).strftime(_AMZ_DATE)
        request.context["timestamp"] = stamp
        request.headers["X-Amz-Date"] = stamp
        creds = self._credentials
        signer = SigV4Auth(_BotocoreCredentials(creds.access_key_id, creds.secret_access_key, creds.session_token),
                           "kms", self.region)
        if creds.session_token:
            request.headers["X-Amz-Security-Token"] = creds.session_token
        canonical = signer.canonical_request(request)
        signature = signer.signature(signer.string_to_sign(request, canonical), request)
        signer._inject_signature_to_request(request, signature)
        out = [(str(k), str(v)) for k, v in request.headers.items()]
        # not signed (§4.1: sdk-c does not sign its user-agent either)
        out += [("Content-Length", str(len(body))), ("User-Agent", _USER_AGENT), ("Connection", "close")]
        return out

    def _open_stream(self) -> socket.socket:
        if self._connect is not None:
            sock = self._connect(self._timeout)
        else:
            # §5.3: vsock-proxy on the parent forwards the stream to the KMS endpoint
            sock = vsock.connect(self.proxy_cid, self.proxy_port, self._timeout).socket
        sock.settimeout(self._timeout)
        if self.scheme == "https":
            context = ssl.create_default_context(cafile=self._ca_bundle)
            try:
                sock = context.wrap_socket(sock, server_hostname=self._server_hostname)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise TransportError(f"TLS with {self._server_hostname} failed: {exc}") from exc
        return sock

    def _exchange(self, headers: list[tuple[str, str]], body: bytes) -> tuple[int, bytes]:
        head = "POST / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        sock = self._open_stream()
        try:
            sock.sendall(head.encode("latin-1") + body)
            response = http.client.HTTPResponse(sock, method="POST")
            response.begin()
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_RESPONSE_SIZE:
                raise TransportError(f"the KMS response of {declared} bytes exceeds {MAX_RESPONSE_SIZE}")
            payload = response.read(MAX_RESPONSE_SIZE + 1)
            if len(payload) > MAX_RESPONSE_SIZE:
                raise TransportError(f"the KMS response exceeds {MAX_RESPONSE_SIZE} bytes")
            return response.status, payload
        except TimeoutError as exc:
            raise TransportError(f"the KMS did not answer within {self._timeout} s") from exc
        except (http.client.HTTPException, OSError) as exc:
            raise TransportError(f"the KMS connection failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sock.close()
