"""Attestation documents in AWS's exact format (spec nsm-attestation-kms §3.1, §3.2, §3.6).

A document is an untagged COSE_Sign1 whose payload is a CBOR map of 9 keys in this order: ``module_id``,
``digest``, ``timestamp``, ``pcrs``, ``certificate``, ``cabundle``, ``public_key``, ``user_data``, ``nonce``.
Absent optional fields are an explicit ``null``.  Since mid-2025 AWS writes the payload map with an
indefinite-length head (``bf … ff``); earlier documents use ``a9``.  Both are read; ``bf`` is written by default.

This module only turns bytes into an :class:`AttestationDocument` and back.  Nothing here implies trust: the
signature and the certificate chain are checked by :mod:`enclavekit.attestation.verifier`.

Pure: no I/O, clock or randomness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from enclavekit.errors import AttestationFormatError, CBORError, FormatError
from enclavekit.formats import cbor
from enclavekit.formats.cose import COSESign1

__all__ = [
    "AttestationDocument",
    "parse_document",
    "describe_certificate",
    "CertificateParts",
    "split_certificate",
    "name_text",
    "PAYLOAD_KEYS",
    "MAX_DOCUMENT_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MAX_FIELD_SIZE",
    "PCR_LENGTHS",
    "MAX_TIMESTAMP",
    "PROTECTED_ES384",
]

# attestation doc 3.2: the payload keys, in the order AWS writes them (digest before timestamp)
PAYLOAD_KEYS = (
    "module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce",
)
_MANDATORY = frozenset(PAYLOAD_KEYS[:6])

# attestation doc 3.1: the payload bstr is 1..16384 bytes; a whole document is a little larger
MAX_PAYLOAD_SIZE = 16384
MAX_DOCUMENT_SIZE = MAX_PAYLOAD_SIZE + 1024
# attestation doc 3.6: cabundle items, public_key, user_data and nonce are at most 1024 bytes (nitrite cb1d9e7)
MAX_FIELD_SIZE = 1024
# attestation doc 3.6: pcr values are 32, 48 or 64 bytes; at most 32 pcrs, indices 0..31
PCR_LENGTHS = frozenset({32, 48, 64})
MAX_PCRS = 32
# our own caps (the spec gives none): a module id is a short text, a chain has a handful of certificates
MAX_MODULE_ID_LENGTH = 256
MAX_CABUNDLE_ENTRIES = 16
# attestation doc 3.2: the timestamp is a uint64 of ms; we cap it at 9999-12-31T23:59:59.999Z so that every
# accepted document has a representable date
MAX_TIMESTAMP = 253402300799999
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

PROTECTED_ES384 = b"\xa1\x01\x38\x22"  # attestation doc 3.1: the protected header {1: -35}, as AWS writes it


def _fail(rule: str, message: str, error: type[Exception]) -> Exception:
    if issubclass(error, AttestationFormatError):
        return error(message, rule=rule)
    return error(f"{message} (rule {rule})")


def _check_fields(fields: Mapping[str, object], error: type[Exception]) -> None:
    """attestation doc 3.6 content rules, null-as-absent, 1024-byte limits.  Raises ``error``."""
    module_id, digest, timestamp, pcrs, certificate, cabundle, public_key, user_data, nonce = (
        fields.get(k) for k in PAYLOAD_KEYS)
    if not isinstance(module_id, str) or not module_id:
        raise _fail("module_id", "module_id must be a non-empty text string", error)
    if len(module_id) > MAX_MODULE_ID_LENGTH:
        raise _fail("module_id", f"module_id is {len(module_id)} characters, at most {MAX_MODULE_ID_LENGTH}", error)
    if digest != "SHA384":
        raise _fail("digest", "digest must be \"SHA384\"", error)
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp <= 0:
        raise _fail("timestamp", "timestamp must be an integer > 0", error)
    if timestamp > MAX_TIMESTAMP:
        raise _fail("timestamp", f"timestamp {timestamp} is after 9999-12-31 (at most {MAX_TIMESTAMP} ms)", error)
    if not isinstance(pcrs, Mapping):
        raise _fail("pcrs", "pcrs must be a map", error)
    if not 1 <= len(pcrs) <= MAX_PCRS:
        raise _fail("pcrs", f"pcrs must have 1..{MAX_PCRS} entries, got {len(pcrs)}", error)
    for index, value in pcrs.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_PCRS:
            raise _fail("pcrs", f"pcr index {index!r} is not an integer in [0, {MAX_PCRS})", error)
        if not isinstance(value, bytes) or len(value) not in PCR_LENGTHS:
            raise _fail("pcrs", f"pcr {index} must be a byte string of 32, 48 or 64 bytes", error)
    if not isinstance(certificate, bytes) or not 1 <= len(certificate) <= MAX_FIELD_SIZE:
        raise _fail("certificate", f"certificate must be a byte string of 1..{MAX_FIELD_SIZE} bytes", error)
    if not isinstance(cabundle, list | tuple) or not 1 <= len(cabundle) <= MAX_CABUNDLE_ENTRIES:
        raise _fail("cabundle", f"cabundle must be an array of 1..{MAX_CABUNDLE_ENTRIES} entries", error)
    for i, entry in enumerate(cabundle):
        if not isinstance(entry, bytes) or not 1 <= len(entry) <= MAX_FIELD_SIZE:
            raise _fail("cabundle", f"cabundle[{i}] must be a byte string of 1..{MAX_FIELD_SIZE} bytes", error)
    if public_key is not None and (not isinstance(public_key, bytes) or not 1 <= len(public_key) <= MAX_FIELD_SIZE):
        raise _fail("public_key", f"public_key must be null or a byte string of 1..{MAX_FIELD_SIZE} bytes", error)
    for name, value in (("user_data", user_data), ("nonce", nonce)):
        if value is not None and (not isinstance(value, bytes) or len(value) > MAX_FIELD_SIZE):
            raise _fail(name, f"{name} must be null or a byte string of 0..{MAX_FIELD_SIZE} bytes", error)


@dataclass(frozen=True)
class AttestationDocument:
    """The payload of an attestation document (no trust implied).

    ``timestamp`` is milliseconds since the Unix epoch (UTC).  ``pcrs`` maps index to value and is kept in
    ascending index order.  ``cabundle`` is root first.  ``indefinite_map`` records how the payload map was (or
    will be) encoded: ``bf … ff`` (True, the current AWS form) or ``a9`` (False).
    """

    module_id: str
    timestamp: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None
    digest: str = "SHA384"
    indefinite_map: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        # caller bugs (building a document by hand) are ValueError; parsed documents were checked already
        _check_fields({k: getattr(self, k) for k in PAYLOAD_KEYS}, ValueError)
        object.__setattr__(self, "pcrs", {i: bytes(self.pcrs[i]) for i in sorted(self.pcrs)})
        object.__setattr__(self, "cabundle", tuple(self.cabundle))

    # ----------------------------------------------------------------------------------------- encoding

    def to_payload_bytes(self, *, indefinite: bool | None = None) -> bytes:
        """The payload map exactly as the NSM writes it (attestation doc 3.2).

        9 keys in AWS's order, ``null`` for absent options, ``pcrs`` a definite map in ascending order,
        ``cabundle`` root first, ``timestamp`` in the 8-byte form ``1b …``, the map ``bf … ff`` unless
        ``indefinite=False`` (``a9``).  ``indefinite=None`` uses :attr:`indefinite_map`.
        """
        use_indefinite = self.indefinite_map if indefinite is None else indefinite
        enc = cbor.encode
        out = bytearray(b"\xbf" if use_indefinite else b"\xa9")
        out += enc("module_id") + enc(self.module_id)
        out += enc("digest") + enc(self.digest)
        # attestation doc 3.2: AWS always writes the timestamp as a 64-bit unsigned integer
        out += enc("timestamp") + b"\x1b" + self.timestamp.to_bytes(8, "big")
        out += enc("pcrs") + enc(dict(self.pcrs))
        out += enc("certificate") + enc(self.certificate)
        out += enc("cabundle") + enc(list(self.cabundle))
        out += enc("public_key") + enc(self.public_key)
        out += enc("user_data") + enc(self.user_data)
        out += enc("nonce") + enc(self.nonce)
        if use_indefinite:
            out.append(0xFF)
        return bytes(out)

    # ----------------------------------------------------------------------------------------- decoding

    @classmethod
    def from_payload_bytes(cls, data: bytes) -> AttestationDocument:
        """Parse a payload map strictly (attestation doc 3.6, 3.7 step 2).  Raises AttestationFormatError."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("from_payload_bytes expects bytes")
        data = bytes(data)
        if not 1 <= len(data) <= MAX_PAYLOAD_SIZE:
            raise AttestationFormatError(
                f"payload is {len(data)} bytes, expected 1..{MAX_PAYLOAD_SIZE}", rule="payload-size")
        if data[0] >> 5 != 5:
            raise AttestationFormatError("payload is not a CBOR map", rule="payload-type")
        try:
            decoded = cbor.decode_prefix(data, max_depth=4)
        except CBORError as exc:
            raise AttestationFormatError(f"payload is not valid CBOR: {exc}", rule="payload-cbor") from exc
        if decoded.end != len(data):
            raise AttestationFormatError(
                f"{len(data) - decoded.end} trailing bytes after the payload map", rule="payload-cbor")
        value = decoded.value
        if not isinstance(value, dict):
            raise AttestationFormatError("payload is not a CBOR map", rule="payload-type")
        # attestation doc 3.2: only the top-level map may be indefinite; pcrs, cabundle and every string
        # inside stay definite-length (no `9f`/`bf` containers, no chunked `5f`/`7f` strings)
        nested = [offset for offset in decoded.indefinite_items if offset != 0]
        if nested:
            raise AttestationFormatError(
                f"indefinite-length item at payload offset {nested[0]}: only the top-level map may be "
                "indefinite", rule="encoding")
        if "nitrotpm_pcrs" in value:
            raise AttestationFormatError(
                "this is a NitroTPM document (nitrotpm_pcrs), not an enclave attestation document",
                rule="nitrotpm-document")
        unknown = [k for k in value if k not in PAYLOAD_KEYS]
        if unknown:
            shown = ", ".join(repr(k)[:40] for k in unknown[:3])
            raise AttestationFormatError(f"unknown payload key(s): {shown}", rule="unknown-key")
        missing = [k for k in PAYLOAD_KEYS if k in _MANDATORY and k not in value]
        if missing:
            raise AttestationFormatError(f"mandatory field(s) missing: {', '.join(missing)}", rule="missing-field")
        fields: dict[str, Any] = {k: value.get(k) for k in PAYLOAD_KEYS}
        if not isinstance(fields["cabundle"], list):
            raise AttestationFormatError("cabundle must be an array", rule="cabundle")
        _check_fields(fields, AttestationFormatError)
        return cls(
            module_id=fields["module_id"],
            digest=fields["digest"],
            timestamp=fields["timestamp"],
            pcrs=fields["pcrs"],
            certificate=fields["certificate"],
            cabundle=tuple(fields["cabundle"]),
            public_key=fields["public_key"],
            user_data=fields["user_data"],
            nonce=fields["nonce"],
            indefinite_map=bool(decoded.indefinite_maps),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> AttestationDocument:
        """Parse a whole document (COSE_Sign1, tagged or untagged) and return its payload.  No trust implied."""
        return parse_document(data)[1]

    # ----------------------------------------------------------------------------------------- reporting

    @property
    def timestamp_datetime(self) -> datetime:
        # exact milliseconds (no float rounding); the field check keeps the timestamp within year 9999
        return _EPOCH + timedelta(milliseconds=self.timestamp)

    @property
    def debug_mode(self) -> bool:
        """Debug-mode enclaves have PCR0, PCR1 and PCR2 all zero (spec 2.5)."""
        return all(i in self.pcrs and not any(self.pcrs[i]) for i in (0, 1, 2))

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary: pcrs as lowercase hex by index, certificates summarized.  No trust implied."""
        return {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp": self.timestamp,
            "timestamp_iso": self.timestamp_datetime.isoformat().replace("+00:00", "Z"),
            "payload_map": "indefinite" if self.indefinite_map else "definite",
            "debug_mode": self.debug_mode,
            "pcrs": {str(i): v.hex() for i, v in self.pcrs.items()},
            "certificate": describe_certificate(self.certificate),
            "cabundle": [describe_certificate(c) for c in self.cabundle],
            "public_key": None if self.public_key is None else self.public_key.hex(),
            "user_data": None if self.user_data is None else self.user_data.hex(),
            "nonce": None if self.nonce is None else self.nonce.hex(),
        }


def parse_document(data: bytes) -> tuple[COSESign1, AttestationDocument]:
    """Parse a document into its COSE_Sign1 envelope (received bytes kept) and payload.  No trust implied.

    Raises :class:`AttestationFormatError` for anything that is not a well-formed document.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("parse_document expects bytes")
    data = bytes(data)
    if not data:
        raise AttestationFormatError("attestation document is empty", rule="document-size")
    if len(data) > MAX_DOCUMENT_SIZE:
        raise AttestationFormatError(
            f"attestation document is {len(data)} bytes, at most {MAX_DOCUMENT_SIZE}", rule="document-size")
    try:
        envelope = COSESign1.from_bytes(data, error=AttestationFormatError)
    except FormatError as exc:
        raise AttestationFormatError(str(exc), rule="cose-structure") from exc
    return envelope, AttestationDocument.from_payload_bytes(envelope.payload)


# --------------------------------------------------------------------------------------------- certificates
# A minimal strict DER walk of a certificate's outer structure (RFC 5280 4.1), enough to read the serial, issuer
# and subject without building cryptography Name objects: those warn (process-wide) on malformed attributes.

_NAME_LABELS = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.9": "STREET", "2.5.4.10": "O",
    "2.5.4.11": "OU", "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID",
}
# DER string tags and their codecs (UTF8String, NumericString, PrintableString, TeletexString, IA5String,
# VisibleString, UniversalString, BMPString)
_STRING_CODECS = {0x0C: "utf-8", 0x12: "ascii", 0x13: "ascii", 0x14: "latin-1", 0x16: "ascii", 0x1A: "ascii",
                  0x1C: "utf-32-be", 0x1E: "utf-16-be"}


