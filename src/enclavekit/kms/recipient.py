"""``Recipient``: attested requests from Nitro enclaves (spec §4.2, §4.3, §4.4, §4.5).

Decrypt, GenerateDataKey, GenerateDataKeyPair and GenerateRandom accept
``{"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "<base64>"}``.  The service then:

1. verifies the document with :func:`enclavekit.attestation.verifier.verify` against the configured trust roots
   (the local PKI root by default; AWS Root-G1 when configured) as of the request time;
2. requires ``public_key`` to be the DER SubjectPublicKeyInfo of an RSA key of 2048..4096 bits;
3. feeds the verified PCRs to the key policy as ``kms:RecipientAttestation:ImageSha384`` (PCR0) and
   ``kms:RecipientAttestation:PCR0`` … ``PCR31`` (lowercase hex, spec 4.5);
4. answers ``CiphertextForRecipient`` (:func:`seal_for_recipient`, the CMS envelope of spec 4.4) and no plaintext.

Errors (AWS does not document them, spec 4.3): a malformed ``Recipient`` or document, a document that does not
verify (signature, chain, certificate validity, untrusted root), or a public key that is not RSA SPKI are
``ValidationException``; freshness failures (beyond AWS, off by default: ``max_attestation_age`` and single-use
nonces) are ``AccessDeniedException``, like a failed condition key.

Debug-mode documents (PCR0, PCR1, PCR2 all zero) are accepted, as AWS KMS accepts them: the verifier policy
runs with ``unsafe_allow_debug=True``.  They carry no measurement, so a key policy with a realistic
``kms:RecipientAttestation:ImageSha384``/``PCR0`` condition denies them (spec 4.5), while a key without such
conditions serves them: that is AWS's behaviour, and the reason to always write PCR conditions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavekit.attestation.policy import AttestationPolicy
from enclavekit.attestation.verifier import DEFAULT_CACHE, ChainCache, TrustRoot, verify
from enclavekit.errors import AttestationFormatError, AttestationPolicyError, VerificationError
from enclavekit.formats.cms import seal
from enclavekit.kms.types import KMSError, RecipientContext

__all__ = [
    "KEY_ENCRYPTION_ALGORITHM",
    "MAX_ATTESTATION_DOCUMENT",
    "RecipientInfo",
    "VerifiedRecipient",
    "RecipientVerifier",
    "parse_recipient",
    "condition_keys",
    "seal_for_recipient",
]

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
MAX_ATTESTATION_DOCUMENT = 262144     # RecipientInfo.AttestationDocument: blob 1..262144 (API model)
_RSA_BITS = (2048, 4096)
_CONDITION_PREFIX = "kms:RecipientAttestation:"


@dataclass(frozen=True)
class RecipientInfo:
    key_encryption_algorithm: str
    attestation_document: bytes


def _invalid(message: str) -> KMSError:
    return KMSError("ValidationException", message)


def parse_recipient(value: Any) -> RecipientInfo:
    """The request's ``Recipient`` member; both members are required (sdk-c RecipientRequest.md)."""
    if not isinstance(value, dict):
        raise KMSError("SerializationException", "Recipient must be an object")
    unknown = set(value) - {"KeyEncryptionAlgorithm", "AttestationDocument"}
    if unknown:
        raise _invalid(f"Recipient has an unknown member '{sorted(unknown)[0]}'")
    algorithm = value.get("KeyEncryptionAlgorithm")
    if algorithm is None:
        raise _invalid("1 validation error detected: Value null at 'recipient.keyEncryptionAlgorithm' failed to "
                       "satisfy constraint: Member must not be null")
    if algorithm != KEY_ENCRYPTION_ALGORITHM:
        raise _invalid(f"1 validation error detected: Value '{str(algorithm)[:64]}' at "
                       "'recipient.keyEncryptionAlgorithm' failed to satisfy constraint: Member must satisfy enum "
                       f"value set: [{KEY_ENCRYPTION_ALGORITHM}]")
    encoded = value.get("AttestationDocument")
    if encoded is None:
        raise _invalid("1 validation error detected: Value null at 'recipient.attestationDocument' failed to "
                       "satisfy constraint: Member must not be null")
    if not isinstance(encoded, str):
        raise KMSError("SerializationException", "Recipient.AttestationDocument must be a base64 string")
    if len(encoded) > (MAX_ATTESTATION_DOCUMENT + 2) // 3 * 4:
        raise _invalid("1 validation error detected: Value at 'recipient.attestationDocument' failed to satisfy "
                       f"constraint: Member must have length less than or equal to {MAX_ATTESTATION_DOCUMENT}")
    try:
        document = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise KMSError("SerializationException", "Recipient.AttestationDocument is not valid base64") from None
    if not 1 <= len(document) <= MAX_ATTESTATION_DOCUMENT:
        raise _invalid("1 validation error detected: Value at 'recipient.attestationDocument' failed to satisfy "
                       f"constraint: Member must have length between 1 and {MAX_ATTESTATION_DOCUMENT}")
    return RecipientInfo(algorithm, document)


