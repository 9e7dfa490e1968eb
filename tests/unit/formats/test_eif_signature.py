"""Signature section and PCRInfo CBOR (spec §1.9) with the cbor.rs vectors of spec §6 item 1.

The expected hex below is written out by hand from the encoding rules of §1.9 (map head, text keys in field
order, ``Vec<u8>`` as an array of uints: ``00``-``17`` for bytes < 24, ``18 nn`` otherwise), not produced by the
encoder under test.
"""

from __future__ import annotations

import pytest

from enclavekit.errors import EIFFormatError
from enclavekit.formats import cbor
from enclavekit.formats.eif_signature import EIFSignature, PCRInfo, PCRSignature

# a2                                   map(2)
#   6e 72656769737465725f696e646578    "register_index"
#   00                                 0
#   6e 72656769737465725f76616c7565    "register_value"
#   98 30                              array(48)
#     00 01 ... 17                     bytes 0x00..0x17 as themselves
#     18 18 18 19 ... 18 2f            bytes 0x18..0x2f as 18 nn
PCR_INFO_HEX = (
    "a2"
    "6e72656769737465725f696e646578"
    "00"
    "6e72656769737465725f76616c7565"
    "9830"
    "000102030405060708090a0b0c0d0e0f1011121314151617"
    "18181819181a181b181c181d181e181f1820182118221823182418251826182718281829182a182b182c182d182e182f"
)

COSE_STUB = bytes.fromhex("8443a10126a041004100")  # 10 bytes: [h'a10126', {}, h'00', h'00']
# 81                                        array(1)
#   a2                                      map(2)
#     73 7369676e696e675f6365727469666963617465   "signing_certificate"
#     84 184d 1849 1849 1842                "MIIB" = 4d 49 49 42, all >= 24
#     69 7369676e6174757265                 "signature"
#     8a 1884 1843 18a1 01 1826 18a0 1841 00 1841 00
SECTION_HEX = (
    "81"
    "a2"
    "737369676e696e675f6365727469666963617465"
    "84184d184918491842"
    "697369676e6174757265"
    "8a1884184318a101182618a0184100184100"
)


def test_pcr_info_vector() -> None:
    info = PCRInfo(0, bytes(range(48)))
    assert info.to_bytes().hex() == PCR_INFO_HEX
    assert PCRInfo.from_bytes(bytes.fromhex(PCR_INFO_HEX)) == info


def test_signature_section_vector() -> None:
    section = EIFSignature((PCRSignature(b"MIIB", COSE_STUB),))
    assert section.to_bytes().hex() == SECTION_HEX
    assert EIFSignature.from_bytes(bytes.fromhex(SECTION_HEX)) == section
    assert section.first.signing_certificate == b"MIIB"


def test_round_trip_long_arrays() -> None:
    pem = bytes(range(256)) * 5
    section = EIFSignature((PCRSignature(pem, b"\x00" * 300), PCRSignature(b"x", b"y")))
    assert EIFSignature.from_bytes(section.to_bytes()) == section


@pytest.mark.parametrize("value", [
    {"register_index": 0},
    {"register_index": 0, "register_value": list(range(48)), "x": 1},
    {"register_index": "0", "register_value": list(range(48))},
    {"register_index": 2**31, "register_value": list(range(48))},
    {"register_index": 0, "register_value": list(range(47))},
    {"register_index": 0, "register_value": [256] * 48},
    {"register_index": 0, "register_value": bytes(48)},  # a byte string is not serde's Vec<u8>
    [0, list(range(48))],
])
def test_pcr_info_malformed(value: object) -> None:
    with pytest.raises(EIFFormatError):
        PCRInfo.from_bytes(cbor.encode(value))


def test_pcr_info_trailing_bytes() -> None:
    with pytest.raises(EIFFormatError, match="trailing"):
        PCRInfo.from_bytes(bytes.fromhex(PCR_INFO_HEX) + b"\x00")


@pytest.mark.parametrize("value", [
    [],
    {},
    [{"signing_certificate": [1]}],
    [{"signing_certificate": [1], "signature": [1], "extra": []}],
    [{"signing_certificate": b"\x01", "signature": [1]}],
    [{"signing_certificate": [1], "signature": [-1]}],
    ["x"],
])
def test_signature_section_malformed(value: object) -> None:
    with pytest.raises(EIFFormatError):
        EIFSignature.from_bytes(cbor.encode(value))


def test_signature_section_not_cbor() -> None:
    with pytest.raises(EIFFormatError):
        EIFSignature.from_bytes(b"\x81")


def test_signature_section_too_large() -> None:
    with pytest.raises(EIFFormatError, match="more than"):
        EIFSignature.from_bytes(b"\x80" * 40000)


def test_register_index_range_is_checked_on_construction() -> None:
    with pytest.raises(ValueError):
        PCRInfo(2**31, bytes(48))
