"""KMS operations: lifecycle, aliases, encryption, data keys, signing, policies, tags, rotation, validation."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from kms_core_helpers import ACCOUNT, ALICE, BOB, KMS, REGION, b64, kms, unb64

from enclavekit.kms.ciphertext import CiphertextBlob
from enclavekit.kms.service import KMSService
from enclavekit.kms.types import KMSError, KMSRequest, Principal

__all__ = ["kms"]
OTHER = Principal("AKIAOTHER00000000000", "arn:aws:iam::999988887777:user/eve", "999988887777", "eve")


# ---------------------------------------------------------------------------------------------- create/describe


def test_create_and_describe_symmetric_key(kms: KMS) -> None:
    meta = kms.call("CreateKey", Description="app key", Tags=[{"TagKey": "team", "TagValue": "a"}])["KeyMetadata"]
    assert meta["KeySpec"] == meta["CustomerMasterKeySpec"] == "SYMMETRIC_DEFAULT"
    assert meta["KeyUsage"] == "ENCRYPT_DECRYPT" and meta["KeyState"] == "Enabled" and meta["Enabled"] is True
    assert meta["Arn"] == f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{meta['KeyId']}"
    assert meta["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]
    assert meta["CreationDate"] == kms.now.timestamp()
    described = kms.call("DescribeKey", KeyId=meta["Arn"])["KeyMetadata"]
    assert described == meta
    assert kms.call("ListResourceTags", KeyId=meta["KeyId"])["Tags"] == [{"TagKey": "team", "TagValue": "a"}]


@pytest.mark.parametrize(("spec", "usage", "algorithms"), [
    ("RSA_2048", "ENCRYPT_DECRYPT", ("EncryptionAlgorithms", ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"])),
    ("RSA_2048", "SIGN_VERIFY", ("SigningAlgorithms", 6)),
    ("ECC_NIST_P256", "SIGN_VERIFY", ("SigningAlgorithms", ["ECDSA_SHA_256"])),
    ("ECC_NIST_P384", "SIGN_VERIFY", ("SigningAlgorithms", ["ECDSA_SHA_384"])),
])
def test_create_asymmetric_keys(kms: KMS, spec: str, usage: str, algorithms: tuple[str, object]) -> None:
    meta = kms.call("CreateKey", KeySpec=spec, KeyUsage=usage)["KeyMetadata"]
    member, expected = algorithms
    assert meta[member] == expected or len(meta[member]) == expected
    public = kms.call("GetPublicKey", KeyId=meta["KeyId"])
    key = serialization.load_der_public_key(unb64(public["PublicKey"]))
    assert isinstance(key, rsa.RSAPublicKey if spec.startswith("RSA") else ec.EllipticCurvePublicKey)
    assert public["KeyUsage"] == usage and public["KeySpec"] == spec


def test_create_key_rejects_bad_combinations(kms: KMS) -> None:
    assert kms.error("CreateKey", KeySpec="ECC_NIST_P256").aws_code == "ValidationException"
    assert kms.error("CreateKey", KeySpec="RSA_2048",
                     CustomerMasterKeySpec="RSA_2048").aws_code == "ValidationException"
    assert kms.error("CreateKey", KeySpec="HMAC_256",
                     KeyUsage="GENERATE_VERIFY_MAC").aws_code == "UnsupportedOperationException"
    assert kms.error("CreateKey", Origin="EXTERNAL").aws_code == "UnsupportedOperationException"
    err = kms.error("CreateKey", KeySpec="NOPE")
    assert err.aws_code == "ValidationException" and "Member must satisfy enum value set" in err.aws_message
    assert kms.error("CreateKey", Policy="{").aws_code == "MalformedPolicyDocumentException"


def test_list_keys_paginates(kms: KMS) -> None:
    ids = [kms.create_key() for _ in range(3)]
    first = kms.call("ListKeys", Limit=2)
    assert first["Truncated"] is True and len(first["Keys"]) == 2
    second = kms.call("ListKeys", Limit=2, Marker=first["NextMarker"])
    assert second["Truncated"] is False
    assert sorted(k["KeyId"] for k in first["Keys"] + second["Keys"]) == sorted(ids)
    assert kms.error("ListKeys", Marker="bogus").aws_code == "InvalidMarkerException"


# ---------------------------------------------------------------------------------------------- key ids


def test_key_id_forms(kms: KMS) -> None:
    key_id = kms.create_key()
    kms.call("CreateAlias", AliasName="alias/app", TargetKeyId=key_id)
    arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"
    for ref in (key_id, arn, "alias/app", f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/app"):
        blob = kms.call("Encrypt", KeyId=ref, Plaintext=b64(b"x"))
        assert blob["KeyId"] == arn


@pytest.mark.parametrize(("ref", "fragment"), [
    ("not-a-key", "Invalid keyId"),
    ("00000000-0000-4000-8000-000000000000", "does not exist"),
    ("alias/missing", "is not found"),
    (f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/00000000-0000-4000-8000-000000000000", "does not exist"),
    (f"arn:aws:kms:{REGION}:999988887777:alias/x", "is not found"),
])
def test_unknown_key_ids(kms: KMS, ref: str, fragment: str) -> None:
    err = kms.error("DescribeKey", KeyId=ref)
    assert err.aws_code == "NotFoundException" and fragment in err.aws_message


# ---------------------------------------------------------------------------------------------- encrypt/decrypt


def test_encrypt_decrypt_with_context(kms: KMS) -> None:
    key_id = kms.create_key()
    ctx = {"purpose": "test", "tenant": "t1"}
    out = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"secret"), EncryptionContext=ctx)
    blob = unb64(out["CiphertextBlob"])
    assert len(blob) == 33 + 6 + 16 and blob[0] == 1
    assert CiphertextBlob.from_bytes(blob).key_id == key_id
    dec = kms.call("Decrypt", CiphertextBlob=out["CiphertextBlob"], EncryptionContext=dict(reversed(ctx.items())))
    assert unb64(dec["Plaintext"]) == b"secret" and dec["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert dec["KeyId"].endswith(key_id)


def test_wrong_context_and_tampering_are_invalid_ciphertext(kms: KMS) -> None:
    key_id = kms.create_key()
    blob = unb64(kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"secret"),
                          EncryptionContext={"a": "1"})["CiphertextBlob"])
    assert kms.error("Decrypt", CiphertextBlob=b64(blob), EncryptionContext={"a": "2"}).aws_code == \
        "InvalidCiphertextException"
    assert kms.error("Decrypt", CiphertextBlob=b64(blob)).aws_code == "InvalidCiphertextException"
    for i in (0, 20, 25, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 1
        err = kms.error("Decrypt", CiphertextBlob=b64(bytes(bad)), EncryptionContext={"a": "1"})
        assert err.aws_code == "InvalidCiphertextException"
    assert kms.error("Decrypt", CiphertextBlob=b64(blob[:40]),
                     EncryptionContext={"a": "1"}).aws_code == "InvalidCiphertextException"


def test_decrypt_with_other_key_id_is_incorrect_key(kms: KMS) -> None:
    a, b = kms.create_key(), kms.create_key()
    blob = kms.call("Encrypt", KeyId=a, Plaintext=b64(b"x"))["CiphertextBlob"]
    assert kms.error("Decrypt", CiphertextBlob=blob, KeyId=b).aws_code == "IncorrectKeyException"
    assert unb64(kms.call("Decrypt", CiphertextBlob=blob, KeyId=a)["Plaintext"]) == b"x"


def test_reencrypt(kms: KMS) -> None:
    a, b = kms.create_key(), kms.create_key()
    blob = kms.call("Encrypt", KeyId=a, Plaintext=b64(b"move me"), EncryptionContext={"k": "v"})["CiphertextBlob"]
    out = kms.call("ReEncrypt", CiphertextBlob=blob, SourceEncryptionContext={"k": "v"}, DestinationKeyId=b,
                   DestinationEncryptionContext={"n": "1"})
    assert out["SourceKeyId"].endswith(a) and out["KeyId"].endswith(b)
    assert unb64(kms.call("Decrypt", CiphertextBlob=out["CiphertextBlob"],
                          EncryptionContext={"n": "1"})["Plaintext"]) == b"move me"


def test_rsa_encrypt_decrypt(kms: KMS) -> None:
    key_id = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")
    assert kms.error("Encrypt", KeyId=key_id, Plaintext=b64(b"x")).aws_code == "ValidationException"
    out = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"rsa"), EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    assert len(unb64(out["CiphertextBlob"])) == 256
    dec = kms.call("Decrypt", KeyId=key_id, CiphertextBlob=out["CiphertextBlob"],
                   EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    assert unb64(dec["Plaintext"]) == b"rsa"
    assert kms.error("Decrypt", KeyId=key_id, CiphertextBlob=out["CiphertextBlob"],
                     EncryptionAlgorithm="RSAES_OAEP_SHA_1").aws_code == "InvalidCiphertextException"
    assert kms.error("Encrypt", KeyId=key_id, Plaintext=b64(b"x" * 300),
                     EncryptionAlgorithm="RSAES_OAEP_SHA_256").aws_code == "ValidationException"


def test_key_usage_errors(kms: KMS) -> None:
    signer = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    sym = kms.create_key()
    assert kms.error("Encrypt", KeyId=signer, Plaintext=b64(b"x")).aws_code == "InvalidKeyUsageException"
    assert kms.error("GenerateDataKey", KeyId=signer, KeySpec="AES_256").aws_code == "InvalidKeyUsageException"
    assert kms.error("Sign", KeyId=sym, Message=b64(b"m"),
                     SigningAlgorithm="ECDSA_SHA_256").aws_code == "InvalidKeyUsageException"
    assert kms.error("Sign", KeyId=signer, Message=b64(b"m"),
                     SigningAlgorithm="ECDSA_SHA_384").aws_code == "InvalidKeyUsageException"
    assert kms.error("GetPublicKey", KeyId=sym).aws_code == "UnsupportedOperationException"


# ---------------------------------------------------------------------------------------------- data keys, random


def test_generate_data_key_forms(kms: KMS) -> None:
    key_id = kms.create_key()
    out = kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256", EncryptionContext={"c": "1"})
    assert len(unb64(out["Plaintext"])) == 32
    dec = kms.call("Decrypt", CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"c": "1"})
    assert dec["Plaintext"] == out["Plaintext"]
    assert len(unb64(kms.call("GenerateDataKey", KeyId=key_id, NumberOfBytes=7)["Plaintext"])) == 7
    assert len(unb64(kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_128")["Plaintext"])) == 16
    without = kms.call("GenerateDataKeyWithoutPlaintext", KeyId=key_id, KeySpec="AES_256")
    assert "Plaintext" not in without and "CiphertextBlob" in without
    assert kms.error("GenerateDataKey", KeyId=key_id).aws_code == "ValidationException"
    assert kms.error("GenerateDataKey", KeyId=key_id, KeySpec="AES_256",
                     NumberOfBytes=32).aws_code == "ValidationException"
    assert kms.error("GenerateDataKey", KeyId=key_id, NumberOfBytes=1025).aws_code == "ValidationException"


@pytest.mark.parametrize("spec", ["RSA_2048", "ECC_NIST_P256", "ECC_SECG_P256K1"])
def test_generate_data_key_pair(kms: KMS, spec: str) -> None:
    key_id = kms.create_key()
    out = kms.call("GenerateDataKeyPair", KeyId=key_id, KeyPairSpec=spec)
    private = serialization.load_der_private_key(unb64(out["PrivateKeyPlaintext"]), None)
    assert private.public_key().public_bytes(serialization.Encoding.DER,  # type: ignore[union-attr]
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == unb64(
        out["PublicKey"])
    dec = kms.call("Decrypt", CiphertextBlob=out["PrivateKeyCiphertextBlob"])
    assert dec["Plaintext"] == out["PrivateKeyPlaintext"]
    without = kms.call("GenerateDataKeyPairWithoutPlaintext", KeyId=key_id, KeyPairSpec=spec)
    assert "PrivateKeyPlaintext" not in without and without["KeyPairSpec"] == spec


def test_generate_data_key_pair_unsupported_spec(kms: KMS) -> None:
    key_id = kms.create_key()
    assert kms.error("GenerateDataKeyPair", KeyId=key_id,
                     KeyPairSpec="SM2").aws_code == "UnsupportedOperationException"


def test_generate_random(kms: KMS) -> None:
    assert len(unb64(kms.call("GenerateRandom", NumberOfBytes=64)["Plaintext"])) == 64
    assert kms.error("GenerateRandom").aws_code == "ValidationException"
    assert kms.error("GenerateRandom", NumberOfBytes=0).aws_code == "ValidationException"
    assert kms.error("GenerateRandom", NumberOfBytes=8,
                     CustomKeyStoreId="cks-1").aws_code == "CustomKeyStoreNotFoundException"


# ---------------------------------------------------------------------------------------------- sign/verify


@pytest.mark.parametrize(("spec", "algorithm"), [
    ("RSA_2048", "RSASSA_PSS_SHA_256"), ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA_512"),
    ("ECC_NIST_P256", "ECDSA_SHA_256"), ("ECC_NIST_P384", "ECDSA_SHA_384"),
])
def test_sign_verify(kms: KMS, spec: str, algorithm: str) -> None:
    key_id = kms.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")
    message = b"message to sign"
    sig = kms.call("Sign", KeyId=key_id, Message=b64(message), SigningAlgorithm=algorithm)["Signature"]
    ok = kms.call("Verify", KeyId=key_id, Message=b64(message), Signature=sig, SigningAlgorithm=algorithm)
    assert ok["SignatureValid"] is True
    err = kms.error("Verify", KeyId=key_id, Message=b64(b"other"), Signature=sig, SigningAlgorithm=algorithm)
    assert err.aws_code == "KMSInvalidSignatureException"
    # the signature verifies with the public key alone (interoperable with any verifier)
    public = serialization.load_der_public_key(unb64(kms.call("GetPublicKey", KeyId=key_id)["PublicKey"]))
    h = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[algorithm[-3:]]
    if isinstance(public, rsa.RSAPublicKey):
        pad = (padding.PSS(padding.MGF1(h), h.digest_size) if "PSS" in algorithm else padding.PKCS1v15())
        public.verify(unb64(sig), message, pad, h)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(unb64(sig), message, ec.ECDSA(h))


def test_sign_digest_message_type(kms: KMS) -> None:
    key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    digest = hashlib.sha256(b"m").digest()
    sig = kms.call("Sign", KeyId=key_id, Message=b64(digest), MessageType="DIGEST",
                   SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    assert kms.call("Verify", KeyId=key_id, Message=b64(b"m"), Signature=sig,
                    SigningAlgorithm="ECDSA_SHA_256")["SignatureValid"]
    assert kms.error("Sign", KeyId=key_id, Message=b64(b"short"), MessageType="DIGEST",
                     SigningAlgorithm="ECDSA_SHA_256").aws_code == "ValidationException"


# ---------------------------------------------------------------------------------------------- states


def test_disable_enable(kms: KMS) -> None:
    key_id = kms.create_key()
    kms.call("DisableKey", KeyId=key_id)
    assert kms.call("DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    err = kms.error("Encrypt", KeyId=key_id, Plaintext=b64(b"x"))
    assert err.aws_code == "DisabledException" and "is disabled" in err.aws_message
    kms.call("EnableKey", KeyId=key_id)
    kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"x"))


def test_schedule_and_cancel_deletion(kms: KMS) -> None:
    key_id = kms.create_key()
    blob = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"x"))["CiphertextBlob"]
    assert kms.error("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=6).aws_code == "ValidationException"
    out = kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    assert out["KeyState"] == "PendingDeletion" and out["DeletionDate"] == (kms.now + timedelta(days=7)).timestamp()
    meta = kms.call("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert meta["PendingDeletionWindowInDays"] == 7
    assert kms.error("Decrypt", CiphertextBlob=blob).aws_code == "KMSInvalidStateException"
    assert kms.error("EnableKey", KeyId=key_id).aws_code == "KMSInvalidStateException"
    assert kms.error("ScheduleKeyDeletion", KeyId=key_id).aws_code == "KMSInvalidStateException"
    kms.call("CancelKeyDeletion", KeyId=key_id)
    assert kms.call("DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    assert kms.error("CancelKeyDeletion", KeyId=key_id).aws_code == "KMSInvalidStateException"


def test_key_is_gone_after_the_window(kms: KMS) -> None:
    key_id = kms.create_key()
    kms.call("CreateAlias", AliasName="alias/doomed", TargetKeyId=key_id)
    kms.call("ScheduleKeyDeletion", KeyId=key_id)
    later = kms.now + timedelta(days=30, seconds=1)
    assert kms.error("DescribeKey", now=later, KeyId=key_id).aws_code == "NotFoundException"
    assert kms.call("ListKeys", now=later)["Keys"] == []
    assert kms.call("ListAliases", now=later)["Aliases"] == []


# ---------------------------------------------------------------------------------------------- aliases


def test_alias_lifecycle(kms: KMS) -> None:
    a, b = kms.create_key(), kms.create_key()
    kms.call("CreateAlias", AliasName="alias/app", TargetKeyId=a)
    assert kms.error("CreateAlias", AliasName="alias/app", TargetKeyId=b).aws_code == "AlreadyExistsException"
    listed = kms.call("ListAliases")["Aliases"]
    assert [(x["AliasName"], x["TargetKeyId"]) for x in listed] == [("alias/app", a)]
    assert listed[0]["AliasArn"] == f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/app"
    kms.call("UpdateAlias", AliasName="alias/app", TargetKeyId=b)
    assert kms.call("DescribeKey", KeyId="alias/app")["KeyMetadata"]["KeyId"] == b
    assert kms.call("ListAliases", KeyId=a)["Aliases"] == []
    kms.call("DeleteAlias", AliasName="alias/app")
    assert kms.error("DeleteAlias", AliasName="alias/app").aws_code == "NotFoundException"
    assert kms.error("UpdateAlias", AliasName="alias/app", TargetKeyId=a).aws_code == "NotFoundException"


@pytest.mark.parametrize(("name", "code"), [
    ("app", "InvalidAliasNameException"),
    ("alias/aws/s3", "InvalidAliasNameException"),
    ("alias/bad name", "ValidationException"),
])
def test_alias_names(kms: KMS, name: str, code: str) -> None:
    key_id = kms.create_key()
    assert kms.error("CreateAlias", AliasName=name, TargetKeyId=key_id).aws_code == code


def test_update_alias_needs_same_key_type(kms: KMS) -> None:
    sym = kms.create_key()
    signer = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    kms.call("CreateAlias", AliasName="alias/x", TargetKeyId=sym)
    assert kms.error("UpdateAlias", AliasName="alias/x", TargetKeyId=signer).aws_code == "ValidationException"


# ---------------------------------------------------------------------------------------------- rotation


def test_rotation_keeps_old_material(kms: KMS) -> None:
    key_id = kms.create_key()
    old = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"v1"))["CiphertextBlob"]
    kms.call("RotateKeyOnDemand", KeyId=key_id)
    new = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"v2"))["CiphertextBlob"]
    assert CiphertextBlob.from_bytes(unb64(old)).material_version == 1
    assert CiphertextBlob.from_bytes(unb64(new)).material_version == 2
    assert unb64(kms.call("Decrypt", CiphertextBlob=old)["Plaintext"]) == b"v1"
    assert unb64(kms.call("Decrypt", CiphertextBlob=new)["Plaintext"]) == b"v2"


def test_automatic_rotation(kms: KMS) -> None:
    key_id = kms.create_key()
    assert kms.call("GetKeyRotationStatus", KeyId=key_id) == {"KeyRotationEnabled": False,
                                                               "KeyId": kms.call("DescribeKey", KeyId=key_id)[
                                                                   "KeyMetadata"]["Arn"]}
    kms.call("EnableKeyRotation", KeyId=key_id, RotationPeriodInDays=90)
    status = kms.call("GetKeyRotationStatus", KeyId=key_id)
    assert status["KeyRotationEnabled"] and status["RotationPeriodInDays"] == 90
    later = kms.now + timedelta(days=91)
    blob = kms.call("Encrypt", now=later, KeyId=key_id, Plaintext=b64(b"x"))["CiphertextBlob"]
    assert CiphertextBlob.from_bytes(unb64(blob)).material_version == 2
    kms.call("DisableKeyRotation", KeyId=key_id, now=later)
    assert kms.call("GetKeyRotationStatus", KeyId=key_id, now=later)["KeyRotationEnabled"] is False
    assert kms.error("EnableKeyRotation", KeyId=key_id, RotationPeriodInDays=30).aws_code == "ValidationException"


def test_rotation_limits_and_unsupported(kms: KMS) -> None:
    key_id = kms.create_key()
    for _ in range(10):
        kms.call("RotateKeyOnDemand", KeyId=key_id)
    assert kms.error("RotateKeyOnDemand", KeyId=key_id).aws_code == "LimitExceededException"
    signer = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    assert kms.error("EnableKeyRotation", KeyId=signer).aws_code == "UnsupportedOperationException"
    kms.call("DisableKey", KeyId=key_id)
    assert kms.error("RotateKeyOnDemand", KeyId=key_id).aws_code == "DisabledException"


# ---------------------------------------------------------------------------------------------- tags, policies


def test_tags(kms: KMS) -> None:
    key_id = kms.create_key()
    kms.call("TagResource", KeyId=key_id, Tags=[{"TagKey": "a", "TagValue": "1"}, {"TagKey": "b", "TagValue": ""}])
    kms.call("TagResource", KeyId=key_id, Tags=[{"TagKey": "a", "TagValue": "2"}])
    assert kms.call("ListResourceTags", KeyId=key_id)["Tags"] == [{"TagKey": "a", "TagValue": "2"},
                                                                  {"TagKey": "b", "TagValue": ""}]
    kms.call("UntagResource", KeyId=key_id, TagKeys=["a"])
    assert kms.call("ListResourceTags", KeyId=key_id)["Tags"] == [{"TagKey": "b", "TagValue": ""}]
    assert kms.error("TagResource", KeyId=key_id,
                     Tags=[{"TagKey": "aws:x", "TagValue": "1"}]).aws_code == "TagException"
    assert kms.error("TagResource", KeyId=key_id, Tags=[{"TagKey": f"k{i}", "TagValue": "v"}
                                                        for i in range(50)]).aws_code == "LimitExceededException"
    assert kms.error("TagResource", KeyId=key_id,
                     Tags=[{"TagKey": "", "TagValue": "1"}]).aws_code == "ValidationException"


def test_policy_get_put_list(kms: KMS) -> None:
    key_id = kms.create_key()
    policy = json.loads(kms.call("GetKeyPolicy", KeyId=key_id)["Policy"])
    assert policy["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    assert kms.call("GetKeyPolicy", KeyId=key_id, PolicyName="default")["PolicyName"] == "default"
    assert kms.error("GetKeyPolicy", KeyId=key_id, PolicyName="other").aws_code == "NotFoundException"
    assert kms.call("ListKeyPolicies", KeyId=key_id)["PolicyNames"] == ["default"]
    only_bob = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "Bob", "Effect": "Allow", "Principal": {"AWS": BOB.arn}, "Action": "kms:*", "Resource": "*"}]})
    err = kms.error("PutKeyPolicy", KeyId=key_id, Policy=only_bob)
    assert err.aws_code == "MalformedPolicyDocumentException"  # lockout safety check
    kms.call("PutKeyPolicy", KeyId=key_id, Policy=only_bob, BypassPolicyLockoutSafetyCheck=True)
    denied = kms.error("Encrypt", KeyId=key_id, Plaintext=b64(b"x"))
    assert denied.aws_code == "AccessDeniedException"
    assert denied.aws_message == (f"User: {ALICE.arn} is not authorized to perform: kms:Encrypt on resource: "
                                  f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id} because no resource-based policy "
                                  "allows the action")
    kms.call("Encrypt", principal=BOB, KeyId=key_id, Plaintext=b64(b"x"))
    assert kms.error("PutKeyPolicy", KeyId=key_id, Policy='{"Statement": []}').aws_code == "AccessDeniedException"


def test_explicit_deny_with_encryption_context_condition(kms: KMS) -> None:
    key_id = kms.create_key()
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "Root", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "NeedTenant", "Effect": "Deny", "Principal": "*", "Action": ["kms:Encrypt", "kms:Decrypt"],
         "Resource": "*", "Condition": {"Null": {"kms:EncryptionContext:tenant": "true"}}}]})
    kms.call("PutKeyPolicy", KeyId=key_id, Policy=policy)
    err = kms.error("Encrypt", KeyId=key_id, Plaintext=b64(b"x"))
    assert err.aws_code == "AccessDeniedException"
    assert "explicit deny" in err.aws_message and "'NeedTenant'" in err.aws_message
    assert err.audit.decision is not None and "NeedTenant" in err.audit.decision
    kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"tenant": "t"})


def test_other_account_principal_is_denied(kms: KMS) -> None:
    key_id = kms.create_key()
    assert kms.error("DescribeKey", principal=OTHER, KeyId=key_id).aws_code == "AccessDeniedException"


def test_dry_run(kms: KMS) -> None:
    key_id = kms.create_key()
    err = kms.error("Encrypt", KeyId=key_id, Plaintext=b64(b"x"), DryRun=True)
    assert err.aws_code == "DryRunOperationException" and err.status == 412


# ---------------------------------------------------------------------------------------------- validation, audit


@pytest.mark.parametrize(("operation", "params", "code"), [
    ("Nope", {}, "UnknownOperationException"),
    ("Encrypt", {"Plaintext": "eA=="}, "ValidationException"),
    ("Encrypt", {"KeyId": "k", "Plaintext": ""}, "ValidationException"),
    ("Encrypt", {"KeyId": "k", "Plaintext": "not base64!"}, "SerializationException"),
    ("Encrypt", {"KeyId": 5, "Plaintext": "eA=="}, "SerializationException"),
    ("Encrypt", {"KeyId": "k", "Plaintext": b64(b"x" * 4097)}, "ValidationException"),
    ("Encrypt", {"KeyId": "k", "Plaintext": "eA==", "EncryptionContext": {"a": 1}}, "SerializationException"),
    ("Encrypt", {"KeyId": "k", "Plaintext": "eA==", "GrantTokens": ["t"] * 11}, "ValidationException"),
    ("Decrypt", {"CiphertextBlob": b64(b"x" * 6145)}, "ValidationException"),
    ("GenerateRandom", {"NumberOfBytes": "8"}, "SerializationException"),
    ("GenerateRandom", {"NumberOfBytes": True}, "SerializationException"),
    ("ListKeys", {"Limit": 0}, "ValidationException"),
    ("DescribeKey", {"KeyId": ""}, "ValidationException"),
    ("Sign", {"KeyId": "k", "Message": "eA==", "SigningAlgorithm": "NOPE"}, "ValidationException"),
    ("TagResource", {"KeyId": "k", "Tags": [{"TagKey": "a"}]}, "SerializationException"),
])
def test_request_validation(kms: KMS, operation: str, params: dict[str, object], code: str) -> None:
    assert kms.error(operation, **params).aws_code == code


def test_validation_message_is_aws_shaped(kms: KMS) -> None:
    err = kms.error("Encrypt", Plaintext="eA==")
    assert err.aws_message == ("1 validation error detected: Value null at 'keyId' failed to satisfy constraint: "
                               "Member must not be null")


def test_audit_info_never_contains_secrets(kms: KMS) -> None:
    key_id = kms.create_key()
    result = kms.result("Encrypt", KeyId=key_id, Plaintext=b64(b"topsecret"), EncryptionContext={"c": "1"})
    assert result.audit.request_parameters == {"keyId": key_id, "encryptionContext": {"c": "1"}}
    assert result.audit.read_only is True
    assert result.audit.resources == [{"accountId": ACCOUNT, "type": "AWS::KMS::Key",
                                       "ARN": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"}]
    assert "topsecret" not in repr(result.audit) and b64(b"topsecret") not in repr(result.audit)
    err = kms.error("DescribeKey", KeyId="alias/none")
    assert err.audit.request_parameters == {"keyId": "alias/none"}


def test_service_needs_timezone_aware_now(kms: KMS) -> None:
    request = KMSRequest("ListKeys", {}, ALICE, "r", kms.now.replace(tzinfo=None))
    with pytest.raises(ValueError):
        kms.service.handle(request)


def test_constructor_checks(kms: KMS) -> None:
    with pytest.raises(ValueError):
        KMSService(kms.store, trust_roots=kms.service.recipients.trust_roots, account_id="12", region=REGION)
    with pytest.raises(ValueError):
        KMSService(kms.store, trust_roots=[], account_id=ACCOUNT, region=REGION)


def test_blobs_are_standard_base64(kms: KMS) -> None:
    key_id = kms.create_key()
    out = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"\xff" * 40))
    assert base64.b64encode(base64.b64decode(out["CiphertextBlob"], validate=True)).decode() == \
        out["CiphertextBlob"]
    with pytest.raises(KMSError):
        kms.call("Decrypt", CiphertextBlob=out["CiphertextBlob"].replace("=", ""))
