"""The attestation document codec (spec 3.1, 3.2, 3.6): real documents and one negative per field rule."""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from enclavekit.errors import AttestationFormatError, FormatError
from enclavekit.formats import cbor
from enclavekit.formats.attestation_doc import (
    MAX_TIMESTAMP,
    AttestationDocument,
    describe_certificate,
    name_text,
    parse_document,
    split_certificate,
)

FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
DOCS = sorted(k for k in MANIFEST if k.endswith(".cbor"))
PCR = b"\x11" * 48
CERT = b"\x30" * 600


def _doc(**kw: Any) -> AttestationDocument:
    fields: dict[str, Any] = {"module_id": "i-0123456789abcdef0-enc019bc1f2a0000001", "timestamp": 1_700_000_000_000,
                              "pcrs": {0: PCR, 1: PCR}, "certificate": CERT, "cabundle": (CERT,)}
    fields.update(kw)
    return AttestationDocument(**fields)


def _payload(**overrides: Any) -> bytes:
    fields: dict[str, Any] = {"module_id": "i-1-enc1", "digest": "SHA384", "timestamp": 1, "pcrs": {0: PCR},
                              "certificate": CERT, "cabundle": [CERT], "public_key": None, "user_data": None,
                              "nonce": None}
    for key, value in overrides.items():
        if value is _DROP:
            fields.pop(key)
        else:
            fields[key] = value
    return cbor.encode(fields)


_DROP = object()


def _refused(data: bytes) -> str:
    with pytest.raises(AttestationFormatError) as exc:
        AttestationDocument.from_payload_bytes(data)
    assert exc.value.code == "E70"
    return exc.value.rule


@pytest.mark.parametrize("name", DOCS)
def test_real_documents_decode_as_the_manifest_says(name: str) -> None:
    expected = MANIFEST[name]
    data = (FIXTURES / name).read_bytes()
    envelope, doc = parse_document(data)
    assert data[0] == 0x84 and not envelope.tagged
    assert envelope.protected == b"\xa1\x01\x38\x22" and len(envelope.signature) == 96
    assert doc.module_id == expected["module_id"]
    assert doc.timestamp == expected["timestamp_ms"]
    assert len(doc.pcrs) == expected["pcr_count"]
    for index, value in expected["pcrs"].items():
        assert doc.pcrs[int(index)].hex() == value
    for field in ("public_key", "user_data", "nonce"):
        value = getattr(doc, field)
        assert (None if value is None else len(value)) == expected[f"{field}_len"]
    assert envelope.payload[0] == int(expected["payload_map_header"], 16)
    assert doc.indefinite_map is (expected["payload_map_header"] == "0xbf")
    assert doc.debug_mode is expected["debug_mode"]
    assert len(doc.cabundle) == 4
    # re-encoding reproduces AWS's payload byte for byte, in the document's own map form
    assert doc.to_payload_bytes() == envelope.payload
    assert AttestationDocument.from_bytes(data) == doc


def test_payload_layout() -> None:
    doc = _doc(nonce=b"")
    indefinite = doc.to_payload_bytes()
    definite = doc.to_payload_bytes(indefinite=False)
    assert indefinite[0] == 0xBF and indefinite[-1] == 0xFF
    assert definite[0] == 0xA9 and definite[1:] == indefinite[1:-1]
    assert b"\x69timestamp\x1b" + (1_700_000_000_000).to_bytes(8, "big") in definite
    assert definite.endswith(b"\x6apublic_key\xf6\x69user_data\xf6\x65nonce\x40")
    assert list(cbor.decode(definite)) == ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
                                           "public_key", "user_data", "nonce"]
    assert AttestationDocument.from_payload_bytes(definite) == doc
    assert AttestationDocument.from_payload_bytes(indefinite).indefinite_map


def test_pcrs_written_ascending() -> None:
    payload = _doc(pcrs={5: PCR, 0: PCR, 2: PCR}).to_payload_bytes()
    assert list(cbor.decode(payload)["pcrs"]) == [0, 2, 5]


def test_describe_is_json_friendly() -> None:
    name = DOCS[0]
    described = AttestationDocument.from_bytes((FIXTURES / name).read_bytes()).describe()
    json.dumps(described)
    assert described["module_id"] == MANIFEST[name]["module_id"]
    assert described["pcrs"]["4"] == MANIFEST[name]["pcrs"]["4"]
    assert described["cabundle"][0]["sha256"] == MANIFEST["attestation/aws-nitro-enclaves-root-g1.pem"]["der_sha256"]
    assert described["certificate"]["subject"].startswith("CN=i-")
    assert "error" in _doc().describe()["certificate"]


# ------------------------------------------------------------------------------------------ field rules


