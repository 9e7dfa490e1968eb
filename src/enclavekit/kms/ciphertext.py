"""The ``CiphertextBlob`` of symmetric KMS keys: enclavekit's own format (spec §4.6: AWS's is opaque).

Layout (big-endian)::

    offset  size  field
    0       1     version            0x01
    1       16    key id             the KMS key's UUID, raw bytes
    17      4     material version   which key material (1, 2, … after rotations) encrypted this blob
    21      12    iv                 random AES-GCM nonce
    33      n+16  ciphertext || tag  AES-256-GCM of the plaintext (n = 1..4096 bytes)

The 33-byte header and the canonical encryption context are the GCM additional data, so a changed header byte, a
different encryption context, or a truncated blob all fail authentication.  Canonical encryption context: the
pairs sorted by key (UTF-8 bytes), each written as ``len(key) u16 || key || len(value) u16 || value``, preceded by
the pair count (u16); an empty context is the two bytes ``00 00``.  A blob is at most 6144 bytes (the
``CiphertextType`` limit of the API model).

This module is pure: the IV is a parameter, and failures raise :class:`CiphertextError`, which the service turns
into ``InvalidCiphertextException``.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclavekit.errors import FormatError

__all__ = [
    "BLOB_VERSION",
    "HEADER_SIZE",
    "MAX_BLOB_SIZE",
    "MAX_PLAINTEXT_SIZE",
    "CiphertextError",
    "CiphertextBlob",
    "canonical_context",
    "seal_blob",
    "open_blob",
]

BLOB_VERSION = 1
HEADER_SIZE = 33
_TAG_SIZE = 16
MAX_BLOB_SIZE = 6144
MAX_PLAINTEXT_SIZE = 4096
_HEADER = struct.Struct(">B16sI12s")


class CiphertextError(FormatError):
    """A ciphertext blob is malformed, tampered with, or does not match its encryption context."""

    code = "E86"


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The encryption context as the blob's additional authenticated data (order-independent)."""
    items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    if len(items) > 0xFFFF:
        raise ValueError("too many encryption context pairs")
    out = [struct.pack(">H", len(items))]
    for key, value in items:
        if len(key) > 0xFFFF or len(value) > 0xFFFF:
            raise ValueError("encryption context entry too long")
        out += [struct.pack(">H", len(key)), key, struct.pack(">H", len(value)), value]
    return b"".join(out)


@dataclass(frozen=True)
class CiphertextBlob:
    key_id: str            # UUID text, lowercase
    material_version: int
    iv: bytes
    ciphertext: bytes      # including the 16-byte GCM tag

    @property
    def header(self) -> bytes:
        return _HEADER.pack(BLOB_VERSION, uuid.UUID(self.key_id).bytes, self.material_version, self.iv)

    def to_bytes(self) -> bytes:
        return self.header + self.ciphertext

    @classmethod
    def from_bytes(cls, data: bytes) -> CiphertextBlob:
        if not isinstance(data, bytes | bytearray):
            raise TypeError("data must be bytes")
        # length checks before slicing: header, then at least 1 byte of plaintext plus the tag
        if len(data) > MAX_BLOB_SIZE:
            raise CiphertextError(f"ciphertext blob is {len(data)} bytes, at most {MAX_BLOB_SIZE}")
        if len(data) < HEADER_SIZE + _TAG_SIZE + 1:
            raise CiphertextError("ciphertext blob is truncated")
        version, key, material_version, iv = _HEADER.unpack_from(data)
        if version != BLOB_VERSION:
            raise CiphertextError(f"unknown ciphertext blob version {version}")
        if material_version < 1:
            raise CiphertextError("ciphertext blob names material version 0")
        return cls(str(uuid.UUID(bytes=key)), material_version, bytes(iv), bytes(data[HEADER_SIZE:]))


def seal_blob(*, key_id: str, material_version: int, material: bytes, plaintext: bytes,
              context: Mapping[str, str], iv: bytes) -> CiphertextBlob:
    """Encrypt ``plaintext`` (1..4096 bytes) under ``material`` (32 bytes), binding header and context."""
    if not 1 <= len(plaintext) <= MAX_PLAINTEXT_SIZE:
        raise ValueError("plaintext is 1..4096 bytes")
    if len(material) != 32 or len(iv) != 12:
        raise ValueError("material is 32 bytes and iv 12 bytes")
    if not 1 <= material_version <= 0xFFFFFFFF:
        raise ValueError("material_version is a positive 32-bit integer")
    blob = CiphertextBlob(str(uuid.UUID(key_id)), material_version, iv, b"")
    sealed = AESGCM(material).encrypt(iv, plaintext, blob.header + canonical_context(context))
    return CiphertextBlob(blob.key_id, material_version, iv, sealed)


def open_blob(blob: CiphertextBlob, *, material: bytes, context: Mapping[str, str]) -> bytes:
    """Decrypt; a wrong key, context, or any changed byte raises :class:`CiphertextError`."""
    try:
        return AESGCM(material).decrypt(blob.iv, blob.ciphertext, blob.header + canonical_context(context))
    except InvalidTag:
        raise CiphertextError("ciphertext blob does not authenticate (tampered, or wrong encryption "
                              "context)") from None
