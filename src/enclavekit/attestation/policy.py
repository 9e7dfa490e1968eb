"""Attestation policies: what an authentic document must also say to be accepted.

A policy is data, parsed once and then applied.  It is checked only after the signature and the certificate
chain (:mod:`enclavekit.attestation.verifier`), so a forged document always fails with E71 first.  Every
failure raises :class:`~enclavekit.errors.AttestationPolicyError` (E72) whose ``rule`` names the check:

| rule             | check                                                                        |
|------------------|------------------------------------------------------------------------------|
| ``pcrs-missing-boot`` | PCR0, PCR1 and PCR2 present (an enclave's document always has them; spec 2.5) |
| ``debug-mode``   | PCR0, PCR1, PCR2 all zero (debug enclave) refused unless ``unsafe_allow_debug`` |
| ``pcrs``         | the document matches ALL entries of ANY of ``pcr_sets`` (staged rollouts)     |
| ``nonce``        | nonce equals ``nonce``                                                        |
| ``nonce-length`` | nonce present and at least ``min_nonce_length`` bytes                         |
| ``max-age``      | ``at_time - timestamp <= max_age``                                            |
| ``timestamp-future`` | with ``max_age``: timestamp not later than ``at_time + max_clock_skew``  |
| ``public-key``   | public_key equals ``public_key``                                              |
| ``user-data``    | user_data equals ``user_data``                                                |
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from enclavekit.errors import AttestationPolicyError

__all__ = ["AttestationPolicy", "PCRSet", "parse_pcr_value", "DEFAULT_POLICY", "BOOT_PCRS"]

PCRSet = Mapping[int, bytes]
# spec 2.5: the image measurements; PCRs 0-15 are locked at boot, so every enclave document carries these
BOOT_PCRS = (0, 1, 2)


class _Document(Protocol):
    @property
    def pcrs(self) -> Mapping[int, bytes]: ...
    @property
    def timestamp(self) -> datetime: ...
    @property
    def nonce(self) -> bytes | None: ...
    @property
    def public_key(self) -> bytes | None: ...
    @property
    def user_data(self) -> bytes | None: ...
    @property
    def debug_mode(self) -> bool: ...


def parse_pcr_value(value: bytes | str) -> bytes:
    """A PCR value given as bytes or hex text (32, 48 or 64 bytes).  ``0x`` prefixes are refused (spec 6.17)."""
    if isinstance(value, str):
        if value[:2].lower() == "0x":
            raise ValueError("PCR values are plain hex without a 0x prefix")
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise ValueError("PCR value is not valid hex") from None
    if not isinstance(value, bytes | bytearray):
        raise TypeError("PCR values are bytes or hex strings")
    if len(value) not in (32, 48, 64):
        raise ValueError(f"a PCR value is 32, 48 or 64 bytes, got {len(value)}")
    return bytes(value)


def _fail(rule: str, message: str) -> AttestationPolicyError:
    return AttestationPolicyError(message, rule=rule, details={"rule": rule})


@dataclass(frozen=True)
class AttestationPolicy:
    """What an authentic document must also satisfy.  The default accepts any non-debug document."""

    pcr_sets: tuple[PCRSet, ...] = ()
    nonce: bytes | None = None
    min_nonce_length: int = 0
    max_age: timedelta | None = None
    public_key: bytes | None = None
    user_data: bytes | None = None
    unsafe_allow_debug: bool = False
    max_clock_skew: timedelta = field(default=timedelta(seconds=60))

    def __post_init__(self) -> None:
        sets = []
        for pcr_set in self.pcr_sets:
            if not isinstance(pcr_set, Mapping) or not pcr_set:
                raise ValueError("each PCR set is a non-empty mapping index -> value")
            normalized: dict[int, bytes] = {}
            for index, value in pcr_set.items():
                if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 32:
                    raise ValueError(f"PCR index {index!r} is not in 0..31")
                normalized[index] = parse_pcr_value(value)
            sets.append(normalized)
        object.__setattr__(self, "pcr_sets", tuple(sets))
        if self.min_nonce_length < 0:
            raise ValueError("min_nonce_length must be >= 0")
        if self.max_age is not None and self.max_age < timedelta(0):
            raise ValueError("max_age must be >= 0")

    @classmethod
    def expect_pcrs(cls, *sets: Mapping[int, bytes | str], **kwargs: object) -> AttestationPolicy:
        """Policy accepting documents that match any of ``sets`` (each ``{index: bytes or hex}``)."""
        return cls(pcr_sets=tuple(sets), **kwargs)  # type: ignore[arg-type]

    def check(self, document: _Document, at_time: datetime) -> None:
        """Raise :class:`AttestationPolicyError` naming the first rule ``document`` breaks."""
        # spec 2.5: debug mode shows as PCR0-2 all zero; a document without them would slip past that test,
        # and no enclave document lacks them, so their absence is refused before anything else
        missing = [i for i in BOOT_PCRS if i not in document.pcrs]
        if missing:
            raise _fail("pcrs-missing-boot", "the document lacks the boot measurement(s) "
                        f"{', '.join(f'PCR{i}' for i in missing)}; an enclave's document always has PCR0-2")
        if document.debug_mode and not self.unsafe_allow_debug:
            raise _fail("debug-mode", "the document comes from a debug-mode enclave (PCR0, PCR1 and PCR2 are all "
                        "zero); its measurements prove nothing")
        if self.pcr_sets and not any(self._matches(s, document.pcrs) for s in self.pcr_sets):
            raise _fail("pcrs", f"the document's PCRs match none of the {len(self.pcr_sets)} accepted set(s)")
        if self.nonce is not None and (
                document.nonce is None or not hmac.compare_digest(document.nonce, self.nonce)):
            raise _fail("nonce", "the document's nonce is not the expected one")
        if self.min_nonce_length:
            got = 0 if document.nonce is None else len(document.nonce)
            if got < self.min_nonce_length:
                raise _fail("nonce-length", f"the nonce is {got} bytes, at least {self.min_nonce_length} required")
        if self.max_age is not None:
            if document.timestamp > at_time + self.max_clock_skew:
                raise _fail("timestamp-future",
                            f"the document is dated {document.timestamp.isoformat()}, after {at_time.isoformat()}")
            age = at_time - document.timestamp
            if age > self.max_age:
                raise _fail("max-age", f"the document is {age.total_seconds():.3f} s old, at most "
                            f"{self.max_age.total_seconds():g} s allowed")
        if self.public_key is not None and document.public_key != self.public_key:
            raise _fail("public-key", "the document's public_key is not the expected one")
        if self.user_data is not None and document.user_data != self.user_data:
            raise _fail("user-data", "the document's user_data is not the expected one")

    @staticmethod
    def _matches(expected: PCRSet, pcrs: Mapping[int, bytes]) -> bool:
        return all(index in pcrs and hmac.compare_digest(pcrs[index], value) for index, value in expected.items())


DEFAULT_POLICY = AttestationPolicy()