@dataclass(frozen=True)
class VerifiedRecipient:
    context: RecipientContext
    public_key: rsa.RSAPublicKey
    usable_until: datetime          # after this the document no longer verifies (nonce records may expire)

    @property
    def nonce_digest(self) -> bytes | None:
        nonce = self.context.nonce
        return None if nonce is None else hashlib.sha256(b"enclavekit-kms-nonce\0" + nonce).digest()


class RecipientVerifier:
    """Verifies ``Recipient`` documents against ``trust_roots`` (local root by default, AWS Root-G1 if passed)."""

    def __init__(self, trust_roots: Sequence[TrustRoot | x509.Certificate], *,
                 max_attestation_age: timedelta | None = None, cache: ChainCache | None = DEFAULT_CACHE) -> None:
        if not trust_roots:
            raise ValueError("at least one trust root is required")
        self.trust_roots = list(trust_roots)
        self.max_attestation_age = max_attestation_age
        self.cache = cache
        # spec 4.5: AWS KMS accepts debug-mode documents; their zero PCRs fail any realistic PCR condition
        self.policy = AttestationPolicy(unsafe_allow_debug=True, max_age=max_attestation_age)

    def verify(self, info: RecipientInfo, now: datetime) -> VerifiedRecipient:
        try:
            verified = verify(info.attestation_document, self.trust_roots, now, self.policy, cache=self.cache)
        except AttestationFormatError as exc:
            raise _invalid(f"The attestation document is malformed ({exc.rule})") from exc
        except AttestationPolicyError as exc:
            raise KMSError("AccessDeniedException", f"The attestation document is not fresh enough ({exc.rule}: "
                           f"{exc.message})") from exc
        except VerificationError as exc:
            raise _invalid(f"The attestation document is not valid ({exc.rule}): {exc.message}") from exc
        # spec 4.3: public_key must be the DER SubjectPublicKeyInfo of an RSA key
        if verified.public_key is None:
            raise _invalid("The attestation document has no public_key; Recipient needs an RSA public key")
        try:
            key = serialization.load_der_public_key(verified.public_key)
        except (ValueError, UnsupportedAlgorithm):
            raise _invalid("The attestation document's public_key is not a DER SubjectPublicKeyInfo") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise _invalid("The attestation document's public_key is not an RSA key")
        if not _RSA_BITS[0] <= key.key_size <= _RSA_BITS[1]:
            raise _invalid(f"The attestation document's RSA key has {key.key_size} bits; 2048 to 4096 accepted")
        spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if spki != verified.public_key:
            raise _invalid("The attestation document's public_key is not DER-encoded")
        pcrs = {i: v.hex() for i, v in sorted(verified.pcrs.items())}
        context = RecipientContext(module_id=verified.module_id, image_sha384=pcrs.get(0, ""), pcrs=pcrs,
                                   public_key_spki=verified.public_key, nonce=verified.nonce,
                                   timestamp_ms=verified.timestamp_ms)
        leaf = x509.load_der_x509_certificate(verified.certificate)
        usable_until = leaf.not_valid_after_utc
        if self.max_attestation_age is not None:
            usable_until = min(usable_until, verified.timestamp + self.max_attestation_age
                               + self.policy.max_clock_skew)
        return VerifiedRecipient(context, key, usable_until.astimezone(UTC))


def condition_keys(context: RecipientContext) -> dict[str, str]:
    """spec 4.5: ImageSha384 = PCR0, and PCR<N> for every PCR of the document (lowercase hex)."""
    keys = {f"{_CONDITION_PREFIX}PCR{i}": v for i, v in context.pcrs.items()}
    if context.image_sha384:
        keys[f"{_CONDITION_PREFIX}ImageSha384"] = context.image_sha384
    return keys


def seal_for_recipient(plaintext: bytes, recipient: VerifiedRecipient, rng: Callable[[int], bytes]) -> bytes:
    """``CiphertextForRecipient``: the spec 4.4 envelope with a fresh AES-256 key and IV from ``rng``."""
    return seal(plaintext, recipient.public_key, content_key=rng(32), iv=rng(16)).to_bytes()
