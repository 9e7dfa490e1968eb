"""The NSM API wire messages: every request and response of the Nitro Secure Module, as CBOR.

The NSM API (``aws-nitro-enclaves-nsm-api`` ``src/api/mod.rs``) serialises two Rust enums, ``Request`` and
``Response``, with ``serde_cbor``'s externally tagged form (spec nsm-attestation-kms §2.1):

* a unit variant is a bare text string (``"DescribeNSM"``, ``"GetRandom"``, ``"LockPCR"``);
* a struct variant is a one-entry map ``{"Variant": {field: value, ...}}`` with snake_case field names in
  declaration order;
* the ``Error`` newtype variant is ``{"Error": "<NSMErrorCode>"}``;
* byte fields are CBOR byte strings, absent options are ``null``, integers are shortest form.

``to_bytes`` reproduces those bytes exactly (the spec's hex examples of §2.2 to §2.3 are test vectors).  Decoding
is by key, not by position (QEMU sends the DescribeNSM fields in alphabetical order), and strict: the root must
be a text string or a one-entry map, field types are checked (``index`` is an unsigned integer that fits a u16,
``data`` is a byte string...), unknown variants and unknown fields are refused, and the CBOR codec refuses
duplicate keys and trailing bytes.  Requests over 4096 bytes are refused before parsing
(:class:`NSMRequestTooLarge`), as the driver does (``NSM_REQUEST_MAX_SIZE``).  Every failure raises a
:class:`NSMMessageError` (a :class:`~enclavekit.errors.FormatError`); the emulated NSM turns those into
``InvalidOperation`` / ``InputTooLarge`` error responses.

Pure: no I/O, clock or randomness.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self, TypeAlias, TypeVar

from enclavekit.errors import CBORError, FormatError
from enclavekit.formats import cbor

__all__ = [
    "REQUEST_MAX_SIZE",
    "RESPONSE_MAX_SIZE",
    "INPUT_MAX_SIZE",
    "MAX_PCRS",
    "PCR_SIZE",
    "NSMErrorCode",
    "Digest",
    "NSMMessageError",
    "NSMRequestTooLarge",
    "DescribePCRRequest",
    "ExtendPCRRequest",
    "LockPCRRequest",
    "LockPCRsRequest",
    "DescribeNSMRequest",
    "AttestationRequest",
    "GetRandomRequest",
    "DescribePCRResponse",
    "ExtendPCRResponse",
    "LockPCRResponse",
    "LockPCRsResponse",
    "DescribeNSMResponse",
    "AttestationResponse",
    "GetRandomResponse",
    "ErrorResponse",
    "Request",
    "Response",
    "decode_request",
    "decode_response",
]

# nsm-attestation-kms §1.1: NSM_REQUEST_MAX_SIZE / NSM_RESPONSE_MAX_SIZE of the Linux driver.
REQUEST_MAX_SIZE = 0x1000
RESPONSE_MAX_SIZE = 0x3000
# §2.5: user_data, nonce and public_key are each at most 1024 bytes.
INPUT_MAX_SIZE = 1024
# §2.3: max_pcrs = 32; PCRs are SHA-384 registers.
MAX_PCRS = 32
PCR_SIZE = 48

_U16_MAX = 0xFFFF
_T = TypeVar("_T")


class NSMErrorCode(enum.StrEnum):
    """NSM error codes (§2.4).  The wire form is the variant name; the C ABI numbers them 0..8 in this order."""

    SUCCESS = "Success"
    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_INDEX = "InvalidIndex"
    INVALID_RESPONSE = "InvalidResponse"
    READ_ONLY_INDEX = "ReadOnlyIndex"
    INVALID_OPERATION = "InvalidOperation"
    BUFFER_TOO_SMALL = "BufferTooSmall"
    INPUT_TOO_LARGE = "InputTooLarge"
    INTERNAL_ERROR = "InternalError"

    @property
    def c_value(self) -> int:
        """The number libnsm's ``nsm.h`` uses (declaration order, §2.4)."""
        return list(NSMErrorCode).index(self)


