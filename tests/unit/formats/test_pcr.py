"""PCR formulas (spec §2) and the vectors of spec §6 items 7 and 8."""

from __future__ import annotations

import hashlib

import pytest

from enclavekit.formats.pcr import (
    EMPTY_PCR,
    HASH_ALGORITHM,
    ZERO_PCR,
    Measurements,
    extend,
    pcr3_role_arn,
    pcr4_instance_id,
    pcr8_certificate,
    pcr_from_digest,
    pcr_of_content,
)


def test_empty_content_pcr() -> None:
    # spec §6 item 8: PCR2 of every single-ramdisk EIF
    assert pcr_of_content(b"") == EMPTY_PCR
    assert EMPTY_PCR.hex() == (
        "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c10edb30948c90ba67310f7b964fc500a")


def test_pcr3_role_arn_user_guide_example() -> None:
    assert pcr3_role_arn("arn:aws:iam::123456789012:role/Webserver").hex() == (
        "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6")


def test_pcr4_instance_id_user_guide_example() -> None:
    assert pcr4_instance_id("i-1234567890abcdef0").hex() == (
        "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0")


def test_content_pcr_is_one_extend_of_the_digest() -> None:
    digest = hashlib.sha384(b"abc").digest()
    assert pcr_of_content(b"abc") == hashlib.sha384(ZERO_PCR + digest).digest() == pcr_from_digest(digest)
    assert pcr8_certificate(b"der") == pcr_of_content(b"der")
    assert extend(ZERO_PCR, b"x") == hashlib.sha384(bytes(48) + b"x").digest()


@pytest.mark.parametrize("bad", [b"", bytes(47), bytes(49)])
def test_wrong_sizes_are_caller_bugs(bad: bytes) -> None:
    with pytest.raises(ValueError):
        pcr_from_digest(bad)
    with pytest.raises(ValueError):
        extend(bad, b"")


def test_measurements_json_order_and_pcr8() -> None:
    m = Measurements(bytes(48), b"\x01" * 48, b"\x02" * 48)
    assert list(m.to_json()) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert m.to_json()["HashAlgorithm"] == HASH_ALGORITHM == "Sha384 { ... }"
    signed = Measurements(bytes(48), bytes(48), bytes(48), b"\x08" * 48)
    assert list(signed.to_json()) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert signed.to_json()["PCR8"] == "08" * 48
    with pytest.raises(ValueError):
        Measurements(bytes(47), bytes(48), bytes(48))