@pytest.mark.parametrize(("overrides", "rule"), [
    ({"module_id": ""}, "module_id"),
    ({"module_id": 5}, "module_id"),
    ({"module_id": "x" * 257}, "module_id"),
    ({"digest": "SHA256"}, "digest"),
    ({"timestamp": 0}, "timestamp"),
    ({"timestamp": -1}, "timestamp"),
    ({"timestamp": True}, "timestamp"),
    ({"timestamp": "1"}, "timestamp"),
    ({"timestamp": MAX_TIMESTAMP + 1}, "timestamp"),  # after 9999-12-31: no datetime for it
    ({"timestamp": 2**64 - 1}, "timestamp"),
    ({"pcrs": {}}, "pcrs"),
    ({"pcrs": [PCR]}, "pcrs"),
    ({"pcrs": {32: PCR}}, "pcrs"),
    ({"pcrs": {-1: PCR}}, "pcrs"),
    ({"pcrs": {"0": PCR}}, "pcrs"),
    ({"pcrs": {0: b"\x00" * 47}}, "pcrs"),
    ({"pcrs": {0: "00" * 48}}, "pcrs"),
    ({"pcrs": {i: PCR for i in range(33)}}, "pcrs"),
    ({"certificate": b""}, "certificate"),
    ({"certificate": b"x" * 1025}, "certificate"),
    ({"certificate": None}, "certificate"),
    ({"cabundle": []}, "cabundle"),
    ({"cabundle": [b""]}, "cabundle"),
    ({"cabundle": [b"x" * 1025]}, "cabundle"),
    ({"cabundle": CERT}, "cabundle"),
    ({"cabundle": [CERT] * 17}, "cabundle"),
    ({"public_key": b""}, "public_key"),
    ({"public_key": b"x" * 1025}, "public_key"),
    ({"public_key": "pk"}, "public_key"),
    ({"user_data": b"x" * 1025}, "user_data"),
    ({"user_data": 1}, "user_data"),
    ({"nonce": b"x" * 1025}, "nonce"),
    ({"nonce": [1]}, "nonce"),
    ({"module_id": _DROP}, "missing-field"),
    ({"cabundle": _DROP}, "missing-field"),
    ({"extra": 1}, "unknown-key"),
    ({"nitrotpm_pcrs": {0: PCR}}, "nitrotpm-document"),
])
def test_field_rules(overrides: dict[str, Any], rule: str) -> None:
    assert _refused(_payload(**overrides)) == rule


def test_optional_fields_may_be_null_or_absent_and_at_the_limit() -> None:
    doc = AttestationDocument.from_payload_bytes(_payload(public_key=_DROP, user_data=b"", nonce=b"x" * 1024))
    assert doc.public_key is None and doc.user_data == b"" and doc.nonce == b"x" * 1024
    doc = AttestationDocument.from_payload_bytes(_payload(public_key=b"x" * 1024, cabundle=[b"c" * 1024]))
    assert doc.public_key == b"x" * 1024


def test_malformed_payloads() -> None:
    good = _payload()
    assert _refused(good + b"\x00") == "payload-cbor"  # trailing bytes
    assert _refused(good[:-1]) == "payload-cbor"  # truncated
    assert _refused(b"") == "payload-size"
    assert _refused(b"\xa0" + b"\x00" * 16384) == "payload-size"
    assert _refused(cbor.encode([1, 2])) == "payload-type"
    # duplicate keys: two module_id entries in a 10-entry map
    dup = b"\xaa" + good[1:] + cbor.encode("module_id") + cbor.encode("again")
    assert _refused(dup) == "payload-cbor"
    # only the top-level map may be indefinite
    pcrs_indefinite = good.replace(cbor.encode("pcrs") + b"\xa1", cbor.encode("pcrs") + b"\xbf", 1)
    pcrs_indefinite = pcrs_indefinite.replace(PCR, PCR + b"\xff", 1)
    assert _refused(pcrs_indefinite) == "encoding"
    # nesting deeper than a document ever is
    assert _refused(_payload(user_data=[[[[[1]]]]])) == "payload-cbor"


def test_document_envelope_rules() -> None:
    payload = _payload()
    body = [b"\xa1\x01\x38\x22", {}, payload, b"\x00" * 96]
    assert parse_document(cbor.encode(body))[0].payload == payload
    assert parse_document(cbor.encode(cbor.Tag(18, body)))[0].tagged
    for bad in (cbor.encode(cbor.Tag(98, body)), cbor.encode(body[:3]), cbor.encode(body) + b"\x00", b"",
                cbor.encode([b"", {}, None, b""]), b"\x84" + b"\x00" * 20000):
        with pytest.raises(AttestationFormatError):
            parse_document(bad)


def test_construction_errors_are_caller_bugs() -> None:
    with pytest.raises(ValueError):
        _doc(pcrs={})
    with pytest.raises(TypeError):
        AttestationDocument.from_payload_bytes("text")  # type: ignore[arg-type]
    assert issubclass(AttestationFormatError, FormatError)