class Digest(enum.StrEnum):
    """The ``digest`` of DescribeNSM (§2.4): serialised as a text string."""

    SHA256 = "SHA256"
    SHA384 = "SHA384"
    SHA512 = "SHA512"


class NSMMessageError(FormatError):
    """Bytes that should be an NSM request or response did not parse."""

    code = "E67"


class NSMRequestTooLarge(NSMMessageError):
    """A request over ``REQUEST_MAX_SIZE`` bytes (the NSM answers ``InputTooLarge``)."""


# ------------------------------------------------------------------------------------------ field checks


def _check_u16(value: int, what: str) -> None:
    """Caller-side check for values we are asked to encode (a bug, not untrusted input)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _U16_MAX:
        raise ValueError(f"{what} must be in 0..65535, got {value}")


def _check_bytes(value: object, what: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, got {type(value).__name__}")


def _u16(fields: Mapping[str, Any], key: str, variant: str) -> int:
    value = fields[key]
    # serde: index/range are u16; a bool, a negative integer or a float is a type error (§2.2)
    if not isinstance(value, int) or isinstance(value, bool):
        raise NSMMessageError(f"{variant}.{key} must be an unsigned integer, got {_kind(value)}")
    if not 0 <= value <= _U16_MAX:
        raise NSMMessageError(f"{variant}.{key} must fit an unsigned 16-bit integer, got {value}")
    return value


def _bstr(fields: Mapping[str, Any], key: str, variant: str) -> bytes:
    value = fields[key]
    # §2.1: serde_bytes fields are CBOR byte strings, never arrays
    if not isinstance(value, bytes):
        raise NSMMessageError(f"{variant}.{key} must be a byte string, got {_kind(value)}")
    return value


def _opt_bstr(fields: Mapping[str, Any], key: str, variant: str) -> bytes | None:
    # §2.1: Option::None is null; serde also treats a missing Option field as None
    if fields.get(key) is None:
        return None
    return _bstr(fields, key, variant)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "negative integer" if value < 0 else "integer"
    if isinstance(value, bytes):
        return "byte string"
    if isinstance(value, str):
        return "text string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def _fields(body: Any, variant: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The field map of a struct variant: a map with text keys, all required keys, no unknown keys."""
    if not isinstance(body, dict):
        raise NSMMessageError(f"{variant} must carry a map of fields, got {_kind(body)}")
    for key in body:
        if not isinstance(key, str):
            raise NSMMessageError(f"{variant} has a field key of type {_kind(key)}, expected text")
        if key not in required and key not in optional:
            raise NSMMessageError(f"{variant} has an unknown field {key!r}")
    for key in required:
        if key not in body:
            raise NSMMessageError(f"{variant} is missing the field {key!r}")
    return body


