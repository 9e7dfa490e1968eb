"""ECDSA with raw ``r || s`` signatures, as COSE (RFC 9053 §2.1) stores them."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from enclavekit.formats.cose import ALGORITHMS, COSESign1

__all__ = ["alg_for_key", "sign_raw", "verify_raw", "sign_cose", "verify_cose"]

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}
_CURVE_ALG = {"secp256r1": -7, "secp384r1": -35, "secp521r1": -36}


def alg_for_key(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> int:
    """COSE alg for an EC key's curve (P-256 → ES256, P-384 → ES384, P-521 → ES512)."""
    try:
        return _CURVE_ALG[key.curve.name]
    except KeyError:
        raise ValueError(f"unsupported curve {key.curve.name}") from None


def sign_raw(key: ec.EllipticCurvePrivateKey, alg: int, message: bytes) -> bytes:
    _, hash_name, size = ALGORITHMS[alg]
    der = key.sign(message, ec.ECDSA(_HASHES[hash_name]()))
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def verify_raw(key: ec.EllipticCurvePublicKey, alg: int, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` (raw r||s) is valid.  Callers turn False into their own typed error."""
    _, hash_name, size = ALGORITHMS[alg]
    if len(signature) != 2 * size or alg_for_key(key) != alg:
        return False
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(_HASHES[hash_name]()))
    except InvalidSignature:
        return False
    return True


def sign_cose(key: ec.EllipticCurvePrivateKey, payload: bytes) -> COSESign1:
    alg = alg_for_key(key)
    unsigned = COSESign1.create(alg, payload)
    return COSESign1(unsigned.protected, {}, payload, sign_raw(key, alg, unsigned.sig_structure()))


def verify_cose(message: COSESign1, key: ec.EllipticCurvePublicKey) -> bool:
    alg = message.algorithm()
    return verify_raw(key, alg, message.sig_structure(), message.signature)
