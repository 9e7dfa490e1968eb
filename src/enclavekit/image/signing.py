"""Signing enclave images: keys and certificates, ``sign-eif`` (in place), offline signing, verification.

What an EIF signature is (spec eif-pcr-cli §1.9): a COSE_Sign1 (ES256/384/512 by the key's curve) whose payload is
``PCRInfo{register_index: 0, register_value: PCR0}``, stored with the PEM certificate file bytes in the signature
section; PCR8 is the PCR of the certificate's DER.

Offline signing, for keys that never touch the build host:

1. :func:`export_payload` writes the COSE ``Sig_structure`` (RFC 9052 §4.4)::

       ["Signature1", h'<protected header {1: alg}>', h'', h'<CBOR PCRInfo{0, PCR0}>']

   i.e. exactly the message a COSE signer feeds to ECDSA.  The ``alg`` is the certificate key's (ES384 for P-384,
   the default when no certificate is given).
2. The holder of the key signs that file with ECDSA and the hash that matches the curve (SHA-256/384/512 for
   P-256/384/521): for example ``openssl dgst -sha384 -sign key.pem -out sig.der payload.bin``.  The signature may
   be DER (what OpenSSL and most HSMs emit) or raw ``r || s`` (COSE's form, 64/96/132 bytes).
3. :func:`attach_signature` rebuilds the same message from the EIF, checks the signature against the certificate's
   public key (:class:`~enclavekit.errors.DetachedSignatureError` otherwise) and only then writes the section.

Every rewrite goes through a temporary file in the same directory and an atomic rename: a failure leaves the
original file untouched.  Re-signing replaces the signature section and recomputes every header field (section
table and CRC), unlike upstream, which leaves a stale size (§1.9 step 3).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from enclavekit._internal.ecdsa import alg_for_key, sign_cose, verify_raw
from enclavekit.errors import (
    DetachedSignatureError,
    EIFSignatureError,
    EIFValidationError,
    FileOperationError,
    FormatError,
    SigningCertificateError,
    SigningKeyError,
)
from enclavekit.formats.cose import ALGORITHMS, COSESign1
from enclavekit.formats.eif import SectionType
from enclavekit.formats.eif_signature import EIFSignature, PCRInfo, PCRSignature
from enclavekit.formats.pcr import Measurements, pcr8_certificate
from enclavekit.image.eif_reader import EIFInfo, iter_section_data, measure_eif
from enclavekit.image.eif_writer import EIFStreamWriter

__all__ = [
    "DEFAULT_OFFLINE_ALG",
    "EIFSigner",
    "VerifiedEIFSignature",
    "load_signing_certificate",
    "load_private_key",
    "signing_payload",
    "sign_eif",
    "export_payload",
    "attach_signature",
    "certificate_info",
    "verify_eif_signature",
    "check_signature",
]

DEFAULT_OFFLINE_ALG = -35  # ES384: AWS's documented key is secp384r1 (User Guide "PCR8")
_KMS_ARN = re.compile(r"^arn:(aws|aws-cn|aws-us-gov):kms:[a-z0-9-]+:\d{12}:key[:/][A-Za-z0-9-]+$")
_MAX_PEM_SIZE = 64 << 10


def load_signing_certificate(pem: bytes) -> x509.Certificate:
    """A PEM X.509 certificate with an EC public key on P-256/384/521 (else SigningCertificateError)."""
    if len(pem) > _MAX_PEM_SIZE:
        raise SigningCertificateError(f"the signing certificate file is {len(pem)} bytes; a PEM certificate is "
                                      f"at most {_MAX_PEM_SIZE}")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise SigningCertificateError("the signing certificate is not PEM (no '-----BEGIN CERTIFICATE-----' line)")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise SigningCertificateError(f"the signing certificate is not a valid X.509 certificate: {exc}") from exc
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningCertificateError(f"the signing certificate's public key cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SigningCertificateError(f"the signing certificate holds a {type(key).__name__.removeprefix('_')} "
                                      "key; EIF signatures need an EC key (P-256, P-384 or P-521)")
    try:
        alg_for_key(key)
    except ValueError as exc:
        raise SigningCertificateError(f"the signing certificate's key is on curve {key.curve.name}; "
                                      "expected P-256, P-384 or P-521") from exc
    return cert


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """A PEM EC private key on P-256/384/521 (else SigningKeyError)."""
    if len(pem) > _MAX_PEM_SIZE or b"-----BEGIN" not in pem:
        raise SigningKeyError("the private key is not a PEM file")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:
        raise SigningKeyError("the private key is encrypted; give an unencrypted PEM key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"the private key could not be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningKeyError(f"the private key is a {type(key).__name__.removeprefix('_')}; EIF signatures need "
                              "an EC key (P-256, P-384 or P-521)")
    try:
        alg_for_key(key)
    except ValueError as exc:
        raise SigningKeyError(f"the private key is on curve {key.curve.name}; expected P-256, P-384 or "
                              "P-521") from exc
    return key


def _read_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_PEM_SIZE + 1)
    except OSError as exc:
        raise FileOperationError(f"cannot read the {what} {os.fspath(path)!s}: {exc.strerror or exc}",
                                 details={"File": os.fspath(path), "Operation": "Read"}) from exc


def _public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class EIFSigner:
    """A private key and its certificate.  The certificate's PEM bytes are kept verbatim (they are stored in the
    signature section as they were in the file, trailing newline included)."""

    def __init__(self, certificate_pem: bytes, private_key: ec.EllipticCurvePrivateKey) -> None:
        self.certificate_pem = bytes(certificate_pem)
        self.certificate = load_signing_certificate(self.certificate_pem)
        self.private_key = private_key
        self.alg = alg_for_key(private_key)
        cert_key = self.certificate.public_key()
        assert isinstance(cert_key, ec.EllipticCurvePublicKey)
        if _public_bytes(cert_key) != _public_bytes(private_key.public_key()):
            raise SigningCertificateError("the private key does not match the signing certificate's public key")
        self.certificate_der = self.certificate.public_bytes(serialization.Encoding.DER)
        self.pcr8 = pcr8_certificate(self.certificate_der)

    @classmethod
    def from_pem(cls, certificate_pem: bytes, key_pem: bytes) -> EIFSigner:
        return cls(certificate_pem, load_private_key(key_pem))

    @classmethod
    def from_files(cls, certificate_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> EIFSigner:
        if _KMS_ARN.match(os.fspath(key_path)):
            raise SigningKeyError("KMS key ARNs are not supported as --private-key; use offline signing: "
                                  "sign-eif --export-payload, sign with KMS, then sign-eif --signature")
        certificate_pem = _read_file(certificate_path, "signing certificate")
        key_pem = _read_file(key_path, "private key")
        return cls.from_pem(certificate_pem, key_pem)

    def sign_pcr0(self, pcr0: bytes) -> COSESign1:
        return sign_cose(self.private_key, PCRInfo(0, pcr0).to_bytes())

    def signature_section(self, pcr0: bytes) -> bytes:
        """§1.9: the signature section data for an image whose PCR0 is ``pcr0``."""
        cose = self.sign_pcr0(pcr0)
        return EIFSignature((PCRSignature(self.certificate_pem, cose.to_bytes(tagged=False)),)).to_bytes()


def signing_payload(pcr0: bytes, alg: int = DEFAULT_OFFLINE_ALG) -> bytes:
    """The COSE Sig_structure an ECDSA signer signs for an image whose PCR0 is ``pcr0``."""
    if alg not in ALGORITHMS:
        raise ValueError(f"unknown COSE algorithm {alg}")
    return COSESign1.create(alg, PCRInfo(0, pcr0).to_bytes()).sig_structure()


# --------------------------------------------------------------------------------------------- rewriting


def _measure_path(path: str | os.PathLike[str]) -> EIFInfo:
    try:
        with open(path, "rb") as f:
            return measure_eif(f)
    except OSError as exc:
        raise FileOperationError(f"cannot read the EIF {os.fspath(path)!s}: {exc.strerror or exc}",
                                 details={"File": os.fspath(path), "Operation": "Read"}) from exc


def _check_crc(info: EIFInfo, target: Path, force: bool) -> None:
    # §1.4: eif_crc32 covers the header and every section.  Rewriting recomputes it, so signing a corrupt image
    # would hand back a file whose CRC is valid again and whose corruption nothing detects any more.
    if not info.crc_ok and not force:
        raise EIFValidationError(
            f"the image's CRC does not match; it is corrupt: {target} has eif_crc32 "
            f"{info.header.eif_crc32:#010x}, its content gives {info.computed_crc:#010x}", rule="crc",
            hint="Rebuild the image. To sign it anyway (its PCRs are those of the corrupt content), pass --force.")


def _rewrite_signed(path: str | os.PathLike[str], make_section: Callable[[EIFInfo], bytes], *,
                    force: bool = False) -> EIFInfo:
    """Rewrite ``path`` without its signature section(s) plus a new one from ``make_section(info)``.

    One pass measures the source (for PCR0) and one copies it into a temporary file beside it, whose header is
    rebuilt from what was written; the temporary file replaces ``path`` atomically at the end.  An image whose
    CRC does not match is refused (E61, rule ``crc``) unless ``force``.
    """
    target = Path(path)
    try:
        src = open(target, "rb")  # noqa: SIM115 - closed below, kept open across measure + copy
    except OSError as exc:
        raise FileOperationError(f"cannot open the EIF {target}: {exc.strerror or exc}",
                                 details={"File": str(target), "Operation": "Open"}) from exc
    tmp_name: str | None = None
    try:
        with src:
            info = measure_eif(src)
            _check_crc(info, target, force)
            section = make_section(info)  # before touching the disk: key and signature errors write nothing
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with os.fdopen(fd, "w+b") as out:
                writer = EIFStreamWriter(out)
                for s in info.sections:
                    if s.section_type != SectionType.SIGNATURE:
                        writer.section(s.section_type, iter_section_data(src, s), flags=s.header.flags)
                writer.section_bytes(SectionType.SIGNATURE, section)
                h = info.header
                writer.finish(flags=h.flags, version=max(h.version, 3), default_mem=h.default_mem,
                              default_cpus=h.default_cpus, reserved=h.reserved, unused=h.unused)
                os.fsync(out.fileno())
            os.chmod(tmp_name, os.stat(target).st_mode & 0o7777)
            os.replace(tmp_name, target)
            tmp_name = None
    except OSError as exc:
        raise FileOperationError(f"cannot write the signed EIF {target}: {exc.strerror or exc}",
                                 details={"File": str(target), "Operation": "Write"}) from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    return info


def sign_eif(path: str | os.PathLike[str], signer: EIFSigner, *, force: bool = False) -> Measurements:
    """Sign the EIF at ``path`` in place (append a signature, or replace the existing one).

    A file whose CRC does not match is refused (E61) unless ``force``.
    """
    info = _rewrite_signed(path, lambda i: signer.signature_section(i.measurements.pcr0), force=force)
    return replace(info.measurements, pcr8=signer.pcr8)


def export_payload(path: str | os.PathLike[str], *, alg: int | None = None,
                   certificate_pem: bytes | None = None, force: bool = False) -> bytes:
    """The bytes an offline signer must sign for the EIF at ``path`` (see the module docs).

    The algorithm comes from ``certificate_pem``'s key if given, else ``alg``, else ES384.  A file whose CRC does
    not match is refused (E61) unless ``force``: its signature could not be attached later anyway.
    """
    if certificate_pem is not None:
        key = load_signing_certificate(certificate_pem).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        alg = alg_for_key(key)
    info = _measure_path(path)
    _check_crc(info, Path(path), force)
    return signing_payload(info.measurements.pcr0, alg if alg is not None else DEFAULT_OFFLINE_ALG)


def _raw_candidates(signature: bytes, size: int) -> list[bytes]:
    """Raw ``r || s`` readings of ``signature``: as-is if it has the raw length, and its DER decoding if any."""
    out = []
    if len(signature) == 2 * size:
        out.append(signature)
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        pass
    else:
        if 0 < r < 1 << (8 * size) and 0 < s < 1 << (8 * size):
            out.append(r.to_bytes(size, "big") + s.to_bytes(size, "big"))
    return out


def attach_signature(path: str | os.PathLike[str], signature: bytes, certificate_pem: bytes, *,
                     force: bool = False) -> Measurements:
    """Attach an ECDSA signature made elsewhere over :func:`export_payload`'s bytes, after verifying it.

    A file whose CRC does not match is refused (E61) unless ``force``.
    """
    cert = load_signing_certificate(certificate_pem)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    alg = alg_for_key(key)
    size = ALGORITHMS[alg][2]
    pcr8 = pcr8_certificate(cert.public_bytes(serialization.Encoding.DER))

    def make_section(info: EIFInfo) -> bytes:
        cose = COSESign1.create(alg, PCRInfo(0, info.measurements.pcr0).to_bytes())
        message = cose.sig_structure()
        for raw in _raw_candidates(signature, size):
            if verify_raw(key, alg, message, raw):
                signed = COSESign1(cose.protected, {}, cose.payload, raw)
                return EIFSignature((PCRSignature(bytes(certificate_pem), signed.to_bytes(tagged=False)),)).to_bytes()
        raise DetachedSignatureError(
            f"the signature does not verify with the certificate's {ALGORITHMS[alg][0]} key over this EIF's "
            f"payload (expected DER or {2 * size} raw bytes, got {len(signature)} bytes)",
            hint=f"export the payload again (sign-eif --export-payload ... --signing-certificate CERT) and sign it "
                 f"with {ALGORITHMS[alg][1].upper()}; the EIF must not change in between",
        )

    info = _rewrite_signed(path, make_section, force=force)
    return replace(info.measurements, pcr8=pcr8)


# --------------------------------------------------------------------------------------------- describing


_NAME_LONG = {
    NameOID.COMMON_NAME: "commonName",
    NameOID.COUNTRY_NAME: "countryName",
    NameOID.LOCALITY_NAME: "localityName",
    NameOID.STATE_OR_PROVINCE_NAME: "stateOrProvinceName",
    NameOID.STREET_ADDRESS: "streetAddress",
    NameOID.ORGANIZATION_NAME: "organizationName",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "organizationalUnitName",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.SURNAME: "surname",
    NameOID.GIVEN_NAME: "givenName",
    NameOID.TITLE: "title",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.DOMAIN_COMPONENT: "domainComponent",
    NameOID.USER_ID: "userId",
}
_SIG_LONG = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ecdsa-with-SHA512",
    SignatureAlgorithmOID.RSA_WITH_SHA256: "sha256WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA384: "sha384WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA512: "sha512WithRSAEncryption",
    SignatureAlgorithmOID.ED25519: "ED25519",
}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _asn1_time(t: datetime) -> str:
    """OpenSSL ``ASN1_TIME_print`` style: ``Jan  1 00:00:00 2025 GMT``."""
    return f"{_MONTHS[t.month - 1]} {t.day:2d} {t:%H:%M:%S} {t.year} GMT"


def certificate_info(cert: x509.Certificate) -> dict[str, Any]:
    """describe-eif's ``SigningCertificate`` object (§1.9; OpenSSL text forms, best effort)."""
    issuer: dict[str, str] = {}
    for attr in cert.issuer:
        value = attr.value if isinstance(attr.value, str) else attr.value.hex()
        issuer[_NAME_LONG.get(attr.oid, attr.oid.dotted_string)] = value
    return {
        "IssuerName": issuer,
        "Algorithm": _SIG_LONG.get(cert.signature_algorithm_oid, cert.signature_algorithm_oid.dotted_string),
        "NotBefore": _asn1_time(cert.not_valid_before_utc),
        "NotAfter": _asn1_time(cert.not_valid_after_utc),
        "Signature": ":".join(f"{b:02X}" for b in cert.signature),
    }


