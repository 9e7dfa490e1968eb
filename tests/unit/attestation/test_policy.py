"""Attestation policies: one positive and one negative per rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from attestation_helpers import NOW, PCRS, make_chain, sign_document

from enclavekit.attestation.policy import AttestationPolicy, parse_pcr_value
from enclavekit.attestation.verifier import TrustRoot, verify
from enclavekit.errors import AttestationPolicyError, VerificationError


@dataclass
class Doc:
    pcrs: dict[int, bytes] = field(default_factory=lambda: dict(PCRS))
    timestamp: datetime = NOW
    nonce: bytes | None = b"n" * 32
    public_key: bytes | None = b"pk"
    user_data: bytes | None = b"ud"
    debug_mode: bool = False


def _refused(policy: AttestationPolicy, doc: Doc, at: datetime = NOW) -> str:
    with pytest.raises(AttestationPolicyError) as exc:
        policy.check(doc, at)
    assert exc.value.code == "E72"
    assert isinstance(exc.value, VerificationError)
    return exc.value.rule


def test_default_policy_accepts_a_production_document() -> None:
    AttestationPolicy().check(Doc(), NOW)


def test_debug_mode_refused_unless_allowed() -> None:
    assert _refused(AttestationPolicy(), Doc(debug_mode=True)) == "debug-mode"
    AttestationPolicy(unsafe_allow_debug=True).check(Doc(debug_mode=True), NOW)


@pytest.mark.parametrize("missing", [(0,), (1,), (2,), (0, 1, 2)])
def test_boot_pcrs_must_be_present(missing: tuple[int, ...]) -> None:
    # spec 2.5: debug mode is detected as PCR0-2 all zero; a document without them must not pass as production
    pcrs = {i: v for i, v in PCRS.items() if i not in missing}
    assert _refused(AttestationPolicy(), Doc(pcrs=pcrs)) == "pcrs-missing-boot"
    assert _refused(AttestationPolicy(unsafe_allow_debug=True), Doc(pcrs=pcrs)) == "pcrs-missing-boot"


def test_signed_document_without_boot_pcrs_fails_the_default_policy() -> None:
    chain = make_chain()
    doc = sign_document(chain, pcrs={3: b"\x00" * 48, 4: b"\x04" * 48})
    with pytest.raises(AttestationPolicyError) as exc:
        verify(doc, [TrustRoot(chain.cas[0].der)], NOW)
    assert exc.value.rule == "pcrs-missing-boot"


def test_pcr_sets_any_set_all_entries() -> None:
    old = {0: b"\xaa" * 48, 1: PCRS[1].hex()}
    new = {0: PCRS[0], 1: PCRS[1].hex().upper()}
    AttestationPolicy.expect_pcrs(old, new).check(Doc(), NOW)  # matches the second set
    assert _refused(AttestationPolicy.expect_pcrs(old), Doc()) == "pcrs"
    # all entries of a set must match: one right value is not enough
    assert _refused(AttestationPolicy.expect_pcrs({0: PCRS[0], 2: b"\x00" * 48}), Doc()) == "pcrs"
    # an expected index the document lacks does not match
    assert _refused(AttestationPolicy.expect_pcrs({20: b"\x00" * 48}), Doc()) == "pcrs"


def test_nonce_equality() -> None:
    AttestationPolicy(nonce=b"n" * 32).check(Doc(), NOW)
    assert _refused(AttestationPolicy(nonce=b"m" * 32), Doc()) == "nonce"
    assert _refused(AttestationPolicy(nonce=b"n"), Doc(nonce=None)) == "nonce"


def test_minimum_nonce_length() -> None:
    AttestationPolicy(min_nonce_length=32).check(Doc(), NOW)
    assert _refused(AttestationPolicy(min_nonce_length=33), Doc()) == "nonce-length"
    assert _refused(AttestationPolicy(min_nonce_length=1), Doc(nonce=None)) == "nonce-length"


def test_max_age() -> None:
    policy = AttestationPolicy(max_age=timedelta(minutes=5))
    policy.check(Doc(), NOW + timedelta(minutes=5))
    assert _refused(policy, Doc(), NOW + timedelta(minutes=5, milliseconds=1)) == "max-age"


def test_future_timestamp_with_max_age() -> None:
    policy = AttestationPolicy(max_age=timedelta(minutes=5))
    policy.check(Doc(timestamp=NOW + timedelta(seconds=30)), NOW)  # within the clock skew
    assert _refused(policy, Doc(timestamp=NOW + timedelta(minutes=2)), NOW) == "timestamp-future"


def test_public_key_equality() -> None:
    AttestationPolicy(public_key=b"pk").check(Doc(), NOW)
    assert _refused(AttestationPolicy(public_key=b"other"), Doc()) == "public-key"


def test_user_data_equality() -> None:
    AttestationPolicy(user_data=b"ud").check(Doc(), NOW)
    assert _refused(AttestationPolicy(user_data=b"other"), Doc()) == "user-data"


def test_policy_is_checked_after_authentication() -> None:
    chain = make_chain()
    doc = sign_document(chain, nonce=b"abc")
    root = TrustRoot(chain.cabundle[0])
    with pytest.raises(AttestationPolicyError) as exc:
        verify(doc, [root], NOW, AttestationPolicy(nonce=b"xyz"))
    assert exc.value.rule == "nonce"
    assert verify(doc, [root], NOW, AttestationPolicy(nonce=b"abc")).nonce == b"abc"


@pytest.mark.parametrize("bad", ["0x" + "00" * 48, "zz" * 48, "00" * 47, b"\x00" * 20])
def test_bad_pcr_values_are_caller_errors(bad: str | bytes) -> None:
    with pytest.raises(ValueError):
        parse_pcr_value(bad)


@pytest.mark.parametrize("kwargs", [
    {"pcr_sets": ({},)}, {"pcr_sets": ({32: b"\x00" * 48},)}, {"min_nonce_length": -1},
    {"max_age": timedelta(seconds=-1)},
])
def test_bad_policies_are_caller_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AttestationPolicy(**kwargs)  # type: ignore[arg-type]
