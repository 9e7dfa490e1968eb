"""The emulated NSM state machine (nsm-attestation-kms §2.5, eif-pcr-cli §2.3, §2.5, §3.5)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping

import pytest

from enclavekit.errors import LocalPKIError, NSMError
from enclavekit.formats import cbor
from enclavekit.formats import nsm_messages as m
from enclavekit.formats.cose import COSESign1
from enclavekit.formats.nsm_messages import NSMErrorCode
from enclavekit.nsm.module import (
    DEFAULT_INSTANCE_ID,
    EmulatedNSM,
    PCRBank,
    extend_digest,
    instance_id_of,
    make_module_id,
    parent_instance_pcr,
    parent_role_pcr,
)
from enclavekit.testing.nsm import FakeNSM, SeededRandom, SteppingClock, ThrowawayDocumentSigner

ZERO = bytes(48)
# eif-pcr-cli §2.3 example vectors
ROLE_ARN = "arn:aws:iam::123456789012:role/Webserver"
ROLE_PCR3 = ("78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef"
             "4fc1f1a452e315b9e98f9e312e6921e6")
INSTANCE_ID = "i-1234567890abcdef0"
INSTANCE_PCR4 = ("08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812"
                 "719327281c401a67a10fcba87ae79ce0")
# eif-pcr-cli §2.2: PCR2 of an image with a single ramdisk = extend of SHA384("")
EMPTY_PCR2 = ("21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c"
              "10edb30948c90ba67310f7b964fc500a")

MEASUREMENTS = {
    "HashAlgorithm": "Sha384 { ... }",
    "PCR0": "aa" * 48,
    "PCR1": "bb" * 48,
    "PCR2": EMPTY_PCR2,
    "PCR8": "cc" * 48,
}


def request(nsm: EmulatedNSM, message: m.Request) -> m.Response:
    return m.decode_response(nsm.handle(message.to_bytes()))


def error_of(nsm: EmulatedNSM, message: m.Request | bytes) -> NSMErrorCode:
    data = message if isinstance(message, bytes) else message.to_bytes()
    response = m.decode_response(nsm.handle(data))
    assert isinstance(response, m.ErrorResponse), response
    return response.error


def payload_of(document: bytes) -> dict[str, object]:
    payload = cbor.decode(COSESign1.from_bytes(document).payload)
    assert isinstance(payload, dict)
    return payload


# ------------------------------------------------------------------------------------------- extend math


def test_extend_is_sha384_of_old_and_raw_data() -> None:
    nsm = FakeNSM()
    expected = hashlib.sha384(ZERO + b"\x01\x02\x03").digest()
    response = request(nsm, m.ExtendPCRRequest(16, b"\x01\x02\x03"))
    assert response == m.ExtendPCRResponse(expected)
    second = request(nsm, m.ExtendPCRRequest(16, b"abc"))
    assert second == m.ExtendPCRResponse(hashlib.sha384(expected + b"abc").digest())
    assert request(nsm, m.DescribePCRRequest(16)) == m.DescribePCRResponse(False, hashlib.sha384(
        expected + b"abc").digest())


def test_extend_with_empty_data() -> None:
    nsm = FakeNSM()
    assert request(nsm, m.ExtendPCRRequest(31, b"")) == m.ExtendPCRResponse(hashlib.sha384(ZERO).digest())


def test_pcr2_of_empty_application_matches_the_spec_vector() -> None:
    assert extend_digest(ZERO, hashlib.sha384(b"").digest()).hex() == EMPTY_PCR2


# ---------------------------------------------------------------------------------------------- boot state


def test_parent_identity_vectors() -> None:
    assert parent_role_pcr(ROLE_ARN).hex() == ROLE_PCR3
    assert parent_instance_pcr(INSTANCE_ID).hex() == INSTANCE_PCR4
    assert parent_role_pcr(None) == ZERO


def test_boot_pcrs_from_measurements_and_parent_identity() -> None:
    nsm = FakeNSM(measurements=MEASUREMENTS, parent_role_arn=ROLE_ARN, parent_instance_id=INSTANCE_ID)
    pcrs = nsm.pcrs()
    assert pcrs[0] == bytes.fromhex("aa" * 48)
    assert pcrs[1] == bytes.fromhex("bb" * 48)
    assert pcrs[2].hex() == EMPTY_PCR2
    assert pcrs[3].hex() == ROLE_PCR3
    assert pcrs[4].hex() == INSTANCE_PCR4
    assert pcrs[8] == bytes.fromhex("cc" * 48)
    for index in (5, 6, 7, *range(9, 32)):
        assert pcrs[index] == ZERO


def test_measurements_as_int_keys_and_bytes() -> None:
    nsm = FakeNSM(measurements={0: b"\x01" * 48, 1: b"\x02" * 48, 2: b"\x03" * 48})
    assert nsm.pcrs()[0] == b"\x01" * 48
    assert nsm.pcrs()[8] == ZERO  # unsigned image: PCR8 stays zero


def test_pcr3_is_zero_without_a_role() -> None:
    nsm = FakeNSM(parent_instance_id=INSTANCE_ID)
    assert request(nsm, m.DescribePCRRequest(3)) == m.DescribePCRResponse(True, ZERO)
    assert request(nsm, m.DescribePCRRequest(4)) == m.DescribePCRResponse(True, bytes.fromhex(INSTANCE_PCR4))


def test_pcr4_is_never_zero_it_measures_the_module_ids_instance() -> None:
    # §2.5: PCR4 is non-zero on Nitro; without a configured parent it follows the instance id in module_id
    named = EmulatedNSM(signer=ThrowawayDocumentSigner(), random_source=SeededRandom(), clock_ms=SteppingClock(),
                        module_id=f"{INSTANCE_ID}-enc018aa8b8e2285d13")
    assert named.pcrs()[4].hex() == INSTANCE_PCR4
    default = EmulatedNSM(signer=ThrowawayDocumentSigner(), random_source=SeededRandom(), clock_ms=SteppingClock())
    assert default.module_id.startswith(DEFAULT_INSTANCE_ID + "-enc")
    assert default.pcrs()[4] == parent_instance_pcr(DEFAULT_INSTANCE_ID) != ZERO
    other = EmulatedNSM(signer=ThrowawayDocumentSigner(), random_source=SeededRandom(), clock_ms=SteppingClock(),
                        module_id="my-enclave")
    assert other.pcrs()[4] == parent_instance_pcr(DEFAULT_INSTANCE_ID)
    # a configured parent wins
    given = EmulatedNSM(signer=ThrowawayDocumentSigner(), random_source=SeededRandom(), clock_ms=SteppingClock(),
                        module_id="i-0000000000000000a-enc018aa8b8e2285d13", parent_instance_id=INSTANCE_ID)
    assert given.pcrs()[4].hex() == INSTANCE_PCR4
    assert payload_of(default.attestation().document)["pcrs"][4] != ZERO  # type: ignore[index]


def test_instance_id_of_module_ids() -> None:
    assert instance_id_of("i-0918f6c55e3b61d89-enc018aa8b8e2285d13") == "i-0918f6c55e3b61d89"
    assert instance_id_of("i-12345678-enc1") == "i-12345678"
    for other in ("my-enclave", "i-123-enc1", "i-0918f6c55e3b61d89", "x-i-12345678-enc1"):
        assert instance_id_of(other) is None


@pytest.mark.parametrize(("measurements", "error"), [
    ({"PCR3": "00" * 48}, "PCR0, 1, 2 and 8 only"),
    ({"PCR0": "00" * 47}, "48 bytes"),
    ({"PCR0": "zz" * 48}, "not hex"),
    ({"PCRX": "00" * 48}, "not a PCR index"),
])
def test_bad_measurements_are_caller_errors(measurements: Mapping[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        FakeNSM(measurements=measurements)


def test_pcrs_0_to_15_locked_at_boot_16_to_31_unlocked() -> None:
    nsm = FakeNSM()
    for index in range(32):
        response = request(nsm, m.DescribePCRRequest(index))
        assert isinstance(response, m.DescribePCRResponse)
        assert response.lock is (index < 16)


# ------------------------------------------------------------------------------- §2.5 rules, one test each


def test_extend_locked_boot_pcr_is_read_only() -> None:
    assert error_of(FakeNSM(), m.ExtendPCRRequest(4, b"x")) is NSMErrorCode.READ_ONLY_INDEX


def test_extend_pcr_locked_by_the_application_is_read_only() -> None:
    nsm = FakeNSM()
    assert request(nsm, m.LockPCRRequest(20)) == m.LockPCRResponse()
    assert error_of(nsm, m.ExtendPCRRequest(20, b"x")) is NSMErrorCode.READ_ONLY_INDEX


def test_lock_boot_locked_pcr_is_read_only() -> None:
    assert error_of(FakeNSM(), m.LockPCRRequest(0)) is NSMErrorCode.READ_ONLY_INDEX


def test_lock_already_locked_pcr_is_read_only() -> None:
    nsm = FakeNSM()
    request(nsm, m.LockPCRRequest(16))
    assert error_of(nsm, m.LockPCRRequest(16)) is NSMErrorCode.READ_ONLY_INDEX


def test_describe_index_32_is_invalid_index() -> None:
    assert error_of(FakeNSM(), m.DescribePCRRequest(32)) is NSMErrorCode.INVALID_INDEX


def test_extend_index_32_is_invalid_index() -> None:
    assert error_of(FakeNSM(), m.ExtendPCRRequest(32, b"x")) is NSMErrorCode.INVALID_INDEX


def test_lock_index_65535_is_invalid_index() -> None:
    assert error_of(FakeNSM(), m.LockPCRRequest(0xFFFF)) is NSMErrorCode.INVALID_INDEX


def test_lock_pcrs_range_33_is_invalid_index() -> None:
    assert error_of(FakeNSM(), m.LockPCRsRequest(33)) is NSMErrorCode.INVALID_INDEX


def test_lock_pcrs_over_already_locked_succeeds() -> None:
    nsm = FakeNSM()
    request(nsm, m.LockPCRRequest(17))
    assert request(nsm, m.LockPCRsRequest(20)) == m.LockPCRsResponse()
    described = request(nsm, m.DescribeNSMRequest())
    assert isinstance(described, m.DescribeNSMResponse)
    assert described.locked_pcrs == tuple(range(20))


def test_lock_pcrs_zero_and_32() -> None:
    nsm = FakeNSM()
    assert request(nsm, m.LockPCRsRequest(0)) == m.LockPCRsResponse()
    assert request(nsm, m.LockPCRsRequest(32)) == m.LockPCRsResponse()
    assert error_of(nsm, m.ExtendPCRRequest(31, b"x")) is NSMErrorCode.READ_ONLY_INDEX


def test_unknown_request_is_invalid_operation() -> None:
    assert error_of(FakeNSM(), cbor.encode("ResetPCRs")) is NSMErrorCode.INVALID_OPERATION


def test_garbage_request_is_invalid_operation() -> None:
    assert error_of(FakeNSM(), b"\xff\x00garbage") is NSMErrorCode.INVALID_OPERATION


def test_wrong_field_type_is_invalid_operation() -> None:
    assert error_of(FakeNSM(), cbor.encode({"DescribePCR": {"index": "1"}})) is NSMErrorCode.INVALID_OPERATION


def test_request_over_4096_bytes_is_input_too_large() -> None:
    data = m.ExtendPCRRequest(16, bytes(4096)).to_bytes()
    assert error_of(FakeNSM(), data) is NSMErrorCode.INPUT_TOO_LARGE


@pytest.mark.parametrize("field", ["user_data", "nonce", "public_key"])
def test_attestation_input_over_1024_bytes_is_input_too_large(field: str) -> None:
    message = m.AttestationRequest(**{field: bytes(1025)})
    assert error_of(FakeNSM(), message) is NSMErrorCode.INPUT_TOO_LARGE


def test_attestation_inputs_of_1024_bytes_each_are_accepted() -> None:
    nsm = FakeNSM()
    # nsm-check asks for all three at 1024 bytes; the request itself stays under 4096 bytes
    response = request(nsm, m.AttestationRequest(b"u" * 1024, b"n" * 1024, b"k" * 1024))
    assert isinstance(response, m.AttestationResponse)
    payload = payload_of(response.document)
    assert payload["user_data"] == b"u" * 1024
    assert payload["nonce"] == b"n" * 1024
    assert payload["public_key"] == b"k" * 1024


def test_typed_methods_raise_nsm_error() -> None:
    nsm = FakeNSM()
    with pytest.raises(NSMError) as info:
        nsm.extend_pcr(0, b"x")
    assert info.value.error_code == "ReadOnlyIndex"
    assert info.value.code == "E73"


# ------------------------------------------------------------------------------------- describe / random


def test_describe_nsm() -> None:
    nsm = FakeNSM(module_id="i-1234567890abcdef0-enc0123456789abcdef")
    assert request(nsm, m.DescribeNSMRequest()) == m.DescribeNSMResponse(
        1, 0, 0, "i-1234567890abcdef0-enc0123456789abcdef", 32, tuple(range(16)), m.Digest.SHA384)


def test_describe_nsm_with_configured_version() -> None:
    nsm = EmulatedNSM(signer=ThrowawayDocumentSigner(), random_source=SeededRandom(), clock_ms=SteppingClock(),
                      module_id="x", version=(2, 3, 4))
    described = nsm.describe_nsm()
    assert (described.version_major, described.version_minor, described.version_patch) == (2, 3, 4)


def test_get_random_returns_256_bytes_with_the_hwrng_prefix() -> None:
    nsm = FakeNSM()
    data = nsm.handle(m.GetRandomRequest().to_bytes())
    assert data.startswith(b"\xa1\x69GetRandom\xa1\x66random\x59\x01\x00")
    response = m.decode_response(data)
    assert isinstance(response, m.GetRandomResponse)
    assert len(response.random) == 256
    assert nsm.get_random().random != response.random


def test_short_random_source_is_a_caller_bug() -> None:
    nsm = EmulatedNSM(signer=ThrowawayDocumentSigner(), random_source=lambda n: bytes(n // 2),
                      clock_ms=lambda: 0, module_id="x")
    with pytest.raises(ValueError, match="random_source"):
        nsm.get_random()


# ------------------------------------------------------------------------------------------ attestation


def test_document_carries_locked_pcrs_inputs_module_id_and_time() -> None:
    nsm = FakeNSM(measurements=MEASUREMENTS, parent_instance_id=INSTANCE_ID, start_ms=1_700_000_000_000)
    response = request(nsm, m.AttestationRequest(user_data=b"ud", nonce=b"nonce", public_key=None))
    assert isinstance(response, m.AttestationResponse)
    issued = nsm.signer.issued[-1]
    assert issued.document == response.document
    assert sorted(issued.pcrs) == list(range(16))
    assert issued.pcrs[0] == bytes.fromhex("aa" * 48)
    assert issued.module_id == nsm.module_id
    assert issued.timestamp_ms >= 1_700_000_000_000
    payload = payload_of(response.document)
    assert list(payload) == ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key",
                             "user_data", "nonce"]
    assert payload["public_key"] is None
    assert payload["user_data"] == b"ud"
    assert payload["nonce"] == b"nonce"


def test_document_after_lock_pcrs_has_all_32_pcrs() -> None:
    nsm = FakeNSM()
    request(nsm, m.ExtendPCRRequest(16, b"app"))
    request(nsm, m.LockPCRsRequest(32))
    request(nsm, m.AttestationRequest())
    pcrs = nsm.signer.issued[-1].pcrs
    assert sorted(pcrs) == list(range(32))
    assert pcrs[16] == extend_digest(ZERO, b"app")


def test_document_after_lock_pcr_includes_that_pcr_only() -> None:
    nsm = FakeNSM()
    request(nsm, m.LockPCRRequest(23))
    request(nsm, m.AttestationRequest())
    assert sorted(nsm.signer.issued[-1].pcrs) == [*range(16), 23]


def test_debug_mode_zeroes_image_pcrs_but_keeps_parent_identity() -> None:
    nsm = FakeNSM(measurements=MEASUREMENTS, parent_role_arn=ROLE_ARN, parent_instance_id=INSTANCE_ID,
                  debug_mode=True)
    request(nsm, m.AttestationRequest())
    pcrs = nsm.signer.issued[-1].pcrs
    for index in (0, 1, 2, 8):
        assert pcrs[index] == ZERO
    assert pcrs[3].hex() == ROLE_PCR3
    assert pcrs[4].hex() == INSTANCE_PCR4
    # the NSM itself still holds the real values (DescribePCR is not zeroed)
    assert nsm.describe_pcr(0).data == bytes.fromhex("aa" * 48)


def test_non_debug_document_keeps_image_pcrs() -> None:
    nsm = FakeNSM(measurements=MEASUREMENTS)
    request(nsm, m.AttestationRequest())
    assert nsm.signer.issued[-1].pcrs[8] == bytes.fromhex("cc" * 48)


def test_signer_failure_is_internal_error() -> None:
    class BrokenSigner:
        def issue(self, **_: object) -> bytes:
            raise LocalPKIError("pki damaged")

    nsm = EmulatedNSM(signer=BrokenSigner(), random_source=SeededRandom(), clock_ms=SteppingClock(), module_id="x")
    assert error_of(nsm, m.AttestationRequest()) is NSMErrorCode.INTERNAL_ERROR


def test_oversized_response_is_internal_error() -> None:
    class HugeSigner:
        def issue(self, **_: object) -> bytes:
            return bytes(m.RESPONSE_MAX_SIZE)

    nsm = EmulatedNSM(signer=HugeSigner(), random_source=SeededRandom(), clock_ms=SteppingClock(), module_id="x")
    assert error_of(nsm, m.AttestationRequest()) is NSMErrorCode.INTERNAL_ERROR


# ------------------------------------------------------------------------------------------- module ids


def test_make_module_id() -> None:
    # §3.5: 018aa8b8e228 ms = 2023-09-18T14:36:43.432Z
    assert make_module_id("i-0918f6c55e3b61d89", 0x018AA8B8E228, 0x5D13) == "i-0918f6c55e3b61d89-enc018aa8b8e2285d13"


@pytest.mark.parametrize(("instance_id", "ms", "rand"), [
    ("x-1234", 0, 0), ("i-1234567890abcdef0", -1, 0), ("i-1234567890abcdef0", 16**12, 0),
    ("i-1234567890abcdef0", 0, 0x10000),
])
def test_make_module_id_rejects_bad_arguments(instance_id: str, ms: int, rand: int) -> None:
    with pytest.raises(ValueError):
        make_module_id(instance_id, ms, rand)


def test_default_module_id_from_instance_clock_and_random() -> None:
    nsm = FakeNSM(parent_instance_id=INSTANCE_ID, start_ms=0x018AA8B8E228)
    assert nsm.module_id.startswith("i-1234567890abcdef0-enc018aa8b8e228")
    assert len(nsm.module_id) == len("i-1234567890abcdef0-enc") + 16


def test_fake_nsm_is_deterministic() -> None:
    a, b = FakeNSM(), FakeNSM()
    assert a.module_id == b.module_id
    assert a.get_random() == b.get_random()


# ------------------------------------------------------------------------------------------- PCRBank


def test_pcr_bank_rules() -> None:
    bank = PCRBank()
    assert len(bank) == 32
    bank.set_boot_value(0, b"\x01" * 48)
    bank.lock_range(16)
    assert bank.read(0) == (b"\x01" * 48, True)
    assert bank.locked() == tuple(range(16))
    with pytest.raises(RuntimeError):
        bank.set_boot_value(0, ZERO)
    with pytest.raises(ValueError):
        bank.set_boot_value(20, b"short")


def test_concurrent_extends_are_serialised() -> None:
    nsm = FakeNSM()
    data = m.ExtendPCRRequest(16, b"x").to_bytes()

    def worker() -> None:
        for _ in range(50):
            nsm.handle(data)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = ZERO
    for _ in range(200):
        expected = extend_digest(expected, b"x")
    assert nsm.describe_pcr(16).data == expected
