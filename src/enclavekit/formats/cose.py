"""COSE_Sign1 (RFC 9052 §4.2) as the Nitro formats use it: ECDSA, protected header ``{1: alg}``, empty
unprotected map, raw ``r || s`` signatures.

``COSESign1.from_bytes`` accepts the tagged (tag 18) and untagged forms, refuses trailing bytes and anything
that is not a 4-element array of (bstr, map, bstr, bstr).  ``to_bytes`` writes the untagged form that
aws-nitro-enclaves-cose and the NSM emit.  Signing and verification live in :mod:`enclavekit._internal.ecdsa`;
this module only builds and parses bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enclavekit.errors import CBORError, FormatError
from enclavekit.formats import cbor

__all__ = ["ALGORITHMS", "COSESign1", "COSEFormatError", "COSE_SIGN1_TAG"]

COSE_SIGN1_TAG = 18

# COSE algorithm id -> (name, hash name, curve size in bytes)
ALGORITHMS: dict[int, tuple[str, str, int]] = {
    -7: ("ES256", "sha256", 32),
    -35: ("ES384", "sha384", 48),
    -36: ("ES512", "sha512", 66),
}


class COSEFormatError(FormatError):
    code = "E70"


@dataclass(frozen=True)
class COSESign1:
    """A decoded COSE_Sign1 message.  ``protected`` keeps the exact received header bytes."""

    protected: bytes
    unprotected: dict[Any, Any]
    payload: bytes
    signature: bytes
    tagged: bool = False

    @classmethod
    def create(cls, alg: int, payload: bytes, signature: bytes = b"") -> COSESign1:
        return cls(protected=cbor.encode({1: alg}), unprotected={}, payload=payload, signature=signature)

    @classmethod
    def from_bytes(cls, data: bytes, *, error: type[FormatError] = COSEFormatError) -> COSESign1:
        try:
            value = cbor.decode(data)
        except CBORError as exc:
            raise error(f"COSE_Sign1 is not valid CBOR: {exc}") from exc
        tagged = False
        if isinstance(value, cbor.Tag):
            if value.tag != COSE_SIGN1_TAG:
                raise error(f"COSE_Sign1 has tag {value.tag}, expected {COSE_SIGN1_TAG} or none")
            tagged = True
            value = value.value
        if not isinstance(value, list) or len(value) != 4:
            raise error("COSE_Sign1 must be a CBOR array of 4 items")
        protected, unprotected, payload, signature = value
        if not isinstance(protected, bytes):
            raise error("COSE_Sign1 protected header must be a byte string")
        if not isinstance(unprotected, dict):
            raise error("COSE_Sign1 unprotected header must be a map")
        if not isinstance(payload, bytes):
            raise error("COSE_Sign1 payload must be a byte string (detached payloads are not used)")
        if not isinstance(signature, bytes):
            raise error("COSE_Sign1 signature must be a byte string")
        return cls(protected, unprotected, payload, signature, tagged)

    def to_bytes(self, *, tagged: bool | None = None) -> bytes:
        body = [self.protected, self.unprotected, self.payload, self.signature]
        use_tag = self.tagged if tagged is None else tagged
        return cbor.encode(cbor.Tag(COSE_SIGN1_TAG, body) if use_tag else body)

    def algorithm(self, *, error: type[FormatError] = COSEFormatError) -> int:
        """The ``alg`` of the protected header, which must be exactly ``{1: alg}`` with a known ECDSA alg."""
        try:
            header = cbor.decode(self.protected) if self.protected else {}
        except CBORError as exc:
            raise error(f"COSE protected header is not valid CBOR: {exc}") from exc
        if not isinstance(header, dict) or 1 not in header:
            raise error("COSE protected header has no algorithm (label 1)")
        alg = header[1]
        if not isinstance(alg, int) or isinstance(alg, bool) or alg not in ALGORITHMS:
            raise error(f"COSE algorithm {alg!r} is not ES256, ES384 or ES512")
        return alg

    def sig_structure(self, external_aad: bytes = b"") -> bytes:
        """The bytes that are signed: ``["Signature1", protected, external_aad, payload]``."""
        return cbor.encode(["Signature1", self.protected, external_aad, self.payload])
