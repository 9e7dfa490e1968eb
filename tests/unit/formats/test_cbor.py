"""The strict CBOR codec: exact encodings and one negative test per decoding rule."""

from __future__ import annotations

import pytest

from enclavekit.errors import CBORError, FormatError
from enclavekit.formats import cbor


@pytest.mark.parametrize(
    ("value", "hexstr"),
    [
        (0, "00"), (23, "17"), (24, "1818"), (255, "18ff"), (256, "190100"), (65536, "1a00010000"),
        (2**32, "1b0000000100000000"), (-1, "20"), (-35, "3822"), (b"", "40"), (b"\x01\x02", "420102"),
        ("a", "6161"), ([], "80"), ({}, "a0"), (None, "f6"), (True, "f5"), (False, "f4"),
        ({1: -35}, "a1013822"), (cbor.Tag(18, []), "d280"),
        (cbor.IndefiniteMap({"a": 1}), "bf616101ff"), (cbor.IndefiniteArray([1]), "9f01ff"),
    ],
)
def test_encode_decode_exact(value: object, hexstr: str) -> None:
    assert cbor.encode(value).hex() == hexstr
    decoded = cbor.decode(bytes.fromhex(hexstr))
    assert decoded == value


def test_dict_keeps_insertion_order_not_canonical_order() -> None:
    assert cbor.encode({"b": 1, "a": 2}).hex() == "a2616201616102"


def test_uint_array_matches_serde_vec_u8() -> None:
    assert cbor.encode_uint_array(bytes([0, 23, 24, 255])).hex() == "8400171818" + "18ff"
    assert cbor.decode_uint_array(cbor.decode(cbor.encode_uint_array(b"\x00\xff")), "x") == b"\x00\xff"


def test_indefinite_map_offsets_reported() -> None:
    result = cbor.decode_prefix(bytes.fromhex("bf616101ff"))
    assert result.indefinite_maps == [0]
    assert result.end == 5


@pytest.mark.parametrize(
    ("hexstr", "fragment"),
    [
        ("0000", "trailing"),                 # trailing bytes
        ("a2616101616102", "duplicate"),      # duplicate key
        ("5a00000100", "truncated"),          # declared length past the end
        ("9b00000000ffffffff", "truncated"),  # absurd array count, no allocation
        ("1c", "reserved"),                   # reserved additional information
        ("ff", "break"),                      # stray break
        ("1f", "indefinite"),                 # indefinite integer
        ("62c328", "UTF-8"),                  # invalid UTF-8 in text
        ("a18001", "key of type"),            # array as a map key
        ("", "truncated"),                    # empty input
        ("f0", "simple"),                     # unassigned simple value
        ("5f4101ff", ""),                     # a valid indefinite bstr: decodes
    ],
)
def test_decoder_rules(hexstr: str, fragment: str) -> None:
    data = bytes.fromhex(hexstr)
    if not fragment:
        assert cbor.decode(data) == b"\x01"
        return
    with pytest.raises(CBORError, match=fragment):
        cbor.decode(data)


def test_depth_limit() -> None:
    data = b"\x81" * 40 + b"\x00"
    with pytest.raises(CBORError, match="deeper"):
        cbor.decode(data)


def test_cbor_error_is_a_format_error_with_a_code() -> None:
    with pytest.raises(FormatError) as info:
        cbor.decode(b"\x00\x00")
    assert info.value.code == "E67"
