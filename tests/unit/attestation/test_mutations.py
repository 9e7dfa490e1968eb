"""Every single-byte change anywhere in every real document is refused with a typed error (fixtures README).

Each position is changed twice, once with xor 0x01 (one bit) and once with xor 0xFF (every bit): 4 documents,
~37 000 mutations.  The shared chain cache stays on, as in production: it must not hide a mutated certificate,
because it is keyed on exact bytes.
"""

from __future__ import annotations

import pytest
from attestation_helpers import DOCS, fixture_bytes, verify_at

from enclavekit.attestation.policy import AttestationPolicy
from enclavekit.attestation.verifier import AWS_ROOT_G1, verify
from enclavekit.errors import FormatError, VerificationError

ALLOW_DEBUG = AttestationPolicy(unsafe_allow_debug=True)


@pytest.mark.parametrize("mask", [0x01, 0xFF])
@pytest.mark.parametrize("name", DOCS)
def test_every_single_byte_mutation_is_refused(name: str, mask: int) -> None:
    data = fixture_bytes(name)
    at = verify_at(name)
    verify(data, [AWS_ROOT_G1], at, ALLOW_DEBUG)  # the original passes (and warms the cache)
    accepted = []
    refused = 0
    for position in range(len(data)):
        mutated = bytearray(data)
        mutated[position] ^= mask
        try:
            verify(bytes(mutated), [AWS_ROOT_G1], at, ALLOW_DEBUG)
        except (FormatError, VerificationError):
            refused += 1
        else:
            accepted.append(position)
    assert accepted == []
    assert refused == len(data)
