"""Verify attestation documents: envelope, pinned root, certificate chain, signature, then policy (spec §3.6, §3.7).

``verify(document, trust_roots, at_time, policy)`` returns a :class:`VerifiedAttestation` or raises:

* :class:`~enclavekit.errors.AttestationFormatError` (E70) when the bytes are not a well-formed document
  (``rule`` names the field rule, e.g. ``pcrs``, ``nitrotpm-document``, ``certificate-der``);
* :class:`~enclavekit.errors.VerificationError` (E71) when it is well formed but not trustworthy, with ``rule``
  one of ``cose-algorithm``, ``cose-unprotected``, ``cose-signature-length``, ``trust-root``, ``chain-order``,
  ``certificate-algorithm``, ``chain-signature``, ``basic-constraints``, ``path-length``, ``key-usage``,
  ``critical-extension``, ``certificate-validity``, ``cose-signature``;
* :class:`~enclavekit.errors.AttestationPolicyError` (E72) when it is authentic but breaks ``policy``.

Nothing is trusted implicitly.  ``cabundle[0]`` must be byte-equal to one of ``trust_roots`` (being in the bundle
proves nothing); the AWS Nitro Enclaves Root-G1 is built in as :data:`AWS_ROOT_G1` but is only used when passed.
The time is an input: real documents' leaves live 3 hours, so archived documents are verified "as of" their
own timestamp.  The signature is checked over the received ``protected`` and ``payload`` bytes, never a
re-encoding (spec 3.3), so both payload map encodings (``a9`` and ``bf … ff``) verify.

Speed: parsing a certificate and checking one link's signature depend only on exact bytes, so
:class:`ChainCache` remembers them keyed by the exact DER (a link by the exact DER of issuer and subject).  Only
facts that follow from the bytes alone are cached; the pinned root, validity at ``at_time``, the profile checks
and the document signature are evaluated on every call, so the cache can never make an invalid chain pass.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from enclavekit._internal.ecdsa import verify_raw
from enclavekit.attestation.policy import DEFAULT_POLICY, AttestationPolicy
from enclavekit.errors import AttestationFormatError, VerificationError
from enclavekit.formats.attestation_doc import (
    PROTECTED_ES384,
    AttestationDocument,
    parse_document,
    split_certificate,
)

__all__ = [
    "TrustRoot",
    "AWS_ROOT_G1",
    "AWS_ROOT_G1_SHA256",
    "VerifiedAttestation",
    "ChainCache",
    "DEFAULT_CACHE",
    "verify",
]

AWS_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
_ES384 = -35
_KNOWN_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})


def _fail(rule: str, message: str) -> VerificationError:
    return VerificationError(message, rule=rule, details={"rule": rule})


# --------------------------------------------------------------------------------------------- trust roots


@dataclass(frozen=True)
class TrustRoot:
    """A pinned root certificate: documents chain to it only if ``cabundle[0]`` is byte-equal to ``der``."""

    der: bytes
    name: str = field(default="", compare=False)
    certificate: x509.Certificate | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.certificate is None:
            try:
                cert = x509.load_der_x509_certificate(self.der)
            except ValueError as exc:
                raise ValueError("trust root is not a DER X.509 certificate") from exc
            object.__setattr__(self, "certificate", cert)
        if not self.name:
            object.__setattr__(self, "name", self.fingerprint[:16])

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER, lowercase hex."""
        return hashlib.sha256(self.der).hexdigest()

    @classmethod
    def from_certificate(cls, cert: x509.Certificate, name: str = "") -> TrustRoot:
        return cls(cert.public_bytes(serialization.Encoding.DER), name, cert)

    @classmethod
    def from_pem(cls, data: bytes, name: str = "") -> TrustRoot:
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise ValueError("trust root is not a PEM X.509 certificate") from exc
        return cls.from_certificate(cert, name)


def _load_aws_root() -> TrustRoot:
    pem = resources.files("enclavekit.attestation").joinpath("roots/aws-nitro-enclaves-root-g1.pem").read_bytes()
    root = TrustRoot.from_pem(pem, "AWS Nitro Enclaves Root-G1")
    if root.fingerprint != AWS_ROOT_G1_SHA256:  # spec 3.4: the pin is the DER SHA-256
        raise RuntimeError("the packaged AWS Nitro Enclaves root certificate is damaged")
    return root


AWS_ROOT_G1 = _load_aws_root()


# --------------------------------------------------------------------------------------------- chain cache


@dataclass(frozen=True)
class _CertFacts:
    """Everything the checks need from one certificate; a pure function of its DER bytes."""

    subject: bytes
    issuer: bytes
    not_before: datetime
    not_after: datetime
    signature_oid: x509.ObjectIdentifier
    tbs: bytes
    signature: bytes
    public_key: ec.EllipticCurvePublicKey | None  # None unless an EC key on P-384
    ca: bool | None  # None: no BasicConstraints
    path_length: int | None
    key_usage: frozenset[str] | None  # None: no KeyUsage
    unknown_critical: tuple[str, ...]


_USAGES = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
           "key_cert_sign", "crl_sign")