# --------------------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class VerifiedEIFSignature:
    """A signature section that verified: the certificate, the algorithm, the signed PCR0 and PCR8."""

    certificate: x509.Certificate
    alg: int
    pcr0: bytes
    pcr8: bytes


def verify_eif_signature(info: EIFInfo, now: datetime | None, *, check_pcr0: bool = True) -> VerifiedEIFSignature:
    """run-enclave's signature check (§1.9 "Verification behaviour"); raises :class:`EIFSignatureError` (E59).

    Checks, on the first signature entry: the certificate parses and has an EC key; the COSE_Sign1 parses, uses
    the key's algorithm and verifies; ``now`` lies within the certificate's validity (skipped when ``now`` is
    None); and (``check_pcr0``, stricter than nitro-cli, which trusts the hypervisor for it) the signed payload is
    ``PCRInfo{0, PCR0}`` of this very image.
    """

    def fail(rule: str, message: str) -> EIFSignatureError:
        return EIFSignatureError(message, rule=rule)

    if info.signature is None or info.certificate_der is None:
        raise fail("unsigned", "the EIF is not signed")
    entry = info.signature.first
    try:
        cert = load_signing_certificate(entry.signing_certificate)
    except SigningCertificateError as exc:
        raise fail("certificate", f"signing certificate: {exc}") from exc
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        cose = COSESign1.from_bytes(entry.signature)
        alg = cose.algorithm()
    except FormatError as exc:
        raise fail("cose-format", f"the signature is not a valid COSE_Sign1: {exc}") from exc
    if alg != alg_for_key(key):
        raise fail("algorithm", f"the signature uses {ALGORITHMS[alg][0]}, the certificate's key needs "
                   f"{ALGORITHMS[alg_for_key(key)][0]}")
    if not verify_raw(key, alg, cose.sig_structure(), cose.signature):
        raise fail("signature", "the COSE signature does not verify with the certificate's public key")
    if now is not None:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        if not cert.not_valid_before_utc <= now.astimezone(UTC) <= cert.not_valid_after_utc:
            raise fail("certificate-validity", f"the signing certificate is valid from "
                       f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                       f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, "
                       f"not at {now.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}")
    # describe-eif's SignatureCheck compares the payload bytes with CBOR(PCRInfo{0, computed PCR0})
    if check_pcr0 and cose.payload != PCRInfo(0, info.measurements.pcr0).to_bytes():
        raise fail("pcr0", "the signature was made for a different image: the signed payload is not "
                   "PCRInfo{0, this EIF's PCR0}")
    try:
        signed = PCRInfo.from_bytes(cose.payload)
    except FormatError as exc:
        raise fail("payload", f"the signed payload is not a PCRInfo: {exc}") from exc
    return VerifiedEIFSignature(cert, alg, signed.register_value, pcr8_certificate(info.certificate_der))


def check_signature(info: EIFInfo) -> bool:
    """describe-eif's ``SignatureCheck``: the COSE signature verifies and signs ``PCRInfo{0, computed PCR0}``.

    A report field, not a gate: callers that decide whether to trust an image use :func:`verify_eif_signature`.
    """
    if info.signature is None:
        return False
    try:
        verify_eif_signature(info, None)
    except EIFSignatureError:
        return False
    return True
