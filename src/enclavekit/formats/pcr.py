"""PCR arithmetic for enclave images (spec eif-pcr-cli §2).

Every EIF PCR is one TPM-style extend of an all-zero 48-byte register::

    PCR = SHA384(48 zero bytes || SHA384(content))          # PCR0/1/2/8 (§2.1): extend with the content *digest*
    PCR = SHA384(48 zero bytes || utf8(string))              # PCR3/4 (§2.3): extend with the *raw* string

PCR banks (the NSM's registers, locking, ``extend`` requests) live with the NSM; this module only holds the pure
formulas and the :class:`Measurements` record that ``build-enclave``, ``describe-eif`` and ``sign-eif`` print.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = [
    "PCR_SIZE",
    "ZERO_PCR",
    "EMPTY_PCR",
    "HASH_ALGORITHM",
    "HASH_ALGORITHM_SHA2_0_10",
    "extend",
    "pcr_from_digest",
    "pcr_of_content",
    "pcr3_role_arn",
    "pcr4_instance_id",
    "pcr8_certificate",
    "Measurements",
]

PCR_SIZE = 48
ZERO_PCR = bytes(PCR_SIZE)
# §2.2: extend of SHA384(b"") - PCR2 of every EIF with a single ramdisk.
EMPTY_PCR = bytes.fromhex(
    "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c10edb30948c90ba67310f7b964fc500a"
)
# §2.4: Rust's Debug rendering of the sha2 0.9 hasher, what nitro-cli <= 1.4 and the AWS docs show.
HASH_ALGORITHM = "Sha384 { ... }"
# §2.4: the rendering with sha2 0.10 (nitro-cli 1.5.0); selectable, never parse this field.
HASH_ALGORITHM_SHA2_0_10 = "Sha512_48 { .. }"


def extend(register: bytes, data: bytes) -> bytes:
    """One extend: ``SHA384(register || data)``.  ``register`` must be 48 bytes."""
    if len(register) != PCR_SIZE:
        raise ValueError(f"a PCR register is {PCR_SIZE} bytes, got {len(register)}")
    return hashlib.sha384(bytes(register) + bytes(data)).digest()


def pcr_from_digest(digest: bytes) -> bytes:
    """§2.1: the PCR of content whose SHA-384 is ``digest`` (48 bytes)."""
    if len(digest) != PCR_SIZE:
        raise ValueError(f"a SHA-384 digest is {PCR_SIZE} bytes, got {len(digest)}")
    return extend(ZERO_PCR, digest)


def pcr_of_content(content: bytes) -> bytes:
    """§2.1 / §2.6 ``pcr --input``: ``SHA384(0^48 || SHA384(content))``."""
    return pcr_from_digest(hashlib.sha384(content).digest())


def pcr3_role_arn(arn: str) -> bytes:
    """§2.3: PCR3 of an enclave whose parent instance has the IAM role ``arn`` (raw string, not pre-hashed)."""
    return extend(ZERO_PCR, arn.encode("utf-8"))


def pcr4_instance_id(instance_id: str) -> bytes:
    """§2.3: PCR4 of an enclave whose parent instance is ``instance_id`` (raw string, not pre-hashed)."""
    return extend(ZERO_PCR, instance_id.encode("utf-8"))


def pcr8_certificate(certificate_der: bytes) -> bytes:
    """§2.2: PCR8 = PCR of the signing certificate's DER encoding."""
    return pcr_of_content(certificate_der)


@dataclass(frozen=True)
class Measurements:
    """PCR0/1/2 (and PCR8 for a signed image) of an EIF, as raw 48-byte values."""

    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    pcr8: bytes | None = None
    hash_algorithm: str = HASH_ALGORITHM

    def __post_init__(self) -> None:
        for name in ("pcr0", "pcr1", "pcr2", "pcr8"):
            value = getattr(self, name)
            if value is not None and len(value) != PCR_SIZE:
                raise ValueError(f"{name} must be {PCR_SIZE} bytes, got {len(value)}")

    def to_json(self) -> dict[str, str]:
        """§2.2: ordered ``HashAlgorithm, PCR0, PCR1, PCR2[, PCR8]`` with lowercase hex values."""
        out = {
            "HashAlgorithm": self.hash_algorithm,
            "PCR0": self.pcr0.hex(),
            "PCR1": self.pcr1.hex(),
            "PCR2": self.pcr2.hex(),
        }
        if self.pcr8 is not None:
            out["PCR8"] = self.pcr8.hex()
        return out
