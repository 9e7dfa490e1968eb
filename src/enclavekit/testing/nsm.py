"""Fakes for code that talks to an NSM: a deterministic :class:`FakeNSM` and a throwaway document signer.

``FakeNSM`` is a real :class:`~enclavekit.nsm.module.EmulatedNSM` whose randomness, clock and signer are
deterministic, so tests get reproducible PCRs, module ids, timestamps and random bytes.  Its documents are signed
by :class:`ThrowawayDocumentSigner`: a P-384 key derived from a seed and a self-signed certificate.  The document
has AWS's shape (spec nsm-attestation-kms §3.1-§3.2) but chains to nothing anyone trusts: it is for tests only.

Nothing here is secure: the "random" bytes are a hash of a seed and a counter.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavekit._internal.ecdsa import sign_cose
from enclavekit.formats import cbor
from enclavekit.nsm.module import EmulatedNSM
from enclavekit.sdk.nsm import NSMClient

__all__ = [
    "SeededRandom", "SteppingClock", "IssuedDocument", "ThrowawayDocumentSigner", "FakeNSM", "InProcessTransport",
]

# P-384 group order: derived private scalars are reduced into [1, n-1]
_P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973


class SeededRandom:
    """``random_source`` for tests: SHAKE-256 of ``seed || counter``.  Reproducible, NOT random."""

    def __init__(self, seed: bytes = b"enclavekit-fake-nsm") -> None:
        self._seed = bytes(seed)
        self._counter = 0
        self._lock = threading.Lock()

    def __call__(self, size: int) -> bytes:
        with self._lock:
            self._counter += 1
            counter = self._counter
        return hashlib.shake_256(self._seed + counter.to_bytes(8, "big")).digest(size)


class SteppingClock:
    """``clock_ms`` for tests: returns ``start_ms``, then advances by ``step_ms`` on every call."""

    def __init__(self, start_ms: int = 1_700_000_000_000, step_ms: int = 1) -> None:
        self._now = start_ms
        self._step = step_ms
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            now = self._now
            self._now += self._step
            return now


@dataclass(frozen=True)
class IssuedDocument:
    """What the NSM asked :class:`ThrowawayDocumentSigner` to sign, and the document it got back."""

    module_id: str
    timestamp_ms: int
    pcrs: dict[int, bytes]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    document: bytes = field(repr=False)


class ThrowawayDocumentSigner:
    """A :class:`~enclavekit.nsm.module.DocumentSigner` with a seed-derived P-384 key and a self-signed
    certificate.  The payload follows AWS's 9 keys in AWS's order (§3.2) in an indefinite-length map; ``cabundle``
    holds the self-signed certificate.  Every call is recorded in :attr:`issued`.
    """

    def __init__(self, seed: bytes = b"enclavekit-fake-nsm") -> None:
        scalar = int.from_bytes(hashlib.sha512(b"signer" + seed).digest(), "big") % (_P384_ORDER - 1) + 1
        self.key = ec.derive_private_key(scalar, ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclavekit throwaway test signer")])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
            .not_valid_after(datetime.datetime(2099, 12, 31, tzinfo=datetime.UTC))
            .sign(self.key, hashes.SHA384())
        )
        self.certificate_der = self.certificate.public_bytes(serialization.Encoding.DER)
        self.issued: list[IssuedDocument] = []
        self._lock = threading.Lock()

    def issue(self, *, module_id: str, timestamp_ms: int, pcrs: Mapping[int, bytes], public_key: bytes | None,
              user_data: bytes | None, nonce: bytes | None) -> bytes:
        payload: dict[str, Any] = cbor.IndefiniteMap()
        payload["module_id"] = module_id
        payload["digest"] = "SHA384"
        payload["timestamp"] = timestamp_ms
        payload["pcrs"] = {i: bytes(pcrs[i]) for i in sorted(pcrs)}
        payload["certificate"] = self.certificate_der
        payload["cabundle"] = [self.certificate_der]
        payload["public_key"] = public_key
        payload["user_data"] = user_data
        payload["nonce"] = nonce
        document = sign_cose(self.key, cbor.encode(payload)).to_bytes()
        with self._lock:
            self.issued.append(IssuedDocument(module_id, timestamp_ms, dict(pcrs), public_key, user_data, nonce,
                                              document))
        return document


class FakeNSM(EmulatedNSM):
    """An :class:`EmulatedNSM` with deterministic randomness, clock and signer (see the module docstring).

    Defaults: parent instance ``i-1234567890abcdef0`` (the AWS documentation's example), no IAM role, no image
    measurements (PCR0/1/2 zero), clock starting at 2023-11-14T22:13:20Z and advancing 1 ms per reading.
    """

    def __init__(
        self,
        *,
        seed: bytes = b"enclavekit-fake-nsm",
        measurements: Mapping[int | str, bytes | str] | None = None,
        parent_role_arn: str | None = None,
        parent_instance_id: str | None = "i-1234567890abcdef0",
        debug_mode: bool = False,
        module_id: str | None = None,
        start_ms: int = 1_700_000_000_000,
        signer: ThrowawayDocumentSigner | None = None,
    ) -> None:
        self.signer = signer or ThrowawayDocumentSigner(seed)
        self.random_source = SeededRandom(seed)
        self.clock = SteppingClock(start_ms)
        super().__init__(
            signer=self.signer,
            random_source=self.random_source,
            clock_ms=self.clock,
            module_id=module_id,
            measurements=measurements,
            parent_role_arn=parent_role_arn,
            parent_instance_id=parent_instance_id,
            debug_mode=debug_mode,
        )

    def client(self) -> NSMClient:
        """An :class:`~enclavekit.sdk.nsm.NSMClient` talking to this NSM in-process."""
        return NSMClient(InProcessTransport(self))


class InProcessTransport:
    """An NSM transport that hands the request bytes straight to an in-process NSM (no socket, no device)."""

    def __init__(self, nsm: EmulatedNSM) -> None:
        self._nsm = nsm

    def exchange(self, request: bytes) -> bytes:
        return self._nsm.handle(request)

    def close(self) -> None:
        pass
