"""Condition keys as the service fills them (issue 5): a request without encryption context has no
kms:EncryptionContextKeys, condition key names match ignoring case, values keep their case, and condition
values written as numbers or booleans work end to end."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kms_core_helpers import ACCOUNT, KMS, PCR0, b64, kms

__all__ = ["kms"]

ROOT = {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
GUARDED = ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext"]


def _policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def _admin() -> dict[str, Any]:
    return {"Sid": "Admin", "Effect": "Allow", "Principal": ROOT, "NotAction": GUARDED, "Resource": "*"}


def _allow_guarded(condition: dict[str, Any], sid: str = "Use") -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Allow", "Principal": ROOT, "Action": GUARDED, "Resource": "*",
            "Condition": condition}


def _key_with_blobs(kms: KMS, policy: str) -> tuple[str, str, str]:
    """A key, a blob made without context and one made with {"tenant": "t1"}, then ``policy`` installed."""
    key_id = kms.create_key()
    bare = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"bare"))["CiphertextBlob"]
    with_ctx = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"ctx"),
                        EncryptionContext={"tenant": "t1"})["CiphertextBlob"]
    kms.call("PutKeyPolicy", KeyId=key_id, Policy=policy)
    return key_id, bare, with_ctx


def _denied(kms: KMS, operation: str, **params: Any) -> str:
    err = kms.error(operation, **params)
    assert err.aws_code == "AccessDeniedException"
    return err.aws_message


# ------------------------------------------------------------------------------- Null on kms:EncryptionContextKeys


@pytest.mark.parametrize("context", [None, {}])
def test_allow_requiring_a_context_refuses_requests_without_one(kms: KMS, context: dict[str, str] | None) -> None:
    # the usual "require an encryption context" pattern: Allow only when kms:EncryptionContextKeys is not null
    policy = _policy(_admin(), _allow_guarded({"Null": {"kms:EncryptionContextKeys": "false"}}, "NeedContext"))
    key_id, bare, with_ctx = _key_with_blobs(kms, policy)
    extra = {} if context is None else {"EncryptionContext": context}
    for operation, params in [("Encrypt", {"KeyId": key_id, "Plaintext": b64(b"x")}),
                              ("Decrypt", {"CiphertextBlob": bare}),
                              ("GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"}),
                              ("GenerateDataKeyWithoutPlaintext", {"KeyId": key_id, "NumberOfBytes": 16})]:
        message = _denied(kms, operation, **params, **extra)
        assert "'NeedContext' condition Null kms:EncryptionContextKeys" in message, operation
    # with a context the same statement allows
    kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"tenant": "t1"})
    kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256", EncryptionContext={"tenant": "t1"})
    out = kms.call("Decrypt", CiphertextBlob=with_ctx, EncryptionContext={"tenant": "t1"})
    assert out["Plaintext"] == b64(b"ctx")


@pytest.mark.parametrize("context", [None, {}])
def test_deny_without_a_context_fires(kms: KMS, context: dict[str, str] | None) -> None:
    policy = _policy(
        {"Sid": "Root", "Effect": "Allow", "Principal": ROOT, "Action": "kms:*", "Resource": "*"},
        {"Sid": "NoBareUse", "Effect": "Deny", "Principal": "*", "Action": GUARDED, "Resource": "*",
         "Condition": {"Null": {"kms:EncryptionContextKeys": "true"}}})
    key_id, bare, with_ctx = _key_with_blobs(kms, policy)
    extra = {} if context is None else {"EncryptionContext": context}
    for operation, params in [("Encrypt", {"KeyId": key_id, "Plaintext": b64(b"x")}),
                              ("Decrypt", {"CiphertextBlob": bare}),
                              ("GenerateDataKey", {"KeyId": key_id, "NumberOfBytes": 32})]:
        message = _denied(kms, operation, **params, **extra)
        assert "explicit deny" in message and "'NoBareUse'" in message, operation
    out = kms.call("Decrypt", CiphertextBlob=with_ctx, EncryptionContext={"tenant": "t1"})
    assert out["Plaintext"] == b64(b"ctx")


def test_requests_without_context_have_no_context_keys(kms: KMS) -> None:
    # ForAnyValue on a missing key fails; a missing key is what an absent context must look like
    policy = _policy(_admin(), _allow_guarded(
        {"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": ["tenant"]}}))
    key_id, _, _ = _key_with_blobs(kms, policy)
    _denied(kms, "Encrypt", KeyId=key_id, Plaintext=b64(b"x"))
    kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"tenant": "t9"})


# ------------------------------------------------------------------------------- case of condition key names


def test_encryption_context_key_part_is_case_insensitive_value_is_not(kms: KMS) -> None:
    policy = _policy(_admin(), _allow_guarded({"StringEquals": {"kms:EncryptionContext:Tenant": "t1"}}))
    key_id, _, with_ctx = _key_with_blobs(kms, policy)
    # the blob's context is {"tenant": "t1"}: "Tenant" in the policy names it
    assert kms.call("Decrypt", CiphertextBlob=with_ctx, EncryptionContext={"tenant": "t1"})["Plaintext"] == \
        b64(b"ctx")
    kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"TENANT": "t1"})
    # StringEquals compares the value with its case
    _denied(kms, "Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"tenant": "T1"})


def test_context_keys_differing_only_in_case_must_all_satisfy_an_allow(kms: KMS) -> None:
    policy = _policy(_admin(), _allow_guarded({"StringEquals": {"kms:EncryptionContext:tenant": "t1"}}))
    key_id, _, _ = _key_with_blobs(kms, policy)
    _denied(kms, "Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"tenant": "t1", "Tenant": "t2"})
    kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"tenant": "t1", "Tenant": "t1"})


def test_context_keys_differing_only_in_case_trigger_a_deny_if_either_matches(kms: KMS) -> None:
    policy = _policy(
        {"Sid": "Root", "Effect": "Allow", "Principal": ROOT, "Action": "kms:*", "Resource": "*"},
        {"Sid": "NotT2", "Effect": "Deny", "Principal": "*", "Action": GUARDED, "Resource": "*",
         "Condition": {"StringEquals": {"kms:EncryptionContext:TENANT": "t2"}}})
    key_id, _, _ = _key_with_blobs(kms, policy)
    message = _denied(kms, "Encrypt", KeyId=key_id, Plaintext=b64(b"x"),
                      EncryptionContext={"tenant": "t1", "Tenant": "t2"})
    assert "'NotT2'" in message
    kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"tenant": "t1"})


def test_recipient_condition_key_names_are_case_insensitive(kms: KMS) -> None:
    policy = _policy(_admin(), _allow_guarded(
        {"StringEqualsIgnoreCase": {"KMS:recipientattestation:imagesha384": PCR0.hex().upper()}}))
    key_id, _, _ = _key_with_blobs(kms, policy)
    out = kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256", Recipient=kms.recipient())
    assert "CiphertextForRecipient" in out and "Plaintext" not in out
    _denied(kms, "GenerateDataKey", KeyId=key_id, KeySpec="AES_256")


# ------------------------------------------------------------------------------- non-string condition values


def test_number_and_boolean_condition_values(kms: KMS) -> None:
    # written as JSON text: a number counts as it is written ("1.50", not "1.5")
    policy = _policy(_admin(), _allow_guarded({"StringEquals": {"kms:EncryptionContext:n": "@"}})).replace(
        '"@"', "[5, 1.50, true]")
    key_id, _, _ = _key_with_blobs(kms, policy)
    for value in ("5", "1.50", "true"):
        kms.call("Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"n": value})
    for value in ("05", "1.5", "True"):
        _denied(kms, "Encrypt", KeyId=key_id, Plaintext=b64(b"x"), EncryptionContext={"n": value})
