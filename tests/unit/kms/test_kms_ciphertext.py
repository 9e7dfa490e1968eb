"""The CiphertextBlob format: layout, AAD binding of header and encryption context, one negative test per rule."""

from __future__ import annotations

import contextlib
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import FormatError
from enclavekit.kms.ciphertext import (
    HEADER_SIZE,
    MAX_BLOB_SIZE,
    CiphertextBlob,
    CiphertextError,
    canonical_context,
    open_blob,
    seal_blob,
)

KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
MATERIAL = bytes(range(32))
IV = bytes(12)


def _blob(plaintext: bytes = b"hello", context: dict[str, str] | None = None, version: int = 3) -> bytes:
    return seal_blob(key_id=KEY_ID, material_version=version, material=MATERIAL, plaintext=plaintext,
                     context=context or {}, iv=IV).to_bytes()


def test_layout() -> None:
    data = _blob()
    assert data[0] == 1
    assert data[1:17] == uuid.UUID(KEY_ID).bytes
    assert data[17:21] == (3).to_bytes(4, "big")
    assert data[21:33] == IV
    assert len(data) == HEADER_SIZE + 5 + 16
    blob = CiphertextBlob.from_bytes(data)
    assert (blob.key_id, blob.material_version, blob.iv) == (KEY_ID, 3, IV)
    assert open_blob(blob, material=MATERIAL, context={}) == b"hello"


def test_largest_blob_fits_the_api_limit() -> None:
    assert len(_blob(b"x" * 4096)) <= MAX_BLOB_SIZE


def test_context_is_order_independent_and_binding() -> None:
    data = _blob(context={"a": "1", "b": "2"})
    blob = CiphertextBlob.from_bytes(data)
    assert open_blob(blob, material=MATERIAL, context={"b": "2", "a": "1"}) == b"hello"
    for wrong in ({}, {"a": "1"}, {"a": "1", "b": "3"}, {"a": "1", "b": "2", "c": ""}):
        with pytest.raises(CiphertextError):
            open_blob(blob, material=MATERIAL, context=wrong)


def test_canonical_context_is_unambiguous() -> None:
    assert canonical_context({}) == b"\x00\x00"
    assert canonical_context({"ab": "c"}) != canonical_context({"a": "bc"})


@pytest.mark.parametrize("index", [1, 17, 20, 21, 32, 33, -1])
def test_every_header_and_body_byte_is_authenticated(index: int) -> None:
    data = bytearray(_blob())
    data[index] ^= 0x01
    with pytest.raises(CiphertextError):
        blob = CiphertextBlob.from_bytes(bytes(data))
        open_blob(blob, material=MATERIAL, context={})


@pytest.mark.parametrize(("data", "fragment"), [
    (b"", "truncated"),
    (_blob()[:HEADER_SIZE + 16], "truncated"),
    (b"\x02" + _blob()[1:], "version"),
    (_blob()[:17] + b"\x00\x00\x00\x00" + _blob()[21:], "material version 0"),
    (b"\x01" + bytes(MAX_BLOB_SIZE), "at most"),
])
def test_parser_rules(data: bytes, fragment: str) -> None:
    with pytest.raises(CiphertextError, match=fragment):
        CiphertextBlob.from_bytes(data)


def test_wrong_material() -> None:
    with pytest.raises(CiphertextError):
        open_blob(CiphertextBlob.from_bytes(_blob()), material=bytes(32), context={})


def test_caller_bugs() -> None:
    with pytest.raises(ValueError):
        _blob(b"")
    with pytest.raises(ValueError):
        _blob(b"x" * 4097)
    with pytest.raises(ValueError):
        _blob(version=0)
    with pytest.raises(TypeError):
        CiphertextBlob.from_bytes("text")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_parser_raises_only_format_errors(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        CiphertextBlob.from_bytes(data)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
       st.integers(1, 2**32 - 1))
def test_round_trip(plaintext: bytes, context: dict[str, str], version: int) -> None:
    data = _blob(plaintext, context, version)
    blob = CiphertextBlob.from_bytes(data)
    assert blob.to_bytes() == data and blob.material_version == version
    assert open_blob(blob, material=MATERIAL, context=context) == plaintext