def _facts(der: bytes) -> _CertFacts:
    try:
        return _parse_facts(der)
    except (ValueError, TypeError, x509.InvalidVersion, x509.DuplicateExtension, UnsupportedAlgorithm) as exc:
        raise AttestationFormatError(f"a certificate of the document does not parse ({type(exc).__name__}: "
                                     f"{str(exc)[:80]})", rule="certificate-der") from exc


def _parse_facts(der: bytes) -> _CertFacts:
    # Names are compared as the exact DER bytes of the certificate (split_certificate), never through
    # cryptography's Name objects: building those warns on malformed attributes (e.g. a 7-letter country), and
    # silencing warnings is process-wide state that concurrent verifications must not touch.
    parts = split_certificate(der)
    if not parts.serial_is_positive:  # RFC 5280 4.1.2.2 (cryptography would only warn)
        raise ValueError("the serial number is not positive")
    cert = x509.load_der_x509_certificate(der)
    exts = cert.extensions
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
        ca: bool | None = bc.ca
        path_length = bc.path_length
    except x509.ExtensionNotFound:
        ca, path_length = None, None
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
        usage: frozenset[str] | None = frozenset(u for u in _USAGES if getattr(ku, u))
    except x509.ExtensionNotFound:
        usage = None
    unknown = tuple(e.oid.dotted_string for e in exts if e.critical and e.oid not in _KNOWN_CRITICAL)
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        key = None
    ec_key = key if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1" else None
    return _CertFacts(
        subject=parts.subject, issuer=parts.issuer,
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        signature_oid=cert.signature_algorithm_oid, tbs=cert.tbs_certificate_bytes,
        signature=cert.signature, public_key=ec_key, ca=ca, path_length=path_length, key_usage=usage,
        unknown_critical=unknown)


class ChainCache:
    """Parsed certificates and verified link signatures, keyed by exact DER bytes (bounded, LRU, thread-safe)."""

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self._facts: OrderedDict[bytes, _CertFacts] = OrderedDict()
        self._links: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        self._lock = threading.Lock()

    def facts(self, der: bytes) -> _CertFacts:
        with self._lock:
            hit = self._facts.get(der)
            if hit is not None:
                self._facts.move_to_end(der)
                return hit
        facts = _facts(der)
        with self._lock:
            self._facts[der] = facts
            if len(self._facts) > self.max_entries:
                self._facts.popitem(last=False)
        return facts

    def link_verified(self, issuer_der: bytes, subject_der: bytes) -> bool:
        with self._lock:
            key = (issuer_der, subject_der)
            if key in self._links:
                self._links.move_to_end(key)
                return True
            return False

    def remember_link(self, issuer_der: bytes, subject_der: bytes) -> None:
        with self._lock:
            self._links[(issuer_der, subject_der)] = None
            if len(self._links) > self.max_entries:
                self._links.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._facts.clear()
            self._links.clear()


DEFAULT_CACHE = ChainCache()


class _NoCache(ChainCache):
    def facts(self, der: bytes) -> _CertFacts:
        return _facts(der)

    def link_verified(self, issuer_der: bytes, subject_der: bytes) -> bool:
        return False

    def remember_link(self, issuer_der: bytes, subject_der: bytes) -> None:
        return None


