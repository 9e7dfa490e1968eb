"""The EIF signature section (type 4) and the payload its COSE_Sign1 signs (spec eif-pcr-cli §1.9).

Wire form (serde/ciborium, byte-identical across image-format versions per ``src/utils/cbor.rs``)::

    section   = array [ { "signing_certificate": [uint...], "signature": [uint...] } ... ]
    payload   = { "register_index": int, "register_value": [uint...] }       # PCRInfo, signed by COSE_Sign1

Every ``Vec<u8>`` is an array of unsigned integers (one per byte), never a byte string; map keys are text in
struct declaration order.  ``signing_certificate`` holds the PEM *file* bytes verbatim; ``signature`` holds the
serialized COSE_Sign1.  Pure codec: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enclavekit.errors import CBORError, EIFFormatError
from enclavekit.formats import cbor
from enclavekit.formats.eif import SIGNATURE_MAX_SIZE
from enclavekit.formats.pcr import PCR_SIZE

__all__ = ["PCRInfo", "PCRSignature", "EIFSignature"]

_KEY_CERT = "signing_certificate"
_KEY_SIG = "signature"
_KEY_INDEX = "register_index"
_KEY_VALUE = "register_value"


def _decode(data: bytes, what: str) -> Any:
    try:
        return cbor.decode(bytes(data))
    except CBORError as exc:
        raise EIFFormatError(f"{what} is not valid CBOR: {exc}") from exc


def _exact_keys(obj: Any, keys: tuple[str, str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise EIFFormatError(f"{what} must be a CBOR map, got {type(obj).__name__}")
    if set(obj) != set(keys):
        raise EIFFormatError(f"{what} must have exactly the keys {keys}, got {sorted(map(str, obj))}")
    return obj


def _uint_bytes(value: Any, what: str) -> bytes:
    try:
        return cbor.decode_uint_array(value, what)
    except CBORError as exc:
        raise EIFFormatError(str(exc)) from exc


@dataclass(frozen=True)
class PCRInfo:
    """§1.9 ``PcrInfo``: the COSE payload, ``{register_index: i32, register_value: [48 uints]}``."""

    register_index: int
    register_value: bytes

    def __post_init__(self) -> None:
        if not -(2**31) <= self.register_index < 2**31:
            raise ValueError("register_index is an i32")

    def to_bytes(self) -> bytes:
        return (
            cbor.encode_head(5, 2)
            + cbor.encode(_KEY_INDEX)
            + cbor.encode(self.register_index)
            + cbor.encode(_KEY_VALUE)
            + cbor.encode_uint_array(self.register_value)
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PCRInfo:
        obj = _exact_keys(_decode(data, "PCRInfo"), (_KEY_INDEX, _KEY_VALUE), "PCRInfo")
        index = obj[_KEY_INDEX]
        if not isinstance(index, int) or isinstance(index, bool) or not -(2**31) <= index < 2**31:
            raise EIFFormatError("PCRInfo register_index must be an i32")
        value = _uint_bytes(obj[_KEY_VALUE], "PCRInfo register_value")
        if len(value) != PCR_SIZE:
            raise EIFFormatError(f"PCRInfo register_value must be {PCR_SIZE} bytes, got {len(value)}")
        return cls(index, value)


@dataclass(frozen=True)
class PCRSignature:
    """One entry of the signature section: the PEM certificate file bytes and the serialized COSE_Sign1."""

    signing_certificate: bytes
    signature: bytes

    def to_cbor(self) -> bytes:
        return (
            cbor.encode_head(5, 2)
            + cbor.encode(_KEY_CERT)
            + cbor.encode_uint_array(self.signing_certificate)
            + cbor.encode(_KEY_SIG)
            + cbor.encode_uint_array(self.signature)
        )


@dataclass(frozen=True)
class EIFSignature:
    """The whole signature section.  Tools only ever write one entry (PCR0); readers use the first."""

    entries: tuple[PCRSignature, ...]

    def to_bytes(self) -> bytes:
        return cbor.encode_head(4, len(self.entries)) + b"".join(e.to_cbor() for e in self.entries)

    @classmethod
    def from_bytes(cls, data: bytes) -> EIFSignature:
        if len(data) > SIGNATURE_MAX_SIZE:
            raise EIFFormatError(f"signature section is {len(data)} bytes, more than {SIGNATURE_MAX_SIZE}")
        obj = _decode(data, "signature section")
        if not isinstance(obj, list):
            raise EIFFormatError(f"signature section must be a CBOR array, got {type(obj).__name__}")
        if not obj:
            raise EIFFormatError("signature section holds no signature")
        entries = []
        for i, item in enumerate(obj):
            entry = _exact_keys(item, (_KEY_CERT, _KEY_SIG), f"signature entry {i}")
            entries.append(PCRSignature(
                signing_certificate=_uint_bytes(entry[_KEY_CERT], f"signature entry {i} signing_certificate"),
                signature=_uint_bytes(entry[_KEY_SIG], f"signature entry {i} signature"),
            ))
        return cls(tuple(entries))

    @property
    def first(self) -> PCRSignature:
        return self.entries[0]
