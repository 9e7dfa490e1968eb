"""NSM API wire messages: the spec's hex examples (nsm-attestation-kms §2.2-§2.3) and one test per decoder rule."""

from __future__ import annotations

import pytest

from enclavekit.errors import FormatError
from enclavekit.formats import cbor
from enclavekit.formats import nsm_messages as m
from enclavekit.formats.nsm_messages import NSMErrorCode

# (message, hex) pairs straight from §2.2 / §2.3 of the spec
REQUEST_VECTORS = [
    (m.DescribePCRRequest(0), "a16b4465736372696265504352a165696e64657800"),
    (m.ExtendPCRRequest(16, bytes.fromhex("010203")), "a169457874656e64504352a265696e64657810646461746143010203"),
    (m.LockPCRRequest(16), "a1674c6f636b504352a165696e64657810"),
    (m.LockPCRsRequest(32), "a1684c6f636b50435273a16572616e67651820"),
    (m.DescribeNSMRequest(), "6b44657363726962654e534d"),
    (m.AttestationRequest(),
     "a16b4174746573746174696f6ea369757365725f64617461f6656e6f6e6365f66a7075626c69635f6b6579f6"),
    (m.GetRandomRequest(), "6947657452616e646f6d"),
]

RESPONSE_VECTORS = [
    (m.LockPCRResponse(), "674c6f636b504352"),
    (m.LockPCRsResponse(), cbor.encode("LockPCRs").hex()),
    (m.ErrorResponse(NSMErrorCode.INVALID_INDEX), "a1654572726f726c496e76616c6964496e646578"),
]


@pytest.mark.parametrize(("message", "hexstr"), REQUEST_VECTORS, ids=lambda v: getattr(v, "VARIANT", "hex"))
def test_request_vectors_encode_and_decode(message: m.Request, hexstr: str) -> None:
    assert message.to_bytes().hex() == hexstr
    assert m.decode_request(bytes.fromhex(hexstr)) == message
    assert type(message).from_bytes(bytes.fromhex(hexstr)) == message


@pytest.mark.parametrize(("message", "hexstr"), RESPONSE_VECTORS, ids=lambda v: getattr(v, "VARIANT", "hex"))
def test_response_vectors_encode_and_decode(message: m.Response, hexstr: str) -> None:
    assert message.to_bytes().hex() == hexstr
    assert m.decode_response(bytes.fromhex(hexstr)) == message


def test_lockpcrs_response_is_the_bare_text() -> None:
    assert m.LockPCRsResponse().to_bytes() == b"\x68LockPCRs"


def test_get_random_response_has_the_hwrng_prefix() -> None:
    # linux nsm.c parse_resp_get_random matches a1 69 "GetRandom" a1 66 "random" then a bstr head
    data = m.GetRandomResponse(bytes(range(256))).to_bytes()
    prefix = b"\xa1\x69GetRandom\xa1\x66random"
    assert data.startswith(prefix)
    assert data[len(prefix):len(prefix) + 3] == b"\x59\x01\x00"
    assert data[len(prefix) + 3:] == bytes(range(256))
    assert m.GetRandomResponse.from_bytes(data).random == bytes(range(256))


def test_describe_pcr_response_shape() -> None:
    value = bytes(range(48))
    data = m.DescribePCRResponse(lock=True, data=value).to_bytes()
    assert data == b"\xa1\x6bDescribePCR\xa2\x64lock\xf5\x64data\x58\x30" + value
    assert m.decode_response(data) == m.DescribePCRResponse(True, value)


def test_extend_pcr_response_shape() -> None:
    value = bytes(48)
    data = m.ExtendPCRResponse(value).to_bytes()
    assert data == b"\xa1\x69ExtendPCR\xa1\x64data\x58\x30" + value
    assert m.decode_response(data) == m.ExtendPCRResponse(value)


def test_attestation_response_shape() -> None:
    data = m.AttestationResponse(b"\x84doc").to_bytes()
    assert data == b"\xa1\x6bAttestation\xa1\x68document\x44\x84doc"
    assert m.decode_response(data) == m.AttestationResponse(b"\x84doc")


def test_describe_nsm_response_in_rust_field_order() -> None:
    message = m.DescribeNSMResponse(1, 0, 0, "i-1234567890abcdef0-enc0123456789abcdef", 32, tuple(range(16)),
                                    m.Digest.SHA384)
    data = message.to_bytes()
    decoded = cbor.decode(data)["DescribeNSM"]
    assert list(decoded) == ["version_major", "version_minor", "version_patch", "module_id", "max_pcrs",
                             "locked_pcrs", "digest"]
    assert decoded["locked_pcrs"] == list(range(16))
    assert decoded["digest"] == "SHA384"
    assert m.decode_response(data) == message


