"""Random corruption of valid EIFs: reading (lenient and strict) and describing either succeed or raise one of
enclavekit's format errors, never anything else (no IndexError, struct.error, MemoryError, ...)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavekit.errors import EIFValidationError, FormatError
from enclavekit.formats.eif import BuildMetadata, EIFMetadata
from enclavekit.image.describe import describe_info
from enclavekit.image.eif_reader import measure_eif
from enclavekit.image.eif_writer import BytesSource, EIFContent, write_eif
from enclavekit.image.signing import EIFSigner

META = EIFMetadata("test", "1.0", BuildMetadata("2024-01-01T00:00:00+00:00", "eif_build", "0.3.1", "OS", "kernel"),
                   custom_metadata={"k": [1, 2]})


@cache
def valid_eifs() -> tuple[bytes, bytes]:
    content = EIFContent(BytesSource(b"KERNEL-BYTES"), b"console=ttyS0", META,
                         [BytesSource(b"RAMDISK-0"), BytesSource(b"RAMDISK-1")])
    unsigned = io.BytesIO()
    write_eif(unsigned, content)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    start = datetime(2025, 1, 1, tzinfo=UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    signer = EIFSigner(cert.public_bytes(serialization.Encoding.PEM), key)
    signed = io.BytesIO()
    write_eif(signed, content, signer=signer)
    return unsigned.getvalue(), signed.getvalue()


def check(data: bytes) -> None:
    for strict in (False, True):
        try:
            info = measure_eif(io.BytesIO(data), strict=strict)
            describe_info(info)
        except FormatError:
            pass


mutation = st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.booleans(), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_byte_mutations(which: bool, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(valid_eifs()[which])
    for pos, value in mutations:
        data[pos % len(data)] = value
    check(bytes(data))


@settings(max_examples=150, deadline=None)
@given(which=st.booleans(), cut=st.integers(min_value=0), tail=st.binary(max_size=40))
def test_truncations_and_appended_bytes(which: bool, cut: int, tail: bytes) -> None:
    data = valid_eifs()[which]
    check(data[: cut % (len(data) + 1)] + tail)


@settings(max_examples=150, deadline=None)
@given(which=st.booleans(), pos=st.integers(min_value=0), value=st.integers(min_value=0, max_value=2**64 - 1))
def test_size_fields_overwritten_with_large_values(which: bool, pos: int, value: int) -> None:
    # 8-byte big-endian writes anywhere in the header area or section headers: absurd sizes must not allocate
    data = bytearray(valid_eifs()[which])
    at = pos % (len(data) - 8)
    data[at:at + 8] = value.to_bytes(8, "big")
    check(bytes(data))


def test_a_mutation_in_measured_data_is_caught_by_strict_crc() -> None:
    data = bytearray(valid_eifs()[0])
    data[-1] ^= 1
    try:
        measure_eif(io.BytesIO(bytes(data)), strict=True)
    except EIFValidationError as exc:
        assert exc.rule == "crc"
    else:
        raise AssertionError("a corrupted EIF passed strict validation")