def _split_root(data: bytes, what: str, max_size: int) -> tuple[str, Any, bool]:
    """Decode the externally tagged root: (variant name, body, is_unit)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes")
    data = bytes(data)
    if len(data) > max_size:
        error = NSMRequestTooLarge if what == "request" else NSMMessageError
        raise error(f"NSM {what} is {len(data)} bytes, the limit is {max_size}")
    try:
        root = cbor.decode(data)
    except CBORError as exc:
        raise NSMMessageError(f"NSM {what} is not valid CBOR: {exc}") from exc
    # §2.1: a unit variant is a text string, a struct/newtype variant a one-entry map
    if isinstance(root, str):
        return root, None, True
    if isinstance(root, dict):
        if len(root) != 1:
            raise NSMMessageError(f"NSM {what} must be a map with exactly one entry, got {len(root)} entries")
        ((name, body),) = root.items()
        if not isinstance(name, str):
            raise NSMMessageError(f"NSM {what} variant name must be text, got {_kind(name)}")
        return name, body, False
    raise NSMMessageError(f"NSM {what} must be a text string or a one-entry map, got {_kind(root)}")


def _struct(name: str, fields: dict[str, Any]) -> bytes:
    return cbor.encode({name: fields})


def _unit(name: str) -> bytes:
    return cbor.encode(name)


class _Message:
    """What every NSM message shares (§2.1): the wire form from its dataclass fields, in declaration order (which is
    the order §2.2/§2.3 put them on the wire; every key is written, ``None`` as null), a bare text string for a
    message without fields."""

    VARIANT: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def _wire_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_bytes(self) -> bytes:
        body = self._wire_fields()
        return _struct(self.VARIANT, body) if body else _unit(self.VARIANT)


class _Request(_Message):
    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        return _expect(decode_request(data), cls)


class _Response(_Message):
    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        return _expect(decode_response(data), cls)


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class DescribePCRRequest(_Request):
    """``{"DescribePCR":{"index":uint}}`` (§2.2)."""

    VARIANT: ClassVar[str] = "DescribePCR"
    index: int

    def __post_init__(self) -> None:
        _check_u16(self.index, "index")


@dataclass(frozen=True)
class ExtendPCRRequest(_Request):
    """``{"ExtendPCR":{"index":uint,"data":bstr}}`` (§2.2); ``data`` is extended raw, not pre-hashed."""

    VARIANT: ClassVar[str] = "ExtendPCR"
    index: int
    data: bytes

    def __post_init__(self) -> None:
        _check_u16(self.index, "index")
        _check_bytes(self.data, "data")


@dataclass(frozen=True)
class LockPCRRequest(_Request):
    """``{"LockPCR":{"index":uint}}`` (§2.2)."""

    VARIANT: ClassVar[str] = "LockPCR"
    index: int

    def __post_init__(self) -> None:
        _check_u16(self.index, "index")


@dataclass(frozen=True)
class LockPCRsRequest(_Request):
    """``{"LockPCRs":{"range":uint}}`` (§2.2): lock PCRs ``[0, range)``."""

    VARIANT: ClassVar[str] = "LockPCRs"
    range: int

    def __post_init__(self) -> None:
        _check_u16(self.range, "range")


@dataclass(frozen=True)
class DescribeNSMRequest(_Request):
    """Text ``"DescribeNSM"`` (§2.2)."""

    VARIANT: ClassVar[str] = "DescribeNSM"


@dataclass(frozen=True)
class AttestationRequest(_Request):
    """``{"Attestation":{"user_data":…,"nonce":…,"public_key":…}}`` (§2.2): all three keys, null when absent."""

    VARIANT: ClassVar[str] = "Attestation"
    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None

    def __post_init__(self) -> None:
        _check_bytes(self.user_data, "user_data", optional=True)
        _check_bytes(self.nonce, "nonce", optional=True)
        _check_bytes(self.public_key, "public_key", optional=True)


@dataclass(frozen=True)
class GetRandomRequest(_Request):
    """Text ``"GetRandom"`` (§2.2)."""

    VARIANT: ClassVar[str] = "GetRandom"


Request: TypeAlias = (
    DescribePCRRequest | ExtendPCRRequest | LockPCRRequest | LockPCRsRequest | DescribeNSMRequest
    | AttestationRequest | GetRandomRequest
)


def decode_request(data: bytes, *, max_size: int = REQUEST_MAX_SIZE) -> Request:
    """Parse one NSM request; raise :class:`NSMRequestTooLarge` or :class:`NSMMessageError`."""
    name, body, unit = _split_root(data, "request", max_size)
    if name in ("DescribeNSM", "GetRandom"):
        if not unit:
            raise NSMMessageError(f"request {name} must be a bare text string, not a map")
        return DescribeNSMRequest() if name == "DescribeNSM" else GetRandomRequest()
    if name not in ("DescribePCR", "ExtendPCR", "LockPCR", "LockPCRs", "Attestation"):
        raise NSMMessageError(f"unknown NSM request {name[:64]!r}")
    if unit:
        raise NSMMessageError(f"request {name} must be a one-entry map carrying its fields")
    if name == "DescribePCR":
        f = _fields(body, name, ("index",))
        return DescribePCRRequest(_u16(f, "index", name))
    if name == "ExtendPCR":
        f = _fields(body, name, ("index", "data"))
        return ExtendPCRRequest(_u16(f, "index", name), _bstr(f, "data", name))
    if name == "LockPCR":
        f = _fields(body, name, ("index",))
        return LockPCRRequest(_u16(f, "index", name))
    if name == "LockPCRs":
        f = _fields(body, name, ("range",))
        return LockPCRsRequest(_u16(f, "range", name))
    f = _fields(body, name, (), ("user_data", "nonce", "public_key"))
    return AttestationRequest(_opt_bstr(f, "user_data", name), _opt_bstr(f, "nonce", name),
                              _opt_bstr(f, "public_key", name))


# ----------------------------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class DescribePCRResponse(_Response):
    """``{"DescribePCR":{"lock":bool,"data":bstr(48)}}`` (§2.3)."""

    VARIANT: ClassVar[str] = "DescribePCR"
    lock: bool
    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.lock, bool):
            raise TypeError("lock must be a bool")
        _check_bytes(self.data, "data")


@dataclass(frozen=True)
class ExtendPCRResponse(_Response):
    """``{"ExtendPCR":{"data":bstr(48)}}`` (§2.3): the new PCR value."""

    VARIANT: ClassVar[str] = "ExtendPCR"
    data: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.data, "data")


@dataclass(frozen=True)
class LockPCRResponse(_Response):
    """Text ``"LockPCR"`` (§2.3)."""

    VARIANT: ClassVar[str] = "LockPCR"


@dataclass(frozen=True)
class LockPCRsResponse(_Response):
    """Text ``"LockPCRs"`` (§2.3)."""

    VARIANT: ClassVar[str] = "LockPCRs"


@dataclass(frozen=True)
class DescribeNSMResponse(_Response):
    """``{"DescribeNSM":{version_major, version_minor, version_patch, module_id, max_pcrs, locked_pcrs, digest}}``.

    Fields in the Rust declaration order (§2.3); ``locked_pcrs`` is ascending on the wire (a ``BTreeSet``).
    """

    VARIANT: ClassVar[str] = "DescribeNSM"
    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: Digest

    def __post_init__(self) -> None:
        for name in ("version_major", "version_minor", "version_patch", "max_pcrs"):
            _check_u16(getattr(self, name), name)
        if not isinstance(self.module_id, str):
            raise TypeError("module_id must be a str")
        if not isinstance(self.locked_pcrs, tuple):
            raise TypeError("locked_pcrs must be a tuple")
        for index in self.locked_pcrs:
            _check_u16(index, "locked_pcrs item")
        object.__setattr__(self, "digest", Digest(self.digest))

    def _wire_fields(self) -> dict[str, Any]:
        return {**super()._wire_fields(), "locked_pcrs": list(self.locked_pcrs), "digest": self.digest.value}


@dataclass(frozen=True)
class AttestationResponse(_Response):
    """``{"Attestation":{"document":bstr}}`` (§2.3): the complete COSE_Sign1 bytes."""

    VARIANT: ClassVar[str] = "Attestation"
    document: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.document, "document")


@dataclass(frozen=True)
class GetRandomResponse(_Response):
    """``{"GetRandom":{"random":bstr}}`` (§2.3).

    The Linux hwrng matches the prefix ``a1 69 "GetRandom" a1 66 "random"`` byte for byte, so both maps are
    definite-length one-entry maps (which is what :func:`cbor.encode` writes).
    """

    VARIANT: ClassVar[str] = "GetRandom"
    random: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.random, "random")


@dataclass(frozen=True)
class ErrorResponse(_Response):
    """``{"Error":"<NSMErrorCode>"}`` (§2.3, §2.4)."""

    VARIANT: ClassVar[str] = "Error"
    error: NSMErrorCode

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", NSMErrorCode(self.error))

    def to_bytes(self) -> bytes:
        return cbor.encode({self.VARIANT: self.error.value})


Response: TypeAlias = (
    DescribePCRResponse | ExtendPCRResponse | LockPCRResponse | LockPCRsResponse | DescribeNSMResponse
    | AttestationResponse | GetRandomResponse | ErrorResponse
)

_ERROR_CODES = {code.value: code for code in NSMErrorCode}


def decode_response(data: bytes, *, max_size: int = RESPONSE_MAX_SIZE) -> Response:
    """Parse one NSM response; raise :class:`NSMMessageError` if it is not one."""
    name, body, unit = _split_root(data, "response", max_size)
    if name in ("LockPCR", "LockPCRs"):
        if not unit:
            raise NSMMessageError(f"response {name} must be a bare text string, not a map")
        return LockPCRResponse() if name == "LockPCR" else LockPCRsResponse()
    if name not in ("DescribePCR", "ExtendPCR", "DescribeNSM", "Attestation", "GetRandom", "Error"):
        raise NSMMessageError(f"unknown NSM response {name[:64]!r}")
    if unit:
        raise NSMMessageError(f"response {name} must be a one-entry map carrying its fields")
    if name == "Error":
        # §2.1: newtype variant, the error code name as a text string
        if not isinstance(body, str):
            raise NSMMessageError(f"Error must carry an error code name, got {_kind(body)}")
        if body not in _ERROR_CODES:
            raise NSMMessageError(f"unknown NSM error code {body[:64]!r}")
        return ErrorResponse(_ERROR_CODES[body])
    if name == "DescribePCR":
        f = _fields(body, name, ("lock", "data"))
        if not isinstance(f["lock"], bool):
            raise NSMMessageError(f"DescribePCR.lock must be a bool, got {_kind(f['lock'])}")
        return DescribePCRResponse(f["lock"], _bstr(f, "data", name))
    if name == "ExtendPCR":
        f = _fields(body, name, ("data",))
        return ExtendPCRResponse(_bstr(f, "data", name))
    if name == "Attestation":
        f = _fields(body, name, ("document",))
        return AttestationResponse(_bstr(f, "document", name))
    if name == "GetRandom":
        f = _fields(body, name, ("random",))
        return GetRandomResponse(_bstr(f, "random", name))
    keys = ("version_major", "version_minor", "version_patch", "module_id", "max_pcrs", "locked_pcrs", "digest")
    f = _fields(body, name, keys)
    if not isinstance(f["module_id"], str):
        raise NSMMessageError(f"DescribeNSM.module_id must be text, got {_kind(f['module_id'])}")
    locked = f["locked_pcrs"]
    if not isinstance(locked, list):
        raise NSMMessageError(f"DescribeNSM.locked_pcrs must be an array, got {_kind(locked)}")
    indices = tuple(_u16({"locked_pcrs": item}, "locked_pcrs", name) for item in locked)
    digest = f["digest"]
    if not isinstance(digest, str) or digest not in {d.value for d in Digest}:
        raise NSMMessageError(f"DescribeNSM.digest must be SHA256, SHA384 or SHA512, got {_kind(digest)}")
    return DescribeNSMResponse(
        _u16(f, "version_major", name), _u16(f, "version_minor", name), _u16(f, "version_patch", name),
        f["module_id"], _u16(f, "max_pcrs", name), indices, Digest(digest),
    )


def _expect(message: object, cls: type[_T]) -> _T:
    if not isinstance(message, cls):
        variant = getattr(type(message), "VARIANT", type(message).__name__)
        raise NSMMessageError(f"expected an NSM {getattr(cls, 'VARIANT', cls.__name__)} message, got {variant}")
    return message