def test_describe_nsm_response_decodes_by_key_in_any_order() -> None:
    # QEMU sends the fields sorted alphabetically (§2.1)
    fields = {"digest": "SHA384", "locked_pcrs": [0, 1], "max_pcrs": 32, "module_id": "x", "version_major": 1,
              "version_minor": 0, "version_patch": 0}
    decoded = m.decode_response(cbor.encode({"DescribeNSM": fields}))
    assert decoded == m.DescribeNSMResponse(1, 0, 0, "x", 32, (0, 1), m.Digest.SHA384)


def test_attestation_request_with_bytes_and_key_order() -> None:
    message = m.AttestationRequest(user_data=b"u", nonce=b"n", public_key=b"k")
    data = message.to_bytes()
    assert list(cbor.decode(data)["Attestation"]) == ["user_data", "nonce", "public_key"]
    assert m.decode_request(data) == message


def test_attestation_request_missing_option_fields_are_none() -> None:
    # serde treats a missing Option field as None
    data = cbor.encode({"Attestation": {"nonce": b"n"}})
    assert m.decode_request(data) == m.AttestationRequest(nonce=b"n")


def test_empty_byte_string_stays_empty_not_none() -> None:
    data = m.AttestationRequest(user_data=b"").to_bytes()
    assert m.decode_request(data).user_data == b""  # type: ignore[union-attr]


def test_error_codes_and_c_values() -> None:
    assert [c.value for c in NSMErrorCode] == ["Success", "InvalidArgument", "InvalidIndex", "InvalidResponse",
                                            "ReadOnlyIndex", "InvalidOperation", "BufferTooSmall",
                                            "InputTooLarge", "InternalError"]
    assert [c.c_value for c in NSMErrorCode] == list(range(9))


@pytest.mark.parametrize("code", list(NSMErrorCode))
def test_every_error_code_round_trips(code: NSMErrorCode) -> None:
    data = m.ErrorResponse(code).to_bytes()
    assert data == cbor.encode({"Error": code.value})
    assert m.decode_response(data) == m.ErrorResponse(code)


def test_indefinite_maps_are_accepted() -> None:
    data = cbor.encode(cbor.IndefiniteMap({"DescribePCR": cbor.IndefiniteMap({"index": 3})}))
    assert m.decode_request(data) == m.DescribePCRRequest(3)


def test_from_bytes_of_the_wrong_variant() -> None:
    with pytest.raises(m.NSMMessageError, match="expected an NSM DescribePCR message, got GetRandom"):
        m.DescribePCRRequest.from_bytes(m.GetRandomRequest().to_bytes())


# ------------------------------------------------------------------------- decoder rules, one negative each


def _req(value: object) -> bytes:
    return cbor.encode(value)


