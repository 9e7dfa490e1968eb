"""The verifier against real AWS documents and against chains broken one rule at a time."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from attestation_helpers import DOCS, FIXTURES, MANIFEST, NOW, fixture_bytes, make_chain, sign_document, verify_at
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit.attestation.issuer import DocumentIssuer
from enclavekit.attestation.pki import PROFILES, LocalPKI
from enclavekit.attestation.policy import AttestationPolicy
from enclavekit.attestation.verifier import AWS_ROOT_G1, AWS_ROOT_G1_SHA256, ChainCache, TrustRoot, verify
from enclavekit.errors import AttestationFormatError, AttestationPolicyError, FormatError, VerificationError
from enclavekit.formats import cbor

ALLOW_DEBUG = AttestationPolicy(unsafe_allow_debug=True)


def _root(chain: object) -> TrustRoot:
    return TrustRoot(chain.cas[0].der)  # type: ignore[attr-defined]


def _rule(exc: pytest.ExceptionInfo[VerificationError] | pytest.ExceptionInfo[AttestationFormatError]) -> str:
    return exc.value.rule


# ------------------------------------------------------------------------------------------ the AWS root


def test_builtin_aws_root_is_the_pinned_certificate() -> None:
    assert hashlib.sha256(AWS_ROOT_G1.der).hexdigest() == AWS_ROOT_G1_SHA256
    assert AWS_ROOT_G1.fingerprint == MANIFEST["attestation/aws-nitro-enclaves-root-g1.pem"]["der_sha256"]
    fixture = x509.load_pem_x509_certificate((FIXTURES / "attestation/aws-nitro-enclaves-root-g1.pem").read_bytes())
    assert fixture.public_bytes(serialization.Encoding.DER) == AWS_ROOT_G1.der


# ------------------------------------------------------------------------------------------ real documents


@pytest.mark.parametrize("name", DOCS)
def test_aws_documents_verify_as_of_their_timestamp(name: str) -> None:
    expected = MANIFEST[name]
    result = verify(fixture_bytes(name), [AWS_ROOT_G1], verify_at(name), ALLOW_DEBUG)
    assert result.module_id == expected["module_id"]
    assert result.timestamp_ms == expected["timestamp_ms"]
    assert result.timestamp == verify_at(name)
    assert {str(i): v.hex() for i, v in result.pcrs.items() if str(i) in expected["pcrs"]} == expected["pcrs"]
    assert len(result.pcrs) == expected["pcr_count"]
    for field in ("public_key", "user_data", "nonce"):
        value = getattr(result, field)
        assert (None if value is None else len(value)) == expected[f"{field}_len"]
    assert result.debug_mode is expected["debug_mode"]
    assert result.document.indefinite_map is (expected["payload_map_header"] == "0xbf")
    assert result.trust_root == AWS_ROOT_G1_SHA256
    assert result.to_json()["pcrs"]["4"] == expected["pcrs"]["4"]


@pytest.mark.parametrize("name", DOCS)
def test_aws_documents_are_refused_now(name: str) -> None:
    with pytest.raises(VerificationError) as exc:
        verify(fixture_bytes(name), [AWS_ROOT_G1], datetime.now(UTC), ALLOW_DEBUG)
    assert _rule(exc) == "certificate-validity"


@pytest.mark.parametrize("name", DOCS)
def test_aws_documents_are_refused_under_the_local_root_only(name: str, pki: LocalPKI) -> None:
    with pytest.raises(VerificationError) as exc:
        verify(fixture_bytes(name), [TrustRoot.from_certificate(pki.root.certificate)], verify_at(name), ALLOW_DEBUG)
    assert _rule(exc) == "trust-root"


@pytest.mark.parametrize("name", [d for d in DOCS if MANIFEST[d]["debug_mode"]])
def test_debug_documents_are_refused_by_default(name: str) -> None:
    with pytest.raises(AttestationPolicyError) as exc:
        verify(fixture_bytes(name), [AWS_ROOT_G1], verify_at(name))
    assert exc.value.code == "E72" and exc.value.rule == "debug-mode"


@pytest.mark.parametrize("name", [d for d in DOCS if not MANIFEST[d]["debug_mode"]])
def test_production_documents_pass_the_default_policy(name: str) -> None:
    assert not verify(fixture_bytes(name), [AWS_ROOT_G1], verify_at(name)).debug_mode


def test_tagged_form_of_a_real_document_verifies() -> None:
    name = "attestation/aws-indefinite-map-2025-09-16.cbor"
    tagged = b"\xd2" + fixture_bytes(name)  # tag 18
    assert verify(tagged, [AWS_ROOT_G1], verify_at(name)).module_id == MANIFEST[name]["module_id"]


def test_reencoding_the_payload_breaks_the_signature() -> None:
    # 3.3: the signature covers the received bytes; bf...ff rewritten as a9 is a different payload
    name = "attestation/aws-indefinite-map-2025-09-16.cbor"
    data = fixture_bytes(name)
    body = cbor.decode(data)
    payload = body[2]
    assert payload[0] == 0xBF and payload[-1] == 0xFF
    body[2] = b"\xa9" + payload[1:-1]
    with pytest.raises(VerificationError) as exc:
        verify(cbor.encode(body), [AWS_ROOT_G1], verify_at(name))
    assert _rule(exc) == "cose-signature"


def test_no_trust_root_is_a_caller_bug() -> None:
    name = DOCS[0]
    with pytest.raises(ValueError, match="trust root"):
        verify(fixture_bytes(name), [], verify_at(name))


def test_a_root_in_the_bundle_is_not_trusted_for_being_there() -> None:
    # a self-made root with exactly AWS's subject at cabundle[0], a well-formed chain under it, a valid signature
    aws_subject = AWS_ROOT_G1.certificate.subject  # type: ignore[union-attr]
    chain = make_chain(root_name=aws_subject)
    assert chain.cas[0].certificate.subject == aws_subject and chain.cabundle[0] != AWS_ROOT_G1.der
    doc = sign_document(chain)
    assert verify(doc, [_root(chain)], NOW).module_id  # sound in every respect but the root
    with pytest.raises(VerificationError) as exc:
        verify(doc, [AWS_ROOT_G1], NOW)
    assert _rule(exc) == "trust-root"


# ------------------------------------------------------------------------------------------ our documents


def test_issued_documents_verify_with_the_local_root_and_not_the_aws_root(pki: LocalPKI) -> None:
    doc = DocumentIssuer(pki).issue(module_id="i-0123456789abcdef0-enc019bc1f2a0000001",
                                    timestamp_ms=int(NOW.timestamp() * 1000), pcrs={i: b"\x01" * 48 for i in range(3)},
                                    public_key=None, user_data=b"u", nonce=b"n")
    local = TrustRoot.from_certificate(pki.root.certificate)
    assert verify(doc, [local], NOW).user_data == b"u"
    with pytest.raises(VerificationError) as exc:
        verify(doc, [AWS_ROOT_G1], NOW)
    assert _rule(exc) == "trust-root"


def test_a_good_synthetic_chain_verifies() -> None:
    chain = make_chain()
    assert verify(sign_document(chain), [_root(chain)], NOW).module_id.startswith("i-")


# ------------------------------------------------------------------------------------------ one negative per rule


def test_wrong_algorithm_header_is_refused() -> None:
    chain = make_chain()
    doc = sign_document(chain, protected=cbor.encode({1: -7}))
    with pytest.raises(VerificationError) as exc:
        verify(doc, [_root(chain)], NOW)
    assert _rule(exc) == "cose-algorithm"


def test_extra_protected_header_is_refused() -> None:
    chain = make_chain()
    doc = sign_document(chain, protected=cbor.encode({1: -35, 4: b"kid"}))
    with pytest.raises(VerificationError) as exc:
        verify(doc, [_root(chain)], NOW)
    assert _rule(exc) == "cose-algorithm"


def test_unprotected_header_must_be_empty() -> None:
    chain = make_chain()
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain, unprotected={4: b"x"}), [_root(chain)], NOW)
    assert _rule(exc) == "cose-unprotected"


def test_signature_must_be_96_bytes() -> None:
    chain = make_chain()
    body = cbor.decode(sign_document(chain))
    body[3] = body[3][:95]
    with pytest.raises(VerificationError) as exc:
        verify(cbor.encode(body), [_root(chain)], NOW)
    assert _rule(exc) == "cose-signature-length"


def test_signature_by_another_key_is_refused() -> None:
    chain = make_chain()
    doc = sign_document(chain, signing_key=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(VerificationError) as exc:
        verify(doc, [_root(chain)], NOW)
    assert _rule(exc) == "cose-signature"


def test_chain_out_of_order_is_refused() -> None:
    chain = make_chain()
    bundle = chain.cabundle
    doc = sign_document(chain, cabundle=(bundle[0], bundle[2], bundle[1], bundle[3]))
    with pytest.raises(VerificationError) as exc:
        verify(doc, [_root(chain)], NOW)
    assert _rule(exc) == "chain-order"


def test_reversed_bundle_is_refused() -> None:
    chain = make_chain()
    doc = sign_document(chain, cabundle=tuple(reversed(chain.cabundle)))
    with pytest.raises(VerificationError) as exc:
        verify(doc, [_root(chain)], NOW)
    assert _rule(exc) == "trust-root"


def test_forged_link_with_the_right_names_is_refused() -> None:
    chain = make_chain()
    other = make_chain()  # same subject names, different keys
    doc = sign_document(chain, cabundle=(chain.cabundle[0], other.cabundle[1], *chain.cabundle[2:]))
    with pytest.raises(VerificationError) as exc:
        verify(doc, [_root(chain)], NOW)
    assert _rule(exc) == "chain-signature"


def test_intermediate_without_key_cert_sign_is_refused() -> None:
    chain = make_chain({"zonal": replace(PROFILES["zonal"], key_usage=frozenset({"digital_signature"}))})
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "key-usage"


def test_leaf_without_digital_signature_is_refused() -> None:
    chain = make_chain({"leaf": replace(PROFILES["leaf"], key_usage=frozenset({"content_commitment"}))})
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "key-usage"


def test_intermediate_that_is_not_a_ca_is_refused() -> None:
    chain = make_chain({"instance": replace(PROFILES["instance"], ca=False, path_length=None)})
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "basic-constraints"


def test_leaf_that_is_a_ca_is_refused() -> None:
    chain = make_chain({"leaf": replace(PROFILES["leaf"], ca=True, path_length=0)})
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "basic-constraints"


def test_path_length_is_enforced() -> None:
    chain = make_chain({"regional": replace(PROFILES["regional"], path_length=1)})
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "path-length"


def test_unknown_critical_extension_is_refused() -> None:
    chain = make_chain(extra_leaf_extension=x509.OCSPNoCheck())
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "critical-extension"


def test_leaf_key_on_another_curve_is_refused() -> None:
    chain = make_chain(leaf_curve=ec.SECP256R1())
    doc = sign_document(chain, signing_key=ec.generate_private_key(ec.SECP384R1()))  # a 96-byte signature
    with pytest.raises(VerificationError) as exc:
        verify(doc, [_root(chain)], NOW)
    assert _rule(exc) == "certificate-algorithm"


def test_expired_leaf_is_refused() -> None:
    chain = make_chain(start=NOW - timedelta(hours=4))
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain, timestamp=NOW - timedelta(hours=4)), [_root(chain)], NOW)
    assert _rule(exc) == "certificate-validity"


def test_not_yet_valid_chain_is_refused() -> None:
    chain = make_chain()
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW - timedelta(days=3))
    assert _rule(exc) == "certificate-validity"


def test_certificate_signed_ecdsa_with_sha256_is_refused() -> None:
    chain = make_chain(sha256_signed=frozenset({"zonal"}))
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "certificate-algorithm" and "zonal" in str(exc.value)


def test_leaf_signed_ecdsa_with_sha256_is_refused() -> None:
    chain = make_chain(sha256_signed=frozenset({"leaf"}))
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "certificate-algorithm" and "leaf" in str(exc.value)


def test_issuer_key_not_on_p384_is_refused() -> None:
    chain = make_chain(ca_curves={"instance": ec.SECP256R1()})
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "certificate-algorithm" and "no P-384 key" in str(exc.value)


def test_root_without_key_cert_sign_is_refused() -> None:
    chain = make_chain({"root": replace(PROFILES["root"], key_usage=frozenset({"digital_signature", "crl_sign"}))})
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "key-usage" and "root" in str(exc.value)


@pytest.mark.parametrize("window", [
    (NOW - timedelta(days=30), NOW - timedelta(seconds=1)),  # expired
    (NOW + timedelta(seconds=1), NOW + timedelta(days=30)),  # not yet valid
])
def test_root_outside_its_validity_is_refused(window: tuple[datetime, datetime]) -> None:
    chain = make_chain(validity={"root": window})
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "certificate-validity" and "the root certificate" in str(exc.value)


def test_leaf_without_key_usage_is_refused() -> None:
    chain = make_chain({"leaf": replace(PROFILES["leaf"], extensions=("basic_constraints",))})
    assert chain.leaf.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    with pytest.raises(x509.ExtensionNotFound):
        chain.leaf.certificate.extensions.get_extension_for_class(x509.KeyUsage)
    with pytest.raises(VerificationError) as exc:
        verify(sign_document(chain), [_root(chain)], NOW)
    assert _rule(exc) == "key-usage" and "leaf" in str(exc.value)


def test_certificate_with_a_non_positive_serial_is_a_format_error() -> None:
    # RFC 5280 4.1.2.2; cryptography only warns about it, and warnings are process-wide state
    chain = make_chain()
    leaf = chain.leaf.der
    serial = leaf.index(b"\xa0\x03\x02\x01\x02") + 5
    assert leaf[serial] == 0x02
    mutated = bytearray(leaf)
    mutated[serial + 2] |= 0x80
    doc = sign_document(chain)
    body = cbor.decode(doc)
    payload = cbor.decode(body[2])
    payload["certificate"] = bytes(mutated)
    forged = cbor.encode([body[0], body[1], cbor.encode(payload), body[3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttestationFormatError) as exc:
            verify(forged, [_root(chain)], NOW, cache=None)
    assert _rule(exc) == "certificate-der"


def test_verification_does_not_touch_the_warnings_filters() -> None:
    import enclavekit.attestation.verifier as verifier_module

    assert "warnings" not in vars(verifier_module)  # no catch_warnings: it is process-global, not thread-safe
    name = DOCS[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verify(fixture_bytes(name), [AWS_ROOT_G1], verify_at(name), ALLOW_DEBUG, cache=None)


def test_undecodable_certificate_is_a_format_error() -> None:
    chain = make_chain()
    doc = sign_document(chain, cabundle=(chain.cabundle[0], b"\x30\x03\x02\x01\x01", *chain.cabundle[2:]))
    with pytest.raises(AttestationFormatError) as exc:
        verify(doc, [_root(chain)], NOW)
    assert _rule(exc) == "certificate-der"


def test_naive_time_is_a_caller_bug() -> None:
    chain = make_chain()
    with pytest.raises(ValueError, match="timezone"):
        verify(sign_document(chain), [_root(chain)], datetime(2026, 1, 1))


# ------------------------------------------------------------------------------------------ the cache


def test_cache_never_hides_a_mutated_chain() -> None:
    name = "attestation/aws-signed-eif-2022-10-13.cbor"
    data = fixture_bytes(name)
    cache = ChainCache()
    verify(data, [AWS_ROOT_G1], verify_at(name), cache=cache)  # fills the cache
    body = cbor.decode(data)
    payload = cbor.decode(body[2])
    for field, index in (("certificate", None), ("cabundle", 1), ("cabundle", 2), ("cabundle", 3)):
        mutated = dict(payload)
        if index is None:
            der = bytearray(payload[field])
            der[-10] ^= 1  # inside the signature of the leaf
            mutated[field] = bytes(der)
        else:
            bundle = list(payload[field])
            der = bytearray(bundle[index])
            der[-10] ^= 1
            bundle[index] = bytes(der)
            mutated[field] = bundle
        forged = cbor.encode([body[0], body[1], cbor.encode(mutated), body[3]])
        with pytest.raises((VerificationError, FormatError)):
            verify(forged, [AWS_ROOT_G1], verify_at(name), cache=cache)
    # validity is never cached: the same chain is refused at another time
    with pytest.raises(VerificationError):
        verify(data, [AWS_ROOT_G1], verify_at(name) + timedelta(days=30), cache=cache)
    # nor is the pinned root: the same chain is refused under other roots
    with pytest.raises(VerificationError):
        verify(data, [TrustRoot(make_chain().cabundle[0])], verify_at(name), cache=cache)


def test_uncached_verification_gives_the_same_result() -> None:
    name = DOCS[-1]
    a = verify(fixture_bytes(name), [AWS_ROOT_G1], verify_at(name), cache=None)
    b = verify(fixture_bytes(name), [AWS_ROOT_G1], verify_at(name))
    assert a == b


def test_trust_root_constructors() -> None:
    pem = AWS_ROOT_G1.certificate.public_bytes(serialization.Encoding.PEM)  # type: ignore[union-attr]
    assert TrustRoot.from_pem(pem) == AWS_ROOT_G1
    with pytest.raises(ValueError):
        TrustRoot(b"not a certificate")
    with pytest.raises(ValueError):
        TrustRoot.from_pem(b"nope")
