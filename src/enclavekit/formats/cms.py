"""``CiphertextForRecipient``: a CMS ContentInfo carrying EnvelopedData, exactly as AWS KMS emits it (spec §4.4).

KMS answers a request that carries ``Recipient`` with the result encrypted to the RSA key of the enclave's
attestation document.  The bytes are BER with **indefinite lengths** on the four outer constructed elements
(ContentInfo, ``[0]``, EnvelopedData, EncryptedContentInfo); the single KeyTransRecipientInfo is definite::

    30 80  06 09 2a864886f70d010703  a0 80  30 80  02 01 02
           31 82 .. ..  30 82 .. ..  02 01 02  80 20 <SKI>  30 3c <RSAES-OAEP sha256/mgf1-sha256>  04 82 01 00 <ek>
           30 80  06 09 2a864886f70d010701  30 1d 06 09 60864801650304012a 04 10 <IV>
                  a0 80 04 <len> <ciphertext> 00 00
           00 00
    00 00 00 00 00 00

:meth:`EnvelopedData.to_bytes` writes exactly that layout (spec 4.4 emitter pitfall: the C SDK's parser only
steps into the indefinite-length forms, so definite DER would break kmstool).  :meth:`EnvelopedData.from_bytes`
accepts definite and indefinite lengths and both ``[0]`` forms of the encrypted content (constructed with
OCTET STRING chunks, or primitive), and refuses anything else: other versions, algorithms, several recipients,
trailing bytes, truncation, nesting deeper than the structure needs.

:func:`seal` and :func:`open_envelope` do the cryptography (RSAES-OAEP with SHA-256 and MGF1-SHA-256, then
AES-256-CBC with PKCS#7 padding); the content key and IV are parameters, so this module reads no randomness.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from enclavekit.errors import FormatError

__all__ = [
    "CMSFormatError",
    "EnvelopedData",
    "MAX_ENVELOPE_SIZE",
    "subject_key_identifier",
    "seal",
    "open_envelope",
]

MAX_ENVELOPE_SIZE = 64 * 1024  # KMS caps CiphertextForRecipient at 6144 bytes; parse nothing absurdly large
_MAX_DEPTH = 8

# DER of the object identifiers and algorithm identifiers of spec 4.4
_OID_ENVELOPED_DATA = bytes.fromhex("06092a864886f70d010703")
_OID_DATA = bytes.fromhex("06092a864886f70d010701")
_OID_RSAES_OAEP = bytes.fromhex("06092a864886f70d010107")
_OID_AES256_CBC = bytes.fromhex("060960864801650304012a")
# RSAES-OAEP-params: hashFunc [0] sha256 (NULL params), maskGenFunc [1] MGF1(sha256), no pSourceFunc
_OAEP_SHA256_ALG = bytes.fromhex(
    "303c" "06092a864886f70d010107"
    "302f" "a00f300d06096086480165030402010500"
    "a11c301a06092a864886f70d010108300d06096086480165030402010500")
_EOC = b"\x00\x00"


class CMSFormatError(FormatError):
    """The bytes are not a CiphertextForRecipient envelope (or not one this module can open)."""

    code = "E85"


# --------------------------------------------------------------------------------------------- BER primitives


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


@dataclass(frozen=True)
class _Element:
    tag: int
    constructed: bool
    start: int       # offset of the content
    end: int         # offset after the content (before the EOC when indefinite)
    next: int        # offset after the whole element
    indefinite: bool


def _read(data: bytes, pos: int, limit: int) -> _Element:
    """One BER element header at ``pos``; content bounds checked against ``limit``."""
    if pos + 2 > limit:
        raise CMSFormatError("truncated BER element header")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise CMSFormatError("high-tag-number BER form is not used by CMS envelopes")
    constructed = bool(tag & 0x20)
    first = data[pos + 1]
    pos += 2
    if first == 0x80:
        if not constructed:
            raise CMSFormatError("indefinite length on a primitive BER element")
        end = _find_eoc(data, pos, limit, 1)
        return _Element(tag, True, pos, end, end + 2, True)
    if first & 0x80:
        count = first & 0x7F
        if count > 4 or pos + count > limit:
            raise CMSFormatError("BER length is truncated or too large")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    else:
        length = first
    if pos + length > limit:
        raise CMSFormatError(f"BER element of {length} bytes runs past the end of its container")
    return _Element(tag, constructed, pos, pos + length, pos + length, False)


def _find_eoc(data: bytes, pos: int, limit: int, depth: int) -> int:
    """Offset of the end-of-contents octets that close an indefinite element whose content starts at ``pos``."""
    if depth > _MAX_DEPTH:
        raise CMSFormatError("BER nesting is deeper than a CMS envelope needs")
    while True:
        if pos + 2 > limit:
            raise CMSFormatError("truncated: an indefinite-length element has no end-of-contents")
        if data[pos] == 0 and data[pos + 1] == 0:
            return pos
        if data[pos] == 0:
            raise CMSFormatError("malformed end-of-contents octets")
        tag_constructed = bool(data[pos] & 0x20)
        if data[pos + 1] == 0x80 and tag_constructed:
            inner_end = _find_eoc(data, pos + 2, limit, depth + 1)
            pos = inner_end + 2
        else:
            pos = _read(data, pos, limit).next


def _children(data: bytes, el: _Element) -> list[_Element]:
    if not el.constructed:
        raise CMSFormatError("expected a constructed BER element")
    out = []
    pos = el.start
    while pos < el.end:
        child = _read(data, pos, el.end)
        out.append(child)
        pos = child.next
    if pos != el.end:
        raise CMSFormatError("BER element content is not a whole number of elements")
    return out


def _expect(data: bytes, el: _Element, tag: int, what: str) -> _Element:
    if el.tag != tag:
        raise CMSFormatError(f"{what}: expected tag 0x{tag:02x}, got 0x{el.tag:02x}")
    return el


def _header_start(data: bytes, el: _Element) -> int:
    # definite elements only: tag byte, then the shortest length form (non-minimal lengths are refused by the
    # byte comparisons that use this offset)
    length = el.end - el.start
    return el.start - len(_der_length(length)) - 1


def _small_int(data: bytes, el: _Element, what: str) -> int:
    _expect(data, el, 0x02, what)
    body = data[el.start:el.end]
    if len(body) != 1:
        raise CMSFormatError(f"{what} is not a small integer")
    return body[0]


# --------------------------------------------------------------------------------------------- the envelope


@dataclass(frozen=True)
class EnvelopedData:
    """One KeyTransRecipientInfo (rid = subjectKeyIdentifier) and AES-256-CBC content (spec 4.4).

    ``constructed_content`` says which ``[0]`` form carries the encrypted content: constructed and indefinite
    with OCTET STRING chunks (what KMS sends; the encoder writes one chunk) or primitive.
    """

    subject_key_identifier: bytes
    encrypted_key: bytes
    iv: bytes
    encrypted_content: bytes
    constructed_content: bool = True

    def __post_init__(self) -> None:
        if len(self.iv) != 16:
            raise ValueError("the AES-CBC IV is 16 bytes")
        if not self.encrypted_key:
            raise ValueError("encrypted_key is empty")
        if not self.subject_key_identifier:
            raise ValueError("subject_key_identifier is empty")
        if not self.encrypted_content or len(self.encrypted_content) % 16:
            raise ValueError("AES-CBC content is a non-empty multiple of 16 bytes")

    def to_bytes(self) -> bytes:
        """The exact indefinite-length BER layout of spec 4.4."""
        ktri = _tlv(0x30, b"\x02\x01\x02" + _tlv(0x80, self.subject_key_identifier) + _OAEP_SHA256_ALG
                    + _tlv(0x04, self.encrypted_key))
        recipient_infos = _tlv(0x31, ktri)
        content_alg = _tlv(0x30, _OID_AES256_CBC + _tlv(0x04, self.iv))
        if self.constructed_content:
            content = b"\xa0\x80" + _tlv(0x04, self.encrypted_content) + _EOC
        else:
            content = _tlv(0x80, self.encrypted_content)
        encrypted_content_info = b"\x30\x80" + _OID_DATA + content_alg + content + _EOC
        enveloped = b"\x30\x80" + b"\x02\x01\x02" + recipient_infos + encrypted_content_info + _EOC
        return b"\x30\x80" + _OID_ENVELOPED_DATA + b"\xa0\x80" + enveloped + _EOC + _EOC

    @classmethod
    def from_bytes(cls, data: bytes) -> EnvelopedData:
        if not isinstance(data, bytes | bytearray):
            raise TypeError("data must be bytes")
        data = bytes(data)
        if len(data) > MAX_ENVELOPE_SIZE:
            raise CMSFormatError(f"envelope is {len(data)} bytes, at most {MAX_ENVELOPE_SIZE} accepted")
        top = _read(data, 0, len(data))
        if top.next != len(data):
            raise CMSFormatError(f"{len(data) - top.next} trailing byte(s) after the ContentInfo")
        _expect(data, top, 0x30, "ContentInfo")
        ci = _children(data, top)
        if len(ci) != 2:
            raise CMSFormatError("ContentInfo must hold a content type and [0] content")
        if data[_header_start(data, ci[0]):ci[0].next] != _OID_ENVELOPED_DATA:
            raise CMSFormatError("content type is not id-envelopedData")
        explicit = _children(data, _expect(data, ci[1], 0xA0, "ContentInfo.content"))
        if len(explicit) != 1:
            raise CMSFormatError("ContentInfo [0] must hold exactly one EnvelopedData")
        env = _children(data, _expect(data, explicit[0], 0x30, "EnvelopedData"))
        # spec 4.4: version 2, RecipientInfos, EncryptedContentInfo (no originatorInfo, no unprotectedAttrs)
        if len(env) != 3:
            raise CMSFormatError("EnvelopedData must hold version, recipientInfos, encryptedContentInfo only")
        if _small_int(data, env[0], "EnvelopedData.version") != 2:
            raise CMSFormatError("EnvelopedData version is not 2")
        recipients = _children(data, _expect(data, env[1], 0x31, "RecipientInfos"))
        if len(recipients) != 1:
            raise CMSFormatError(f"expected exactly one recipient, got {len(recipients)}")
        ktri = _children(data, _expect(data, recipients[0], 0x30, "KeyTransRecipientInfo"))
        if len(ktri) != 4:
            raise CMSFormatError("KeyTransRecipientInfo must hold version, rid, algorithm, encryptedKey")
        if _small_int(data, ktri[0], "KeyTransRecipientInfo.version") != 2:
            raise CMSFormatError("KeyTransRecipientInfo version is not 2 (rid must be a subjectKeyIdentifier)")
        _expect(data, ktri[1], 0x80, "rid [0] subjectKeyIdentifier")
        ski = data[ktri[1].start:ktri[1].end]
        if ktri[2].indefinite or data[_header_start(data, ktri[2]):ktri[2].next] != _OAEP_SHA256_ALG:
            raise CMSFormatError("key encryption algorithm is not RSAES-OAEP with SHA-256 and MGF1-SHA-256")
        _expect(data, ktri[3], 0x04, "encryptedKey")
        encrypted_key = data[ktri[3].start:ktri[3].end]
        eci = _children(data, _expect(data, env[2], 0x30, "EncryptedContentInfo"))
        if len(eci) != 3:
            raise CMSFormatError("EncryptedContentInfo must hold type, algorithm and [0] content")
        if eci[0].indefinite or data[_header_start(data, eci[0]):eci[0].next] != _OID_DATA:
            raise CMSFormatError("content type is not id-data")
        alg = _children(data, _expect(data, eci[1], 0x30, "contentEncryptionAlgorithm"))
        if len(alg) != 2 or alg[0].indefinite or data[_header_start(data, alg[0]):alg[0].next] != _OID_AES256_CBC:
            raise CMSFormatError("content encryption algorithm is not aes256-CBC")
        _expect(data, alg[1], 0x04, "aes256-CBC IV")
        iv = data[alg[1].start:alg[1].end]
        if len(iv) != 16:
            raise CMSFormatError(f"the AES-CBC IV is {len(iv)} bytes, expected 16")
        content_el = eci[2]
        if content_el.tag == 0x80:
            content = data[content_el.start:content_el.end]
            constructed = False
        elif content_el.tag == 0xA0:
            chunks = []
            for chunk in _children(data, content_el):
                _expect(data, chunk, 0x04, "encryptedContent chunk")
                chunks.append(data[chunk.start:chunk.end])
            content = b"".join(chunks)
            constructed = True
        else:
            raise CMSFormatError(f"encryptedContent: expected tag 0x80 or 0xa0, got 0x{content_el.tag:02x}")
        if not content or len(content) % 16:
            raise CMSFormatError("AES-CBC content is not a non-empty multiple of 16 bytes")
        if not encrypted_key or not ski:
            raise CMSFormatError("empty encryptedKey or subjectKeyIdentifier")
        return cls(ski, encrypted_key, iv, content, constructed)


def subject_key_identifier(spki_der: bytes) -> bytes:
    """spec 4.4: KMS identifies the recipient by SHA-256 of its DER SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der).digest()