BAD_REQUESTS = {
    "not CBOR (truncated)": bytes.fromhex("a16b4465736372696265504352a165696e646578"),
    "trailing bytes": bytes.fromhex("6947657452616e646f6d00"),
    "duplicate key": bytes.fromhex("a2") + _req("GetRandom") + b"\xf6" + _req("GetRandom") + b"\xf6",
    "duplicate field": b"\xa1" + _req("DescribePCR") + b"\xa2" + _req("index") + b"\x00" + _req("index") + b"\x01",
    "root is an integer": _req(5),
    "root is an array": _req(["GetRandom"]),
    "root is bytes": _req(b"GetRandom"),
    "root map with two entries": _req({"DescribePCR": {"index": 0}, "LockPCR": {"index": 0}}),
    "root map empty": _req({}),
    "variant name not text": _req({1: {"index": 0}}),
    "unknown unit variant": _req("Describe"),
    "unknown struct variant": _req({"ResetPCR": {"index": 16}}),
    "response variant as request": _req("LockPCR"),
    "unit variant as map": _req({"GetRandom": {}}),
    "struct variant as text": _req("DescribePCR"),
    "fields not a map": _req({"DescribePCR": [0]}),
    "fields null": _req({"DescribePCR": None}),
    "missing field": _req({"ExtendPCR": {"index": 16}}),
    "unknown field": _req({"DescribePCR": {"index": 0, "extra": 1}}),
    "non-text field key": _req({"DescribePCR": {0: 0}}),
    "index negative": _req({"DescribePCR": {"index": -1}}),
    "index bool": _req({"DescribePCR": {"index": True}}),
    "index text": _req({"DescribePCR": {"index": "0"}}),
    "index float": bytes.fromhex("a16b4465736372696265504352a165696e646578f90000"),
    "index beyond u16": _req({"LockPCR": {"index": 0x10000}}),
    "range beyond u16": _req({"LockPCRs": {"range": 0x10000}}),
    "data as array of uints": _req({"ExtendPCR": {"index": 16, "data": [1, 2, 3]}}),
    "data as text": _req({"ExtendPCR": {"index": 16, "data": "abc"}}),
    "user_data as text": _req({"Attestation": {"user_data": "x", "nonce": None, "public_key": None}}),
    "nonce as int": _req({"Attestation": {"user_data": None, "nonce": 1, "public_key": None}}),
    "unknown attestation field": _req({"Attestation": {"user_data": None, "nonce": None, "public_key": None,
                                                       "extra": None}}),
    "invalid utf-8 variant": b"\x62\xff\xfe",
    "empty input": b"",
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_refused(name: str) -> None:
    with pytest.raises(m.NSMMessageError):
        m.decode_request(BAD_REQUESTS[name])


def test_request_over_4096_bytes_is_too_large() -> None:
    data = m.ExtendPCRRequest(16, bytes(4096)).to_bytes()
    assert len(data) > m.REQUEST_MAX_SIZE
    with pytest.raises(m.NSMRequestTooLarge):
        m.decode_request(data)


def test_request_of_exactly_4096_bytes_is_accepted() -> None:
    overhead = len(m.ExtendPCRRequest(16, bytes(4000)).to_bytes()) - 4000
    data = m.ExtendPCRRequest(16, bytes(m.REQUEST_MAX_SIZE - overhead)).to_bytes()
    assert len(data) == m.REQUEST_MAX_SIZE
    assert isinstance(m.decode_request(data), m.ExtendPCRRequest)


def test_too_large_is_a_format_error_with_code_e67() -> None:
    assert issubclass(m.NSMRequestTooLarge, m.NSMMessageError)
    assert issubclass(m.NSMMessageError, FormatError)
    assert m.NSMMessageError.code == "E67"


BAD_RESPONSES = {
    "unknown error code": _req({"Error": "Unknown"}),
    "error code not text": _req({"Error": 2}),
    "error as text": _req("Error"),
    "unknown variant": _req({"Reset": {}}),
    "lock as map": _req({"LockPCR": {}}),
    "describe pcr as text": _req("DescribePCR"),
    "lock not bool": _req({"DescribePCR": {"lock": 1, "data": bytes(48)}}),
    "data not bytes": _req({"DescribePCR": {"lock": True, "data": [0] * 48}}),
    "extend missing data": _req({"ExtendPCR": {}}),
    "document not bytes": _req({"Attestation": {"document": "doc"}}),
    "random not bytes": _req({"GetRandom": {"random": None}}),
    "describe nsm locked_pcrs not array": _req({"DescribeNSM": {
        "version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": "x", "max_pcrs": 32,
        "locked_pcrs": b"\x00", "digest": "SHA384"}}),
    "describe nsm locked_pcrs item negative": _req({"DescribeNSM": {
        "version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": "x", "max_pcrs": 32,
        "locked_pcrs": [-1], "digest": "SHA384"}}),
    "describe nsm unknown digest": _req({"DescribeNSM": {
        "version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": "x", "max_pcrs": 32,
        "locked_pcrs": [], "digest": "MD5"}}),
    "describe nsm module_id bytes": _req({"DescribeNSM": {
        "version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": b"x", "max_pcrs": 32,
        "locked_pcrs": [], "digest": "SHA384"}}),
    "describe nsm version text": _req({"DescribeNSM": {
        "version_major": "1", "version_minor": 0, "version_patch": 0, "module_id": "x", "max_pcrs": 32,
        "locked_pcrs": [], "digest": "SHA384"}}),
    "over 0x3000 bytes": _req({"GetRandom": {"random": bytes(0x3000)}}),
}


@pytest.mark.parametrize("name", list(BAD_RESPONSES))
def test_bad_response_is_refused(name: str) -> None:
    with pytest.raises(m.NSMMessageError):
        m.decode_response(BAD_RESPONSES[name])


def test_decoder_refuses_non_bytes_as_a_caller_bug() -> None:
    with pytest.raises(TypeError):
        m.decode_request("GetRandom")  # type: ignore[arg-type]


@pytest.mark.parametrize(("factory", "error"), [
    (lambda: m.DescribePCRRequest(-1), ValueError),
    (lambda: m.DescribePCRRequest(True), TypeError),
    (lambda: m.LockPCRsRequest(70000), ValueError),
    (lambda: m.ExtendPCRRequest(16, "text"), TypeError),
    (lambda: m.AttestationRequest(nonce="text"), TypeError),
    (lambda: m.ErrorResponse("NoSuchCode"), ValueError),
])
def test_constructors_reject_caller_bugs(factory: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        factory()  # type: ignore[operator]