@dataclass(frozen=True)
class CertificateParts:
    """Raw pieces of a DER certificate: serial INTEGER contents, issuer and subject Name TLVs (exact bytes)."""

    serial: bytes
    issuer: bytes
    subject: bytes

    @property
    def serial_is_positive(self) -> bool:
        """RFC 5280 4.1.2.2: serials are positive; cryptography warns (process-wide) on any other."""
        return bool(self.serial) and not self.serial[0] & 0x80 and any(self.serial)


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """One DER TLV at ``pos`` (not past ``end``): (tag, content start, content end).  Raises ValueError."""
    if end - pos < 2:
        raise ValueError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not used in certificates")
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if not 1 <= n <= 3 or end - pos < n:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        if length < 0x80 or data[pos] == 0:  # DER: shortest length form
            raise ValueError("non-minimal DER length")
        pos += n
    if length > end - pos:
        raise ValueError("DER length past the end")
    return tag, pos, pos + length


def split_certificate(der: bytes) -> CertificateParts:
    """The serial, issuer and subject of a DER certificate, read without cryptography.  Raises ValueError."""
    tag, start, end = _tlv(der, 0, len(der))
    if tag != 0x30 or end != len(der):
        raise ValueError("not a DER certificate SEQUENCE")
    tag, pos, tbs_end = _tlv(der, start, end)  # TBSCertificate
    if tag != 0x30:
        raise ValueError("no TBSCertificate")
    tag, c0, c1 = _tlv(der, pos, tbs_end)
    if tag == 0xA0:  # [0] EXPLICIT version
        pos = c1
        tag, c0, c1 = _tlv(der, pos, tbs_end)
    if tag != 0x02:
        raise ValueError("no serial number")
    serial = der[c0:c1]
    pos = c1
    parts: list[bytes] = []
    for what in ("signature algorithm", "issuer", "validity", "subject"):
        tag, c0, c1 = _tlv(der, pos, tbs_end)
        if tag != 0x30:
            raise ValueError(f"no {what}")
        parts.append(der[pos:c1])
        pos = c1
    return CertificateParts(serial=serial, issuer=parts[1], subject=parts[3])


