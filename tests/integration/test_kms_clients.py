"""Real AWS clients against a real ``enclavekit kms serve`` process, on SQLite and on PostgreSQL (issue 5, Real
clients): boto3, the AWS CLI, the AWS Encryption SDK, and the Recipient flow with attestation documents issued by
the local PKI and a key policy on ``kms:RecipientAttestation:ImageSha384``.

The same tests run against both stores; PostgreSQL is started privately (tests/integration/kms_support.py) and a
missing PostgreSQL FAILS the run.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from kms_support import (
    ACCOUNT,
    INSTANCE,
    REGION,
    KMSServer,
    assert_trail_valid,
    attestation_document,
    fresh_database,
    live_trail_records,
    recipient_param,
    running_postgres,
    trail_events,
)

from enclavekit.formats.cms import open_envelope
from enclavekit.formats.pcr import pcr4_instance_id

pytestmark = pytest.mark.integration

AWS = str(Path(sys.executable).with_name("aws"))
GOOD_PCR0 = bytes.fromhex("a1" * 48)
OTHER_PCR0 = bytes.fromhex("b2" * 48)


@dataclass
class KMS:
    server: KMSServer
    creds: dict[str, str]
    backend: str

    def client(self, **kw: Any) -> Any:
        return self.server.client(self.creds, **kw)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def kms(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KMS]:
    base = tmp_path_factory.mktemp(f"kms-{request.param}")
    url = None
    if request.param == "postgres":
        url = fresh_database(request.getfixturevalue("postgres_url"), "kms_clients")
    server = KMSServer(base / "data", home=base / "home", database_url=url)
    creds = server.credentials("alice")
    server.start()
    try:
        yield KMS(server, creds, request.param)
    finally:
        server.stop()
    # every call of the module left a record, and the sealed trail validates
    assert_trail_valid("--trail", str(server.data_dir / "audit"))
    assert trail_events("--trail", str(server.data_dir / "audit"))


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


# --------------------------------------------------------------------------------------------- boto3


def test_boto3_keys_encrypt_decrypt_and_states(kms: KMS) -> None:
    c = kms.client()
    meta = c.create_key(Description="app secrets")["KeyMetadata"]
    key_id = meta["KeyId"]
    assert meta["Arn"] == f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"
    assert c.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "app secrets"
    assert key_id in [k["KeyId"] for k in c.list_keys()["Keys"]]

    ctx = {"purpose": "test", "tenant": "a"}
    blob = c.encrypt(KeyId=key_id, Plaintext=b"attack at dawn", EncryptionContext=ctx)["CiphertextBlob"]
    out = c.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
    assert out["Plaintext"] == b"attack at dawn"
    assert out["KeyId"] == meta["Arn"]
    with pytest.raises(ClientError) as wrong_ctx:
        c.decrypt(CiphertextBlob=blob, EncryptionContext={"purpose": "other"})
    assert error_code(wrong_ctx) == "InvalidCiphertextException"
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(ClientError) as bad_blob:
        c.decrypt(CiphertextBlob=bytes(tampered), EncryptionContext=ctx)
    assert error_code(bad_blob) == "InvalidCiphertextException"

    c.disable_key(KeyId=key_id)
    with pytest.raises(ClientError) as disabled:
        c.encrypt(KeyId=key_id, Plaintext=b"x")
    assert error_code(disabled) == "DisabledException"
    c.enable_key(KeyId=key_id)
    c.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(ClientError) as pending:
        c.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
    assert error_code(pending) == "KMSInvalidStateException"
    c.cancel_key_deletion(KeyId=key_id)
    c.enable_key(KeyId=key_id)
    assert c.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)["Plaintext"] == b"attack at dawn"


def test_boto3_aliases_work_wherever_a_key_id_does(kms: KMS) -> None:
    c = kms.client()
    first = c.create_key()["KeyMetadata"]["KeyId"]
    second = c.create_key()["KeyMetadata"]["KeyId"]
    alias = f"alias/app-{kms.backend}"
    c.create_alias(AliasName=alias, TargetKeyId=first)
    blob = c.encrypt(KeyId=alias, Plaintext=b"via alias")["CiphertextBlob"]
    assert c.decrypt(CiphertextBlob=blob)["KeyId"].endswith(first)
    assert c.describe_key(KeyId=f"arn:aws:kms:{REGION}:{ACCOUNT}:{alias}")["KeyMetadata"]["KeyId"] == first
    assert alias in [a["AliasName"] for a in c.list_aliases()["Aliases"]]
    c.update_alias(AliasName=alias, TargetKeyId=second)
    assert c.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"] == second
    c.delete_alias(AliasName=alias)
    with pytest.raises(ClientError) as gone:
        c.describe_key(KeyId=alias)
    assert error_code(gone) == "NotFoundException"


def test_boto3_data_keys_and_random(kms: KMS) -> None:
    c = kms.client()
    key_id = c.create_key()["KeyMetadata"]["KeyId"]
    dk = c.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext={"a": "b"})
    assert len(dk["Plaintext"]) == 32
    assert c.decrypt(CiphertextBlob=dk["CiphertextBlob"], EncryptionContext={"a": "b"})["Plaintext"] == \
        dk["Plaintext"]
    bare = c.generate_data_key_without_plaintext(KeyId=key_id, NumberOfBytes=24)
    assert "Plaintext" not in bare
    assert len(c.decrypt(CiphertextBlob=bare["CiphertextBlob"])["Plaintext"]) == 24
    assert len(c.generate_random(NumberOfBytes=48)["Plaintext"]) == 48


def test_boto3_sign_verify_and_public_key(kms: KMS) -> None:
    c = kms.client()
    key_id = c.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    sig = c.sign(KeyId=key_id, Message=b"release v1", SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    assert c.verify(KeyId=key_id, Message=b"release v1", Signature=sig,
                    SigningAlgorithm="ECDSA_SHA_256")["SignatureValid"] is True
    with pytest.raises(ClientError) as bad:
        c.verify(KeyId=key_id, Message=b"release v2", Signature=sig, SigningAlgorithm="ECDSA_SHA_256")
    assert error_code(bad) == "KMSInvalidSignatureException"
    der = c.get_public_key(KeyId=key_id)["PublicKey"]
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig, b"release v1", ec.ECDSA(hashes.SHA256()))  # raises if KMS signed something else


def test_boto3_errors_are_client_error_codes(kms: KMS) -> None:
    c = kms.client()
    with pytest.raises(ClientError) as missing:
        c.describe_key(KeyId="1234abcd-12ab-34cd-56ef-1234567890ab")
    assert error_code(missing) == "NotFoundException"
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert missing.value.response["ResponseMetadata"]["RequestId"]
    with pytest.raises(ClientError) as invalid:
        c.generate_random(NumberOfBytes=5000)
    assert error_code(invalid) == "ValidationException"
    bad_creds = dict(kms.creds, SecretAccessKey="not-the-secret")
    with pytest.raises(ClientError) as sig:
        kms.server.client(bad_creds).list_keys()
    assert error_code(sig) == "InvalidSignatureException"
    unknown = dict(kms.creds, AccessKeyId="AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(ClientError) as who:
        kms.server.client(unknown).list_keys()
    assert error_code(who) == "UnrecognizedClientException"


# --------------------------------------------------------------------------------------------- AWS CLI


def test_aws_cli_encrypt_decrypt(kms: KMS, tmp_path: Path) -> None:
    key_id = kms.client().create_key()["KeyMetadata"]["KeyId"]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": kms.creds["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": kms.creds["SecretAccessKey"], "AWS_DEFAULT_REGION": REGION,
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_MAX_ATTEMPTS": "1"}
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"cli secret\n")

    def aws(*args: str) -> str:
        result = subprocess.run([AWS, "kms", *args, "--endpoint-url", kms.server.endpoint, "--output", "text"],
                                env=env, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    blob_b64 = aws("encrypt", "--key-id", key_id, "--plaintext", f"fileb://{secret}",
                   "--encryption-context", "app=cli", "--query", "CiphertextBlob")
    (tmp_path / "blob").write_bytes(base64.b64decode(blob_b64))
    plain_b64 = aws("decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'blob'}",
                    "--encryption-context", "app=cli", "--query", "Plaintext")
    assert base64.b64decode(plain_b64) == b"cli secret\n"
    denied = subprocess.run([AWS, "kms", "decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'blob'}",
                             "--endpoint-url", kms.server.endpoint], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert denied.returncode != 0
    assert "InvalidCiphertextException" in denied.stderr


# --------------------------------------------------------------------------------------------- Encryption SDK


def test_aws_encryption_sdk_round_trip(kms: KMS, monkeypatch: pytest.MonkeyPatch) -> None:
    import aws_encryption_sdk
    import botocore.session
    from aws_encryption_sdk.identifiers import CommitmentPolicy
    from aws_encryption_sdk.key_providers.kms import StrictAwsKmsMasterKeyProvider

    arn = kms.client().create_key()["KeyMetadata"]["Arn"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms.server.endpoint)
    session = botocore.session.Session()
    session.set_credentials(kms.creds["AccessKeyId"], kms.creds["SecretAccessKey"])
    provider = StrictAwsKmsMasterKeyProvider(key_ids=[arn], botocore_session=session)
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    message = b"an enveloped message " * 100
    ciphertext, _ = client.encrypt(source=message, key_provider=provider, encryption_context={"app": "esdk"})
    assert message not in ciphertext
    plaintext, header = client.decrypt(source=ciphertext, key_provider=provider)
    assert plaintext == message
    assert header.encryption_context["app"] == "esdk"


# --------------------------------------------------------------------------------------------- Recipient


def test_recipient_flow_with_pcr0_policy(kms: KMS) -> None:
    c = kms.client()
    arn = c.create_key()["KeyMetadata"]["Arn"]
    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Manage", "Effect": "Allow", "Principal": {"AWS": kms.creds["Arn"]},
         "Action": ["kms:Encrypt", "kms:DescribeKey", "kms:GetKeyPolicy", "kms:PutKeyPolicy"], "Resource": "*"},
        {"Sid": "EnclaveOnly", "Effect": "Allow", "Principal": {"AWS": kms.creds["Arn"]},
         "Action": ["kms:Decrypt", "kms:GenerateDataKey"], "Resource": "*",
         "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": GOOD_PCR0.hex()}}},
    ]}
    c.put_key_policy(KeyId=arn, PolicyName="default", Policy=json.dumps(policy))
    blob = c.encrypt(KeyId=arn, Plaintext=b"enclave secret")["CiphertextBlob"]

    enclave_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = enclave_key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    good = attestation_document(kms.server.home, spki, GOOD_PCR0)
    out = c.decrypt(CiphertextBlob=blob, Recipient=recipient_param(good))
    assert not out.get("Plaintext")
    assert out["KeyId"] == arn
    assert open_envelope(out["CiphertextForRecipient"], enclave_key) == b"enclave secret"

    data_key = c.generate_data_key(KeyId=arn, KeySpec="AES_256", Recipient=recipient_param(good))
    assert not data_key.get("Plaintext")
    assert len(open_envelope(data_key["CiphertextForRecipient"], enclave_key)) == 32

    random = c.generate_random(NumberOfBytes=16, Recipient=recipient_param(good))
    assert len(open_envelope(random["CiphertextForRecipient"], enclave_key)) == 16

    for name, document in [("no Recipient", None),
                           ("another image", attestation_document(kms.server.home, spki, OTHER_PCR0)),
                           ("debug mode", attestation_document(kms.server.home, spki, GOOD_PCR0, debug=True))]:
        with pytest.raises(ClientError) as denied:
            if document is None:
                c.decrypt(CiphertextBlob=blob)
            else:
                c.decrypt(CiphertextBlob=blob, Recipient=recipient_param(document))
        assert error_code(denied) == "AccessDeniedException", name

    ec_doc = attestation_document(kms.server.home, ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo), GOOD_PCR0)
    with pytest.raises(ClientError) as non_rsa:
        c.decrypt(CiphertextBlob=blob, Recipient=recipient_param(ec_doc))
    assert error_code(non_rsa) == "ValidationException"
    forged = bytearray(good)
    forged[-1] ^= 1
    with pytest.raises(ClientError) as forged_err:
        c.decrypt(CiphertextBlob=blob, Recipient=recipient_param(bytes(forged)))
    assert error_code(forged_err) in {"ValidationException", "AccessDeniedException"}

    # §4.8: the allowed Decrypt's audit record names the enclave (the server runs on: delivered + spooled records)
    events = live_trail_records(kms.server.data_dir / "audit")
    attested = [e for e in events if e["eventName"] == "Decrypt" and "errorCode" not in e
                and "recipient" in e.get("additionalEventData", {})]
    assert attested
    recipient = attested[-1]["additionalEventData"]["recipient"]
    assert recipient["attestationDocumentEnclaveImageDigest"] == GOOD_PCR0.hex()
    assert recipient["attestationDocumentModuleId"].startswith(INSTANCE)
    assert recipient["attestationDocumentEnclavePCR1"] == "11" * 48
    assert recipient["attestationDocumentEnclavePCR4"] == pcr4_instance_id(INSTANCE).hex()
    assert base64.b64encode(good).decode()[:40] not in json.dumps(events)


# --------------------------------------------------------------------------------------------- shared PostgreSQL


def test_two_servers_share_one_postgres_database(postgres_url: str, tmp_path: Path) -> None:
    """Item 7: several ``kms serve`` processes on one PostgreSQL database (same root key from the environment)."""
    url = fresh_database(postgres_url, "kms_shared")
    env = {"ENCLAVEKIT_KMS_ROOT_KEY": base64.b64encode(os.urandom(32)).decode()}
    first = KMSServer(tmp_path / "a", home=tmp_path / "home", database_url=url, env=env)
    second = KMSServer(tmp_path / "b", home=tmp_path / "home", database_url=url, env=env)
    creds = first.credentials("shared")
    with first, second:
        a, b = first.client(creds), second.client(creds)
        key_id = a.create_key()["KeyMetadata"]["KeyId"]
        a.create_alias(AliasName="alias/shared", TargetKeyId=key_id)
        blob = b.encrypt(KeyId="alias/shared", Plaintext=b"one database")["CiphertextBlob"]
        assert a.decrypt(CiphertextBlob=blob)["Plaintext"] == b"one database"
        b.disable_key(KeyId=key_id)
        with pytest.raises(ClientError) as disabled:
            a.encrypt(KeyId=key_id, Plaintext=b"x")
        assert error_code(disabled) == "DisabledException"
    # each server keeps its own local audit trail
    for name, count in (("a", 4), ("b", 2)):
        assert_trail_valid("--trail", str(tmp_path / name / "audit"))
        assert len(trail_events("--trail", str(tmp_path / name / "audit"))) == count