# --------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class VerifiedAttestation:
    """A document whose signature, chain and policy checks all passed."""

    module_id: str
    timestamp: datetime
    timestamp_ms: int
    digest: str
    pcrs: Mapping[int, bytes]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    certificate: bytes
    cabundle: tuple[bytes, ...]
    debug_mode: bool
    trust_root: str  # SHA-256 of the root the chain ends in
    document: AttestationDocument = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly: pcrs as lowercase hex by index, byte fields as hex or null."""
        def hx(b: bytes | None) -> str | None:
            return None if b is None else b.hex()

        return {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp": self.timestamp_ms,
            "timestamp_iso": self.timestamp.isoformat().replace("+00:00", "Z"),
            "debug_mode": self.debug_mode,
            "pcrs": {str(i): v.hex() for i, v in self.pcrs.items()},
            "public_key": hx(self.public_key),
            "user_data": hx(self.user_data),
            "nonce": hx(self.nonce),
            "trust_root_sha256": self.trust_root,
        }


# --------------------------------------------------------------------------------------------- verify


def _check_link(issuer: _CertFacts, subject: _CertFacts, position: str) -> None:
    if subject.issuer != issuer.subject:
        raise _fail("chain-order", f"the {position} certificate was not issued by the certificate above it "
                    "(issuer name mismatch: cabundle must be root first, then regional, zonal, instance)")
    if subject.signature_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
        raise _fail("certificate-algorithm", f"the {position} certificate is not signed ecdsa-with-SHA384")
    if issuer.public_key is None:
        raise _fail("certificate-algorithm", f"the issuer of the {position} certificate has no P-384 key")
    try:
        issuer.public_key.verify(subject.signature, subject.tbs, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise _fail("chain-signature", f"the signature on the {position} certificate is not valid") from None


def _positions(n: int) -> list[str]:
    if n == 4:
        return ["root", "regional", "zonal", "instance", "leaf"]
    return ["root", *(f"cabundle[{i}]" for i in range(1, n)), "leaf"]


def verify(
    document: bytes,
    trust_roots: Sequence[TrustRoot | x509.Certificate],
    at_time: datetime,
    policy: AttestationPolicy = DEFAULT_POLICY,
    *,
    cache: ChainCache | None = DEFAULT_CACHE,
) -> VerifiedAttestation:
    """Verify ``document`` (COSE_Sign1 bytes) against ``trust_roots`` as of ``at_time``, then ``policy``."""
    if not isinstance(at_time, datetime) or at_time.tzinfo is None:
        raise ValueError("at_time must be a timezone-aware datetime")
    roots = [r if isinstance(r, TrustRoot) else TrustRoot.from_certificate(r) for r in trust_roots]
    if not roots:
        raise ValueError("at least one trust root is required")
    store = cache if cache is not None else _NoCache()

    # 3.7 step 1-2: envelope and payload (format errors, E70)
    envelope, doc = parse_document(document)
    # 3.6 COSE: protected header exactly {1: -35}; nothing unauthenticated in the unprotected header
    if envelope.protected != PROTECTED_ES384:
        raise _fail("cose-algorithm", "the protected header is not {1: -35} (ES384)")
    if envelope.unprotected:
        raise _fail("cose-unprotected", "the unprotected header is not empty")
    if len(envelope.signature) != 96:
        raise _fail("cose-signature-length", f"the signature is {len(envelope.signature)} bytes, expected 96 "
                    "(raw r || s on P-384)")

    # 3.7 step 3: the bundle's first certificate must BE a pinned root (byte-equal), not merely claim to be one
    by_der = {r.der: r for r in roots}
    root = by_der.get(doc.cabundle[0])
    if root is None:
        raise _fail("trust-root", f"the document's root certificate (sha256 "
                    f"{hashlib.sha256(doc.cabundle[0]).hexdigest()}) is not one of the trusted roots")

    # chain = cabundle (root first) followed by the leaf: each certificate is issued by the one before it
    ders = [*doc.cabundle, doc.certificate]
    facts = [store.facts(der) for der in ders]
    names = _positions(len(doc.cabundle))
    n_ca = len(doc.cabundle)
    for i in range(1, len(ders)):
        if not store.link_verified(ders[i - 1], ders[i]):
            _check_link(facts[i - 1], facts[i], names[i])
            store.remember_link(ders[i - 1], ders[i])

    # 3.6 semantic checks per position: CA certificates
    for i in range(n_ca):
        f = facts[i]
        if f.ca is not True:
            raise _fail("basic-constraints", f"the {names[i]} certificate is not a CA")
        if f.key_usage is None or "key_cert_sign" not in f.key_usage:
            raise _fail("key-usage", f"the {names[i]} certificate may not sign certificates (no keyCertSign)")
        below = n_ca - 1 - i  # CA certificates under this one
        if f.path_length is not None and f.path_length < below:
            raise _fail("path-length", f"the {names[i]} certificate allows {f.path_length} CA certificate(s) "
                        f"below it, the chain has {below}")
        if f.unknown_critical:
            raise _fail("critical-extension", f"the {names[i]} certificate has an unknown critical extension "
                        f"{f.unknown_critical[0]}")
    # the leaf: not a CA, no pathLen, digitalSignature, a P-384 key (ES384)
    leaf = facts[-1]
    if leaf.ca is True or leaf.path_length is not None:
        raise _fail("basic-constraints", "the leaf certificate is a CA certificate")
    if leaf.key_usage is None or "digital_signature" not in leaf.key_usage:
        raise _fail("key-usage", "the leaf certificate may not sign documents (no digitalSignature)")
    if leaf.unknown_critical:
        raise _fail("critical-extension", f"the leaf certificate has an unknown critical extension "
                    f"{leaf.unknown_critical[0]}")
    if leaf.public_key is None:
        raise _fail("certificate-algorithm", "the leaf certificate's key is not an EC P-384 key")

    # every certificate, the root included, must be valid at at_time (never cached: time is an input)
    when = at_time.astimezone(UTC)
    for name, f in zip(names, facts, strict=True):
        if not f.not_before <= when <= f.not_after:
            raise _fail("certificate-validity", f"the {name} certificate is not valid at {when.isoformat()} "
                        f"(valid {f.not_before.isoformat()} .. {f.not_after.isoformat()})")

    # 3.3: signature over the received protected and payload bytes
    if not verify_raw(leaf.public_key, _ES384, envelope.sig_structure(), envelope.signature):
        raise _fail("cose-signature", "the document's signature does not verify with the leaf certificate's key")

    result = VerifiedAttestation(
        module_id=doc.module_id, timestamp=doc.timestamp_datetime, timestamp_ms=doc.timestamp, digest=doc.digest,
        pcrs=dict(doc.pcrs), public_key=doc.public_key, user_data=doc.user_data, nonce=doc.nonce,
        certificate=doc.certificate, cabundle=doc.cabundle, debug_mode=doc.debug_mode, trust_root=root.fingerprint,
        document=doc)
    policy.check(result, when)
    return result
