"""Helpers for attestation tests: fixture documents, a local PKI in a temporary state directory, and a builder
for documents signed by arbitrary (possibly broken) certificate chains."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit._internal.ecdsa import sign_raw
from enclavekit.attestation.pki import PROFILES, CertificateProfile, IssuedCertificate, LocalPKI, issue_certificate
from enclavekit.formats import cbor
from enclavekit.formats.attestation_doc import AttestationDocument

FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
DOCS = sorted(k for k in MANIFEST if k.endswith(".cbor"))
NOW = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)
PCRS = {i: bytes([i + 1]) * 48 for i in range(16)}


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def verify_at(name: str) -> datetime:
    return datetime.fromisoformat(MANIFEST[name]["verify_at"])


@pytest.fixture
def pki(tmp_path: Path) -> LocalPKI:
    return LocalPKI.open(tmp_path, now=NOW)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


@dataclass
class Chain:
    """A root-first list of CA certificates plus a leaf, built from (possibly altered) profiles."""

    cas: list[IssuedCertificate]
    leaf: IssuedCertificate

    @property
    def cabundle(self) -> tuple[bytes, ...]:
        return tuple(c.der for c in self.cas)


def make_chain(
    profiles: dict[str, CertificateProfile] | None = None,
    *,
    start: datetime = NOW - timedelta(hours=1),
    leaf_lifetime: timedelta = timedelta(hours=3),
    leaf_curve: ec.EllipticCurve | None = None,
    extra_leaf_extension: x509.ExtensionType | None = None,
    ca_curves: dict[str, ec.EllipticCurve] | None = None,
    validity: dict[str, tuple[datetime, datetime]] | None = None,
    root_name: x509.Name | None = None,
    sha256_signed: frozenset[str] = frozenset(),
) -> Chain:
    """root -> regional -> zonal -> instance -> leaf with PROFILES, overridden by ``profiles``.

    ``ca_curves`` gives a CA another key curve, ``validity`` a CA another window, ``root_name`` the root another
    subject, and the certificates named in ``sha256_signed`` are signed ecdsa-with-SHA256 instead of SHA-384.
    """
    prof = {**PROFILES, **(profiles or {})}
    cas: list[IssuedCertificate] = []
    parent_key: ec.EllipticCurvePrivateKey | None = None
    parent_name: x509.Name | None = None
    for kind in ("root", "regional", "zonal", "instance"):
        key = ec.generate_private_key((ca_curves or {}).get(kind, ec.SECP384R1()))
        name = root_name if kind == "root" and root_name is not None else _name(f"{kind}.test.enclavekit-local")
        not_before, not_after = (validity or {}).get(kind, (start - timedelta(days=1), start + timedelta(days=5)))
        cert = issue_certificate(
            prof[kind], subject=name, public_key=key.public_key(), issuer=parent_name or name,
            issuer_key=parent_key or key, not_before=not_before, not_after=not_after,
            issuer_ski=(x509.SubjectKeyIdentifier.from_public_key(parent_key.public_key()).digest
                        if parent_key else None))
        if kind in sha256_signed:
            cert = _resign(cert, parent_key or key, hashes.SHA256())
        cas.append(IssuedCertificate(cert, key))
        parent_key, parent_name = key, name
    assert parent_key is not None and parent_name is not None
    leaf_key = ec.generate_private_key(leaf_curve or ec.SECP384R1())
    leaf_cert = issue_certificate(
        prof["leaf"], subject=_name("leaf.test.enclavekit-local"), public_key=leaf_key.public_key(),
        issuer=parent_name, issuer_key=parent_key, not_before=start, not_after=start + leaf_lifetime)
    if extra_leaf_extension is not None:
        builder = (x509.CertificateBuilder().subject_name(leaf_cert.subject).issuer_name(leaf_cert.issuer)
                   .public_key(leaf_key.public_key()).serial_number(leaf_cert.serial_number)
                   .not_valid_before(leaf_cert.not_valid_before_utc).not_valid_after(leaf_cert.not_valid_after_utc))
        for ext in leaf_cert.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        leaf_cert = builder.add_extension(extra_leaf_extension, critical=True).sign(parent_key, hashes.SHA384())
    if "leaf" in sha256_signed:
        leaf_cert = _resign(leaf_cert, parent_key, hashes.SHA256())
    return Chain(cas, IssuedCertificate(leaf_cert, leaf_key))  # type: ignore[arg-type]


def _resign(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, algorithm: hashes.HashAlgorithm,
            ) -> x509.Certificate:
    """The same certificate (names, key, serial, validity, extensions in order) signed with ``algorithm``."""
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(cert.serial_number)  # type: ignore[arg-type]
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc))
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(key, algorithm)


def sign_document(
    chain: Chain,
    *,
    cabundle: tuple[bytes, ...] | None = None,
    timestamp: datetime = NOW,
    protected: bytes = b"\xa1\x01\x38\x22",
    unprotected: dict[object, object] | None = None,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
    pcrs: dict[int, bytes] | None = None,
    nonce: bytes | None = None,
    tagged: bool = False,
    **fields: object,
) -> bytes:
    """A COSE_Sign1 document over a payload built from ``chain`` (fields may be overridden)."""
    doc = AttestationDocument(
        module_id=str(fields.pop("module_id", "i-0123456789abcdef0-enc019bc1f2a0000001")),
        timestamp=int(timestamp.timestamp() * 1000), pcrs=pcrs or PCRS, certificate=chain.leaf.der,
        cabundle=cabundle if cabundle is not None else chain.cabundle, nonce=nonce,
        **fields)  # type: ignore[arg-type]
    payload = doc.to_payload_bytes()
    key = signing_key or chain.leaf.key
    sig_structure = cbor.encode(["Signature1", protected, b"", payload])
    alg = {"secp384r1": -35, "secp256r1": -7, "secp521r1": -36}[key.curve.name]
    signature = sign_raw(key, alg, sig_structure)
    body = [protected, unprotected or {}, payload, signature]
    return cbor.encode(cbor.Tag(18, body) if tagged else body)
