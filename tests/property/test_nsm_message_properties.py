"""Property tests for the NSM wire messages and the emulated NSM's request handling."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import FormatError
from enclavekit.formats import cbor
from enclavekit.formats import nsm_messages as m
from enclavekit.testing.nsm import FakeNSM

u16 = st.integers(min_value=0, max_value=0xFFFF)
small_bytes = st.binary(max_size=300)
opt_bytes = st.none() | small_bytes

requests = st.one_of(
    st.builds(m.DescribePCRRequest, u16),
    st.builds(m.ExtendPCRRequest, u16, small_bytes),
    st.builds(m.LockPCRRequest, u16),
    st.builds(m.LockPCRsRequest, u16),
    st.just(m.DescribeNSMRequest()),
    st.builds(m.AttestationRequest, opt_bytes, opt_bytes, opt_bytes),
    st.just(m.GetRandomRequest()),
)

responses = st.one_of(
    st.builds(m.DescribePCRResponse, st.booleans(), st.binary(min_size=48, max_size=48)),
    st.builds(m.ExtendPCRResponse, st.binary(min_size=48, max_size=48)),
    st.just(m.LockPCRResponse()),
    st.just(m.LockPCRsResponse()),
    st.builds(m.DescribeNSMResponse, u16, u16, u16, st.text(max_size=80), u16,
              st.lists(st.integers(0, 31), unique=True).map(lambda xs: tuple(sorted(xs))), st.sampled_from(m.Digest)),
    st.builds(m.AttestationResponse, st.binary(max_size=2000)),
    st.builds(m.GetRandomResponse, st.binary(max_size=256)),
    st.builds(m.ErrorResponse, st.sampled_from(m.NSMErrorCode)),
)

# CBOR-ish values to build plausible-looking but wrong messages
leaves = st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=20) | st.text(max_size=20)
values = st.recursive(leaves, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=12) | st.integers(0, 5), children, max_size=4),
                      max_leaves=12)
variant_names = st.sampled_from(["DescribePCR", "ExtendPCR", "LockPCR", "LockPCRs", "DescribeNSM", "Attestation",
                                 "GetRandom", "Error", "Other"])


@given(requests)
def test_request_round_trip(message: m.Request) -> None:
    data = message.to_bytes()
    decoded = m.decode_request(data)
    assert decoded == message
    assert decoded.to_bytes() == data


@given(responses)
def test_response_round_trip(message: m.Response) -> None:
    data = message.to_bytes()
    decoded = m.decode_response(data)
    assert decoded == message
    assert decoded.to_bytes() == data


REQUEST_TYPES = (m.DescribePCRRequest, m.ExtendPCRRequest, m.LockPCRRequest, m.LockPCRsRequest,
                 m.DescribeNSMRequest, m.AttestationRequest, m.GetRandomRequest)
RESPONSE_TYPES = (m.DescribePCRResponse, m.ExtendPCRResponse, m.LockPCRResponse, m.LockPCRsResponse,
                  m.DescribeNSMResponse, m.AttestationResponse, m.GetRandomResponse, m.ErrorResponse)


def check_decoders(data: bytes) -> None:
    """Each decoder returns one of its message types or raises a FormatError; nothing else."""
    for decode, types in ((m.decode_request, REQUEST_TYPES), (m.decode_response, RESPONSE_TYPES)):
        try:
            result: object = decode(data)
        except FormatError as exc:
            assert exc.code == "E67"
        else:
            assert isinstance(result, types)


@given(st.binary(max_size=200))
def test_decoders_raise_only_format_errors_on_random_bytes(data: bytes) -> None:
    check_decoders(data)


@given(variant_names, values)
def test_decoders_raise_only_format_errors_on_wrong_shapes(name: str, body: object) -> None:
    for root in ({name: body}, name, body):
        check_decoders(cbor.encode(root))


@given(requests, st.data())
def test_single_byte_mutations_raise_only_format_errors(message: m.Request, data: st.DataObject) -> None:
    encoded = bytearray(message.to_bytes())
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    check_decoders(bytes(encoded))


@settings(max_examples=150)
@given(st.binary(max_size=120) | requests.map(lambda r: r.to_bytes()) | values.map(cbor.encode))
def test_emulated_nsm_answers_everything_with_a_valid_response(request: bytes) -> None:
    assert isinstance(m.decode_response(_NSM.handle(request)), RESPONSE_TYPES)


_NSM = FakeNSM()