def _oaep() -> asym_padding.OAEP:
    return asym_padding.OAEP(mgf=asym_padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def seal(content: bytes, recipient: rsa.RSAPublicKey, *, content_key: bytes, iv: bytes) -> EnvelopedData:
    """Encrypt ``content`` to ``recipient`` the way KMS does: AES-256-CBC/PKCS#7 under ``content_key``, the key
    wrapped with RSAES-OAEP-SHA-256."""
    if len(content_key) != 32:
        raise ValueError("content_key is 32 bytes (AES-256)")
    padder = padding.PKCS7(128).padder()
    padded = padder.update(content) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    spki = recipient.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return EnvelopedData(subject_key_identifier(spki), recipient.encrypt(content_key, _oaep()), iv, ciphertext)


def open_envelope(envelope: EnvelopedData | bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """spec 4.4 client decryption: unwrap the AES key with RSA-OAEP-SHA-256, decrypt, strip PKCS#7."""
    env = envelope if isinstance(envelope, EnvelopedData) else EnvelopedData.from_bytes(envelope)
    try:
        key = private_key.decrypt(env.encrypted_key, _oaep())
    except ValueError as exc:
        raise CMSFormatError("the content key does not decrypt with this private key") from exc
    if len(key) != 32:
        raise CMSFormatError(f"the content key is {len(key)} bytes, expected 32 (AES-256)")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(env.iv)).decryptor()
    padded = decryptor.update(env.encrypted_content) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise CMSFormatError("the content's PKCS#7 padding is invalid") from exc
