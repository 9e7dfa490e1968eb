"""Property tests: the document decoder raises only FormatError subclasses, and the codec round-trips."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import FormatError
from enclavekit.formats.attestation_doc import AttestationDocument, parse_document

FIXTURE = (Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "attestation"
           / "aws-indefinite-map-2025-09-16.cbor").read_bytes()
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


_bytes48 = st.binary(min_size=48, max_size=48)


@settings(max_examples=100, deadline=None)
@given(
    module_id=st.text(min_size=1, max_size=64),
    timestamp=st.integers(1, 2**64 - 1),
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