# ------------------------------------------------------------------------------------------ inner encoding (3.2)


def test_indefinite_inner_items_are_refused() -> None:
    good = _payload(user_data=b"ud")
    assert AttestationDocument.from_payload_bytes(good).user_data == b"ud"
    cases = {
        # cabundle as 9f ... ff
        "cabundle": good.replace(cbor.encode("cabundle") + b"\x81" + cbor.encode(CERT),
                                 cbor.encode("cabundle") + b"\x9f" + cbor.encode(CERT) + b"\xff", 1),
        # user_data as a chunked byte string 5f 42 "ud" ff
        "user_data": good.replace(cbor.encode("user_data") + cbor.encode(b"ud"),
                                  cbor.encode("user_data") + b"\x5f" + cbor.encode(b"ud") + b"\xff", 1),
        # module_id as a chunked text string 7f ... ff
        "module_id": good.replace(cbor.encode("module_id") + cbor.encode("i-1-enc1"),
                                  cbor.encode("module_id") + b"\x7f" + cbor.encode("i-1-enc1") + b"\xff", 1),
    }
    for name, payload in cases.items():
        assert payload != good, name
        assert cbor.decode(payload) == cbor.decode(good)  # the same values, only the encoding differs
        assert _refused(payload) == "encoding", name
    # the top-level map itself may be indefinite (AWS since 2025)
    assert AttestationDocument.from_payload_bytes(b"\xbf" + good[1:] + b"\xff").indefinite_map


# ------------------------------------------------------------------------------------------ timestamps


def test_timestamp_datetime_is_exact_up_to_year_9999() -> None:
    assert _doc(timestamp=MAX_TIMESTAMP).timestamp_datetime == datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert _doc(timestamp=1_665_568_682_123).timestamp_datetime == datetime(
        2022, 10, 12, 9, 58, 2, 123000, tzinfo=UTC)
    assert AttestationDocument.from_payload_bytes(_payload(timestamp=MAX_TIMESTAMP)).timestamp == MAX_TIMESTAMP
    assert _doc(timestamp=MAX_TIMESTAMP).describe()["timestamp_iso"] == "9999-12-31T23:59:59.999000Z"


# ------------------------------------------------------------------------------------------ describing certificates


def _fixture_certificates() -> list[bytes]:
    doc = AttestationDocument.from_bytes((FIXTURES / DOCS[0]).read_bytes())
    return [*doc.cabundle, doc.certificate]


def test_names_are_read_from_the_der_as_cryptography_prints_them() -> None:
    from cryptography import x509

    for der in _fixture_certificates():
        cert = x509.load_der_x509_certificate(der)
        parts = split_certificate(der)
        assert parts.subject == cert.subject.public_bytes() and parts.issuer == cert.issuer.public_bytes()
        assert name_text(parts.subject) == cert.subject.rfc4514_string()
        assert int.from_bytes(parts.serial, "big") == cert.serial_number and parts.serial_is_positive


def _flip(der: bytes, position: int, mask: int = 0x01) -> bytes:
    out = bytearray(der)
    out[position] ^= mask
    return bytes(out)


def test_describe_certificate_survives_a_bad_version_byte() -> None:
    # the repro: byte 944 of aws-debug-2022-10-12.cbor is the leaf's version INTEGER (2 -> 3)
    data = (FIXTURES / "attestation/aws-debug-2022-10-12.cbor").read_bytes()
    _, doc = parse_document(_flip(data, 944))
    summary = describe_certificate(doc.certificate)
    assert summary["error"] == "not a parsable X.509 certificate (InvalidVersion)"


def _certificate_with_country(country: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # building the bad name warns; that is the point of the test
        name = x509.Name([x509.NameAttribute(x509.NameOID.COUNTRY_NAME, country, _validate=False),
                          x509.NameAttribute(x509.NameOID.COMMON_NAME, "a+b")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
            .not_valid_after(datetime(2030, 1, 1, tzinfo=UTC)).sign(key, hashes.SHA384()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_describe_certificate_never_warns() -> None:
    leaf = _fixture_certificates()[-1]
    serial = leaf.index(b"\xa0\x03\x02\x01\x02") + 5  # 02 10 <16 bytes>
    negative_serial = _flip(leaf, serial + 2, 0x80)
    bad_country = _certificate_with_country("USA")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (cryptography's included) fails the test
        assert describe_certificate(negative_serial)["error"] == "not a parsable X.509 certificate (ValueError)"
        summary = describe_certificate(bad_country)
    assert summary["subject"] == summary["issuer"] == "CN=a\\+b,C=USA"
    assert summary["serial"] == "1" and summary["not_after"] == "2030-01-01T00:00:00Z"
