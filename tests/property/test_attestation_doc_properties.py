"""Property tests: the document decoder and ``attestation describe`` raise only FormatError subclasses (and never
warn), and the codec round-trips."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.cli.attestation import describe_document
from enclavekit.errors import FormatError
from enclavekit.formats.attestation_doc import MAX_TIMESTAMP, AttestationDocument, parse_document

_ATTESTATION = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "attestation"
FIXTURE = (_ATTESTATION / "aws-indefinite-map-2025-09-16.cbor").read_bytes()
FIXTURES = [(_ATTESTATION / name).read_bytes() for name in (
    "aws-debug-2022-10-12.cbor", "aws-debug-2023-09-18.cbor", "aws-indefinite-map-2025-09-16.cbor",
    "aws-signed-eif-2022-10-13.cbor")]
PAYLOAD = parse_document(FIXTURE)[0].payload


def _decodes_or_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_document(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_format_errors(data: bytes) -> None:
    _decodes_or_format_error(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(FIXTURE) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_documents_raise_only_format_errors(edits: list[tuple[int, int]]) -> None:
    data = bytearray(FIXTURE)
    for position, value in edits:
        data[position] = value
    _decodes_or_format_error(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(PAYLOAD)), st.integers(0, 64))
def test_truncated_or_spliced_payloads_raise_only_format_errors(cut: int, drop: int) -> None:
    with contextlib.suppress(FormatError):
        AttestationDocument.from_payload_bytes(PAYLOAD[:cut] + PAYLOAD[cut + drop:])


def _describe_or_format_error(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cryptography's warnings on odd certificates must not be triggered
        try:
            described = describe_document(data)
        except FormatError:
            return
    json.dumps(described)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(range(len(FIXTURES))),
       st.lists(st.tuples(st.integers(0, 6000), st.sampled_from([0x01, 0x80, 0xFF]) | st.integers(1, 255)),
                min_size=1, max_size=4))
def test_describe_on_mutated_documents_raises_only_format_errors(which: int, edits: list[tuple[int, int]]) -> None:
    data = bytearray(FIXTURES[which])
    for position, mask in edits:
        data[position % len(data)] ^= mask
    _describe_or_format_error(bytes(data))


def test_describe_on_every_single_bit_flip_of_a_document() -> None:
    # exhaustive over the repro document (flipping bit 0 of byte 944 gave an InvalidVersion crash)
    data = FIXTURES[0]
    for position in range(len(data)):
        mutated = bytearray(data)
        mutated[position] ^= 0x01
        _describe_or_format_error(bytes(mutated))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(range(len(FIXTURES))), st.integers(0, 6000))
def test_describe_on_documents_with_a_timestamp_byte_changed(which: int, value: int) -> None:
    # the 8 timestamp bytes (1b ...): any value, even past year 9999, is a format error or describes
    data = bytearray(FIXTURES[which])
    at = data.index(b"\x69timestamp\x1b") + 11
    data[at + value % 8] = value % 256
    data[at] |= (value >> 8) & 0xFF
    _describe_or_format_error(bytes(data))


_bytes48 = st.binary(min_size=48, max_size=48)


@settings(max_examples=100, deadline=None)
@given(
    module_id=st.text(min_size=1, max_size=64),
    timestamp=st.integers(1, MAX_TIMESTAMP),
    pcrs=st.dictionaries(st.integers(0, 31), _bytes48, min_size=1, max_size=32),
    certificate=st.binary(min_size=1, max_size=1024),
    cabundle=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4),
    public_key=st.none() | st.binary(min_size=1, max_size=1024),
    user_data=st.none() | st.binary(max_size=1024),
    nonce=st.none() | st.binary(max_size=1024),
    indefinite=st.booleans(),
)
def test_round_trip(  # noqa: PLR0917 - hypothesis passes one argument per strategy
        module_id: str, timestamp: int, pcrs: dict[int, bytes], certificate: bytes, cabundle: list[bytes],
        public_key: bytes | None, user_data: bytes | None, nonce: bytes | None, indefinite: bool) -> None:
    doc = AttestationDocument(module_id=module_id, timestamp=timestamp, pcrs=pcrs, certificate=certificate,
                              cabundle=tuple(cabundle), public_key=public_key, user_data=user_data, nonce=nonce,
                              indefinite_map=indefinite)
    payload = doc.to_payload_bytes()
    again = AttestationDocument.from_payload_bytes(payload)
    assert again == doc and again.indefinite_map is indefinite
    assert again.to_payload_bytes() == payload
