"""Recipient (spec 4.2-4.5): attested Decrypt/GenerateDataKey/GenerateDataKeyPair/GenerateRandom, PCR conditions,
debug-mode documents, non-RSA keys, untrusted documents, freshness and single-use nonces."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from kms_core_helpers import (
    ACCOUNT,
    DEBUG_PCRS,
    ENCLAVE_SPKI,
    KMS,
    PCR0,
    PCRS,
    b64,
    kms,
    make_kms,
    open_for_enclave,
    unb64,
)

from enclavekit.attestation.issuer import DocumentIssuer
from enclavekit.attestation.pki import LocalPKI
from enclavekit.formats.cms import EnvelopedData, subject_key_identifier
from enclavekit.kms.recipient import condition_keys, parse_recipient
from enclavekit.kms.types import KMSError

__all__ = ["kms"]


def _enclave_policy(condition: dict[str, object], sid: str = "AllowEnclave") -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "NotAction": ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyPair"], "Resource": "*"},
        {"Sid": sid, "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyPair"], "Resource": "*",
         "Condition": condition}]})


def _key_with_secret(kms: KMS, policy: str | None = None) -> tuple[str, str]:
    key_id = kms.create_key()
    blob = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"the secret"))["CiphertextBlob"]
    if policy is not None:
        kms.call("PutKeyPolicy", KeyId=key_id, Policy=policy)
    return key_id, blob


def test_decrypt_with_recipient(kms: KMS) -> None:
    _, blob = _key_with_secret(kms)
    result = kms.result("Decrypt", CiphertextBlob=blob, Recipient=kms.recipient())
    out = result.response
    assert "Plaintext" not in out
    assert open_for_enclave(out["CiphertextForRecipient"]) == b"the secret"
    env = EnvelopedData.from_bytes(unb64(out["CiphertextForRecipient"]))
    assert env.subject_key_identifier == subject_key_identifier(ENCLAVE_SPKI)
    assert unb64(out["CiphertextForRecipient"]).startswith(bytes.fromhex("308006092a864886f70d010703a080308002010231"))
    assert result.audit.recipient is not None
    assert result.audit.recipient.image_sha384 == PCR0.hex()
    assert result.audit.recipient.pcrs[3] == PCRS[3].hex()
    assert "recipient" not in (result.audit.request_parameters or {})


def test_generate_data_key_with_recipient(kms: KMS) -> None:
    key_id = kms.create_key()
    out = kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256", Recipient=kms.recipient())
    assert "Plaintext" not in out
    data_key = open_for_enclave(out["CiphertextForRecipient"])
    assert len(data_key) == 32
    assert unb64(kms.call("Decrypt", CiphertextBlob=out["CiphertextBlob"])["Plaintext"]) == data_key


def test_generate_data_key_pair_with_recipient(kms: KMS) -> None:
    key_id = kms.create_key()
    out = kms.call("GenerateDataKeyPair", KeyId=key_id, KeyPairSpec="ECC_NIST_P384", Recipient=kms.recipient())
    assert "PrivateKeyPlaintext" not in out
    private = serialization.load_der_private_key(open_for_enclave(out["CiphertextForRecipient"]), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)


def test_generate_random_with_recipient(kms: KMS) -> None:
    out = kms.call("GenerateRandom", NumberOfBytes=32, Recipient=kms.recipient())
    assert set(out) == {"CiphertextForRecipient"}
    assert len(open_for_enclave(out["CiphertextForRecipient"])) == 32


def test_pcr_condition_allows_matching_image(kms: KMS) -> None:
    _, blob = _key_with_secret(kms, _enclave_policy(
        {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0.hex().upper(),
                                    "kms:RecipientAttestation:PCR3": PCRS[3].hex()}}))
    out = kms.call("Decrypt", CiphertextBlob=blob, Recipient=kms.recipient())
    assert open_for_enclave(out["CiphertextForRecipient"]) == b"the secret"


def test_pcr_condition_denies_other_image_and_says_why(kms: KMS) -> None:
    key_id, blob = _key_with_secret(kms, _enclave_policy(
        {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0.hex()}}))
    other = dict(PCRS) | {0: bytes.fromhex("bb" * 48)}
    err = kms.error("Decrypt", CiphertextBlob=blob, Recipient=kms.recipient(pcrs=other))
    assert err.aws_code == "AccessDeniedException"
    assert err.aws_message == (
        f"User: arn:aws:iam::{ACCOUNT}:user/alice is not authorized to perform: kms:Decrypt on resource: "
        f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id} because statement 'AllowEnclave' condition "
        "StringEqualsIgnoreCase kms:RecipientAttestation:ImageSha384 did not match")
    assert err.audit.recipient is not None  # the denied attempt is audited with the enclave's identity
    # and without a Recipient the condition key is absent, so the call is denied too (spec 4.5)
    assert kms.error("Decrypt", CiphertextBlob=blob).aws_code == "AccessDeniedException"


def test_debug_mode_document_is_accepted_but_fails_pcr_conditions(kms: KMS) -> None:
    # AWS accepts debug-mode documents; their zero PCR0 matches no realistic condition (spec 4.5)
    _, open_blob = _key_with_secret(kms)
    out = kms.call("Decrypt", CiphertextBlob=open_blob, Recipient=kms.recipient(pcrs=DEBUG_PCRS))
    assert open_for_enclave(out["CiphertextForRecipient"]) == b"the secret"
    _, guarded = _key_with_secret(kms, _enclave_policy(
        {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0.hex()}}))
    err = kms.error("Decrypt", CiphertextBlob=guarded, Recipient=kms.recipient(pcrs=DEBUG_PCRS))
    assert err.aws_code == "AccessDeniedException"


@pytest.mark.parametrize(("public_key", "fragment"), [
    (None, "no public_key"),
    (b"not a key", "not a DER SubjectPublicKeyInfo"),
    (ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo), "not an RSA key"),
    (rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo), "1024 bits"),
])
def test_recipient_key_must_be_rsa_spki(kms: KMS, public_key: bytes | None, fragment: str) -> None:
    err = kms.error("GenerateRandom", NumberOfBytes=8, Recipient=kms.recipient(public_key=public_key))
    assert err.aws_code == "ValidationException" and fragment in err.aws_message


def test_untrusted_root_is_refused(kms: KMS, tmp_path: Path) -> None:
    stranger = DocumentIssuer(LocalPKI.open(tmp_path / "other", now=kms.now - timedelta(days=1)))
    document = stranger.issue(module_id="i-0123456789abcdef0-enc0123456789abcdef",
                              timestamp_ms=int(kms.now.timestamp() * 1000), pcrs=PCRS, public_key=ENCLAVE_SPKI,
                              user_data=None, nonce=None)
    err = kms.error("GenerateRandom", NumberOfBytes=8,
                    Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": b64(document)})
    assert err.aws_code == "ValidationException" and "trust-root" in err.aws_message


def test_expired_document_is_refused(kms: KMS) -> None:
    old = kms.document(at=kms.now - timedelta(hours=4))  # the leaf lives 3 hours
    err = kms.error("GenerateRandom", NumberOfBytes=8,
                    Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": b64(old)})
    assert err.aws_code == "ValidationException" and "certificate-validity" in err.aws_message


def test_tampered_document_is_refused(kms: KMS) -> None:
    document = bytearray(kms.document())
    document[-5] ^= 1
    err = kms.error("GenerateRandom", NumberOfBytes=8, Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                                                                  "AttestationDocument": b64(bytes(document))})
    assert err.aws_code == "ValidationException"


def test_real_aws_document_is_refused_without_the_aws_root(kms: KMS) -> None:
    fixture = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "attestation"
    document = (fixture / "aws-indefinite-map-2025-09-16.cbor").read_bytes()
    err = kms.error("GenerateRandom", NumberOfBytes=8, Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                                                                  "AttestationDocument": b64(document)})
    assert err.aws_code == "ValidationException"


@pytest.mark.parametrize(("recipient", "code"), [
    ("text", "SerializationException"),
    ({"AttestationDocument": "AA=="}, "ValidationException"),
    ({"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_1", "AttestationDocument": "AA=="}, "ValidationException"),
    ({"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}, "ValidationException"),
    ({"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "!!"}, "SerializationException"),
    ({"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": ""}, "ValidationException"),
    ({"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "AA==", "X": 1},
     "ValidationException"),
    ({"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "AAAA"}, "ValidationException"),
])
def test_malformed_recipient(kms: KMS, recipient: object, code: str) -> None:
    assert kms.error("GenerateRandom", NumberOfBytes=8, Recipient=recipient).aws_code == code


def test_parse_recipient_size_cap() -> None:
    with pytest.raises(KMSError, match="less than or equal to 262144"):
        parse_recipient({"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "A" * 350000})


def test_condition_keys_are_lowercase_hex() -> None:
    from enclavekit.kms.types import RecipientContext

    keys = condition_keys(RecipientContext("m", "ab" * 48, {0: "ab" * 48, 7: "cd" * 48}, b""))
    assert keys == {"kms:RecipientAttestation:ImageSha384": "ab" * 48, "kms:RecipientAttestation:PCR0": "ab" * 48,
                    "kms:RecipientAttestation:PCR7": "cd" * 48}


# ---------------------------------------------------------------------------------------------- freshness


def test_max_attestation_age(tmp_path: Path) -> None:
    kms = make_kms(tmp_path, max_attestation_age=timedelta(minutes=5))
    try:
        fresh = kms.call("GenerateRandom", NumberOfBytes=8, Recipient=kms.recipient(at=kms.now - timedelta(minutes=4)))
        assert "CiphertextForRecipient" in fresh
        err = kms.error("GenerateRandom", NumberOfBytes=8, Recipient=kms.recipient(at=kms.now - timedelta(minutes=6)))
        assert err.aws_code == "AccessDeniedException" and "max-age" in err.aws_message
    finally:
        kms.store.close()


def test_single_use_nonces(tmp_path: Path) -> None:
    kms = make_kms(tmp_path, single_use_nonces=True)
    try:
        recipient = kms.recipient(nonce=b"n" * 32)
        kms.call("GenerateRandom", NumberOfBytes=8, Recipient=recipient)
        err = kms.error("GenerateRandom", NumberOfBytes=8, Recipient=recipient)
        assert err.aws_code == "AccessDeniedException" and "already used" in err.aws_message
        # a new document with the same nonce is a replay too
        err = kms.error("GenerateRandom", NumberOfBytes=8, Recipient=kms.recipient(nonce=b"n" * 32))
        assert err.aws_code == "AccessDeniedException"
        kms.call("GenerateRandom", NumberOfBytes=8, Recipient=kms.recipient(nonce=b"m" * 32))
        err = kms.error("GenerateRandom", NumberOfBytes=8, Recipient=kms.recipient(nonce=None))
        assert err.aws_code == "AccessDeniedException" and "no nonce" in err.aws_message
    finally:
        kms.store.close()


def test_denied_request_does_not_consume_the_nonce(tmp_path: Path) -> None:
    kms = make_kms(tmp_path, single_use_nonces=True)
    try:
        key_id, blob = _key_with_secret(kms, _enclave_policy(
            {"StringEquals": {"kms:RecipientAttestation:PCR0": PCR0.hex()}}))
        bad = kms.recipient(nonce=b"z" * 32, pcrs=dict(PCRS) | {0: bytes(48)})
        assert kms.error("Decrypt", CiphertextBlob=blob, Recipient=bad).aws_code == "AccessDeniedException"
        good = kms.recipient(nonce=b"z" * 32)
        assert open_for_enclave(kms.call("Decrypt", CiphertextBlob=blob, Recipient=good)[
            "CiphertextForRecipient"]) == b"the secret"
        assert key_id
    finally:
        kms.store.close()


def test_replay_allowed_by_default(kms: KMS) -> None:
    recipient = kms.recipient(nonce=b"n" * 32)
    kms.call("GenerateRandom", NumberOfBytes=8, Recipient=recipient)
    kms.call("GenerateRandom", NumberOfBytes=8, Recipient=recipient)