def _escape(value: str) -> str:
    # RFC 4514 2.4
    out = "".join("\\" + ch if ch in ',+"\\<>;' else ch for ch in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and len(out) > 1:
        out = out[:-1] + "\\ "
    return out


def _oid_text(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise ValueError("bad OID")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def name_text(name_der: bytes) -> str:
    """RFC 4514 text of a DER Name (last RDN first, as cryptography prints it).  Raises ValueError."""
    tag, pos, end = _tlv(name_der, 0, len(name_der))
    if tag != 0x30 or end != len(name_der):
        raise ValueError("not a Name")
    rdns: list[str] = []
    while pos < end:
        tag, s0, s1 = _tlv(name_der, pos, end)
        if tag != 0x31:
            raise ValueError("RDN is not a SET")
        attributes: list[str] = []
        while s0 < s1:
            tag, a0, a1 = _tlv(name_der, s0, s1)
            if tag != 0x30:
                raise ValueError("attribute is not a SEQUENCE")
            otag, o0, o1 = _tlv(name_der, a0, a1)
            vtag, v0, v1 = _tlv(name_der, o1, a1)
            if otag != 0x06 or v1 != a1:
                raise ValueError("bad attribute")
            oid = _oid_text(name_der[o0:o1])
            codec = _STRING_CODECS.get(vtag)
            try:
                text = _escape(name_der[v0:v1].decode(codec)) if codec else None
            except UnicodeDecodeError:
                text = None
            if text is None:  # RFC 4514 2.4: other types print as # and the hex of the BER encoding
                text = "#" + name_der[o1:v1].hex()
            attributes.append(f"{_NAME_LABELS.get(oid, oid)}={text}")
            s0 = a1
        rdns.append("+".join(attributes))
        pos = s1
    return ",".join(reversed(rdns))


def describe_certificate(der: bytes) -> dict[str, Any]:
    """Subject, issuer, serial, validity and SHA-256 of a DER certificate, for display only.

    Never raises for malformed input (the summary then holds ``error``) and never makes cryptography warn:
    names are rendered from the DER here, and a non-positive serial is reported before cryptography sees it.
    """
    summary: dict[str, Any] = {"sha256": hashlib.sha256(der).hexdigest(), "size": len(der)}
    try:
        parts = split_certificate(der)
        if not parts.serial_is_positive:
            raise ValueError("the serial number is not positive")
        subject, issuer = name_text(parts.subject), name_text(parts.issuer)
        cert = x509.load_der_x509_certificate(der)
        summary.update(
            subject=subject,
            issuer=issuer,
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
            not_after=cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        )
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        summary["error"] = f"not a parsable X.509 certificate ({type(exc).__name__})"
    return summary
