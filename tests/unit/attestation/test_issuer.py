"""DocumentIssuer: AWS's envelope byte for byte, one leaf per module id until it expires."""

from __future__ import annotations

from datetime import timedelta

import pytest
from attestation_helpers import NOW, PCRS

from enclavekit.attestation.issuer import DocumentIssuer
from enclavekit.attestation.pki import LocalPKI
from enclavekit.attestation.verifier import TrustRoot, verify
from enclavekit.formats import cbor
from enclavekit.formats.attestation_doc import parse_document

MODULE_ID = "i-0123456789abcdef0-enc019bc1f2a0000001"
MS = int(NOW.timestamp() * 1000)


def _issue(issuer: DocumentIssuer, ms: int = MS, module_id: str = MODULE_ID, **kw: bytes | None) -> bytes:
    args: dict[str, bytes | None] = {"public_key": None, "user_data": None, "nonce": None, **kw}
    return issuer.issue(module_id=module_id, timestamp_ms=ms, pcrs=PCRS, **args)  # type: ignore[arg-type]


def test_envelope_is_byte_exact(pki: LocalPKI) -> None:
    doc = _issue(DocumentIssuer(pki), nonce=b"\x01" * 8)
    # 84 44 a1013822 a0 59 LLLL <payload> 58 60 <96 bytes>
    assert doc[:7] == bytes.fromhex("8444a1013822a0")
    assert doc[7] == 0x59
    length = int.from_bytes(doc[8:10], "big")
    payload = doc[10 : 10 + length]
    assert doc[10 + length : 12 + length] == b"\x58\x60"
    assert len(doc) == 12 + length + 96
    assert payload[0] == 0xBF and payload[-1] == 0xFF
    assert payload.index(b"\x69timestamp\x1b") > 0  # 8-byte timestamp form
    keys = list(cbor.decode(payload))
    assert keys == ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key",
                    "user_data", "nonce"]
    envelope, document = parse_document(doc)
    assert not envelope.tagged and document.public_key is None and document.nonce == b"\x01" * 8
    assert payload.endswith(b"\x6apublic_key\xf6\x69user_data\xf6\x65nonce\x48" + b"\x01" * 8 + b"\xff")


def test_definite_map_option(pki: LocalPKI) -> None:
    doc = _issue(DocumentIssuer(pki, definite_map=True))
    envelope, document = parse_document(doc)
    assert envelope.payload[0] == 0xA9 and not document.indefinite_map
    assert verify(doc, [TrustRoot(pki.root.der)], NOW).module_id == MODULE_ID


def test_leaf_cached_per_module_id_until_expiry(pki: LocalPKI) -> None:
    issuer = DocumentIssuer(pki)
    first = parse_document(_issue(issuer))[1].certificate
    assert parse_document(_issue(issuer, MS + 3_600_000))[1].certificate == first
    other = parse_document(_issue(issuer, module_id="i-0123456789abcdef0-enc019bc1f2a0000002"))[1].certificate
    assert other != first
    later = MS + int(timedelta(hours=3, seconds=1).total_seconds() * 1000)
    renewed = _issue(issuer, later)
    assert parse_document(renewed)[1].certificate != first
    assert verify(renewed, [TrustRoot(pki.root.der)], NOW + timedelta(hours=3, seconds=1)).module_id == MODULE_ID


def test_documents_a_day_later_verify_under_a_renewed_chain(pki: LocalPKI) -> None:
    issuer = DocumentIssuer(pki)
    when = NOW + timedelta(days=2)
    doc = _issue(issuer, int(when.timestamp() * 1000))
    assert verify(doc, [TrustRoot(pki.root.der)], when).module_id == MODULE_ID


def test_empty_public_key_is_written_as_null(pki: LocalPKI) -> None:
    assert parse_document(_issue(DocumentIssuer(pki), public_key=b""))[1].public_key is None


def test_emulated_nsm_documents_verify(pki: LocalPKI) -> None:
    from enclavekit.nsm.module import EmulatedNSM

    nsm = EmulatedNSM(signer=DocumentIssuer(pki), random_source=lambda n: b"\x01" * n, clock_ms=lambda: MS,
                      measurements={"PCR0": "11" * 48, "PCR1": "22" * 48, "PCR2": "33" * 48},
                      parent_instance_id="i-0123456789abcdef0")
    document = nsm.attestation(nonce=b"abc", public_key=b"pk").document
    result = verify(document, [TrustRoot(pki.root.der)], NOW)
    assert result.module_id == nsm.module_id and result.nonce == b"abc" and result.public_key == b"pk"
    assert result.pcrs[0] == b"\x11" * 48 and len(result.pcrs) == 16


@pytest.mark.parametrize("kw", [{"nonce": b"x" * 1025}, {"user_data": b"x" * 1025}, {"public_key": b"x" * 1025}])
def test_out_of_range_inputs_are_caller_errors(pki: LocalPKI, kw: dict[str, bytes]) -> None:
    with pytest.raises(ValueError):
        _issue(DocumentIssuer(pki), **kw)


def test_bad_timestamp_is_a_caller_error(pki: LocalPKI) -> None:
    with pytest.raises(ValueError):
        _issue(DocumentIssuer(pki), 0)


def test_timestamp_past_year_9999_is_a_caller_error(pki: LocalPKI) -> None:
    from enclavekit.formats.attestation_doc import MAX_TIMESTAMP

    with pytest.raises(ValueError):
        _issue(DocumentIssuer(pki), MAX_TIMESTAMP + 1)


def test_cache_is_bounded(pki: LocalPKI) -> None:
    issuer = DocumentIssuer(pki, max_cached_leaves=2)
    for i in range(4):
        _issue(issuer, module_id=f"i-0123456789abcdef0-enc019bc1f2a000000{i}")
    assert len(issuer._leaves) <= 2
