"""The KMS service core: every operation of the AWS KMS API that enclavekit serves, behind one entry point.

``KMSService(store, trust_roots=..., account_id=..., region=...).handle(KMSRequest) -> KMSResult`` or raises
:class:`~enclavekit.kms.types.KMSError` with AWS's exception name and HTTP status (spec §4.7).  The HTTP shell
(SigV4, JSON, audit log) sits around it; this module reads no clock (``request.now``) and takes its randomness
from ``rng`` (asymmetric key generation excepted, see :mod:`enclavekit.kms.keys`).

Pipeline of a request: the operation must exist (``UnknownOperationException``); the members are validated
against the API model (types -> ``SerializationException``; required members, lengths, ranges, enums ->
``ValidationException`` with AWS's "N validation error(s) detected" wording); the key is resolved from a key id,
key ARN, alias name or alias ARN (``NotFoundException``); a ``Recipient`` document is verified (its PCRs become
condition keys); the key policy decides (``AccessDeniedException`` naming the deciding statement and condition);
the key state is checked (``DisabledException``, ``KMSInvalidStateException``); then the operation runs.

Deletion is lazy: a key whose deletion date has passed is removed the next time anyone looks it up.  Automatic
rotation is lazy too: an enabled key whose rotation date has passed gets new material when next used.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509

from enclavekit.attestation.verifier import DEFAULT_CACHE, ChainCache, TrustRoot
from enclavekit.kms import keys as keycrypto
from enclavekit.kms.ciphertext import CiphertextBlob, CiphertextError, open_blob, seal_blob
from enclavekit.kms.policy import KeyPolicy, PolicyError, PolicyRequest, default_key_policy
from enclavekit.kms.recipient import (
    RecipientVerifier,
    VerifiedRecipient,
    condition_keys,
    parse_recipient,
    seal_for_recipient,
)
from enclavekit.kms.store import KeyRecord, KeyStore, StoreError
from enclavekit.kms.types import AuditInfo, KMSError, KMSRequest, KMSResult

__all__ = ["KMSService", "OPERATIONS", "READ_ONLY_OPERATIONS", "MAX_ON_DEMAND_ROTATIONS", "MAX_TAGS"]

MAX_ON_DEMAND_ROTATIONS = 10   # AWS quota: on-demand rotations per key
MAX_TAGS = 50                  # AWS quota: tags per key
_MAX_CONTEXT_CHARS = 8192
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_KEY_ARN = re.compile(r"^arn:aws:kms:([a-z0-9-]+):(\d{12}):key/(.+)$")
_ALIAS_ARN = re.compile(r"^arn:aws:kms:([a-z0-9-]+):(\d{12}):(alias/.+)$")
_ALIAS_NAME = re.compile(r"^[a-zA-Z0-9:/_-]+$")
_ENCRYPTION_ALGORITHMS = ("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "SM2PKE")
_SIGNING_ALGORITHMS = ("RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512",
                       "RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384", "RSASSA_PKCS1_V1_5_SHA_512",
                       "ECDSA_SHA_256", "ECDSA_SHA_384", "ECDSA_SHA_512", "SM2DSA", "ML_DSA_SHAKE_256",
                       "ED25519_SHA_512", "ED25519_PH_SHA_512")
_KEY_SPECS_MODEL = ("RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521",
                    "ECC_SECG_P256K1", "SYMMETRIC_DEFAULT", "HMAC_224", "HMAC_256", "HMAC_384", "HMAC_512", "SM2",
                    "ML_DSA_44", "ML_DSA_65", "ML_DSA_87", "ECC_NIST_EDWARDS25519", "ML_KEM_512", "ML_KEM_768",
                    "ML_KEM_1024")
_CMK_SPECS_MODEL = _KEY_SPECS_MODEL[:13]
_KEY_PAIR_SPECS_MODEL = ("RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521",
                         "ECC_SECG_P256K1", "SM2", "ECC_NIST_EDWARDS25519", "ML_KEM_512", "ML_KEM_768",
                         "ML_KEM_1024")
_USAGES_MODEL = ("SIGN_VERIFY", "ENCRYPT_DECRYPT", "GENERATE_VERIFY_MAC", "KEY_AGREEMENT", "ENCAPSULATE_DECAPSULATE")


# --------------------------------------------------------------------------------------------- the API model

@dataclass(frozen=True)
class _M:
    """One request member of the API model (botocore service-2.json)."""

    kind: str                   # str, blob, int, bool, ctx, strlist, tags, recipient, list
    min: int | None = None
    max: int | None = None
    enum: tuple[str, ...] | None = None
    pattern: str | None = None
    required: bool = False


_KEY_ID = _M("str", 1, 2048, required=True)
_OPT_KEY_ID = _M("str", 1, 2048)
_GRANTS = _M("strlist", 0, 10)
_CTX = _M("ctx")
_ENC_ALG = _M("str", enum=_ENCRYPTION_ALGORITHMS)
_DRY = _M("bool")
_LIMIT = _M("int", 1, 1000)
_MARKER = _M("str", 1, 1024)
_ALIAS = _M("str", 1, 256, pattern=r"^[a-zA-Z0-9:/_-]+$", required=True)
_POLICY = _M("str", 1, 131072)
_SIGN_ALG = _M("str", enum=_SIGNING_ALGORITHMS, required=True)
_MSG_TYPE = _M("str", enum=("RAW", "DIGEST", "EXTERNAL_MU"))

OPERATIONS: dict[str, dict[str, _M]] = {
    "CreateKey": {"Policy": _POLICY, "Description": _M("str", 0, 8192), "KeyUsage": _M("str", enum=_USAGES_MODEL),
                  "CustomerMasterKeySpec": _M("str", enum=_CMK_SPECS_MODEL),
                  "KeySpec": _M("str", enum=_KEY_SPECS_MODEL),
                  "Origin": _M("str", enum=("AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE")),
                  "CustomKeyStoreId": _M("str", 1, 64), "BypassPolicyLockoutSafetyCheck": _M("bool"),
                  "Tags": _M("tags"), "MultiRegion": _M("bool"), "XksKeyId": _M("str", 1, 128)},
    "DescribeKey": {"KeyId": _KEY_ID, "GrantTokens": _GRANTS},
    "ListKeys": {"Limit": _LIMIT, "Marker": _MARKER, "ResourceOwners": _M("list")},
    "CreateAlias": {"AliasName": _ALIAS, "TargetKeyId": _KEY_ID},
    "UpdateAlias": {"AliasName": _ALIAS, "TargetKeyId": _KEY_ID},
    "DeleteAlias": {"AliasName": _ALIAS},
    "ListAliases": {"KeyId": _OPT_KEY_ID, "Limit": _LIMIT, "Marker": _MARKER},
    "EnableKey": {"KeyId": _KEY_ID},
    "DisableKey": {"KeyId": _KEY_ID},
    "ScheduleKeyDeletion": {"KeyId": _KEY_ID, "PendingWindowInDays": _M("int", 1, 365)},
    "CancelKeyDeletion": {"KeyId": _KEY_ID},
    "EnableKeyRotation": {"KeyId": _KEY_ID, "RotationPeriodInDays": _M("int", 90, 2560)},
    "DisableKeyRotation": {"KeyId": _KEY_ID},
    "GetKeyRotationStatus": {"KeyId": _KEY_ID},
    "RotateKeyOnDemand": {"KeyId": _KEY_ID},
    "GetKeyPolicy": {"KeyId": _KEY_ID, "PolicyName": _M("str", 1, 128, pattern=r"^[\w]+$")},
    "PutKeyPolicy": {"KeyId": _KEY_ID, "PolicyName": _M("str", 1, 128, pattern=r"^[\w]+$"),
                     "Policy": replace(_POLICY, required=True), "BypassPolicyLockoutSafetyCheck": _M("bool")},
    "ListKeyPolicies": {"KeyId": _KEY_ID, "Limit": _LIMIT, "Marker": _MARKER},
    "TagResource": {"KeyId": _KEY_ID, "Tags": _M("tags", required=True)},
    "UntagResource": {"KeyId": _KEY_ID, "TagKeys": _M("strlist", required=True)},
    "ListResourceTags": {"KeyId": _KEY_ID, "Limit": _LIMIT, "Marker": _MARKER},
    "Encrypt": {"KeyId": _KEY_ID, "Plaintext": _M("blob", 1, 4096, required=True), "EncryptionContext": _CTX,
                "GrantTokens": _GRANTS, "EncryptionAlgorithm": _ENC_ALG, "DryRun": _DRY},
    "Decrypt": {"CiphertextBlob": _M("blob", 1, 6144, required=True), "EncryptionContext": _CTX,
                "GrantTokens": _GRANTS, "KeyId": _OPT_KEY_ID, "EncryptionAlgorithm": _ENC_ALG,
                "Recipient": _M("recipient"), "DryRun": _DRY, "DryRunModifiers": _M("list")},
    "ReEncrypt": {"CiphertextBlob": _M("blob", 1, 6144, required=True), "SourceEncryptionContext": _CTX,
                  "SourceKeyId": _OPT_KEY_ID, "DestinationKeyId": _KEY_ID, "DestinationEncryptionContext": _CTX,
                  "SourceEncryptionAlgorithm": _ENC_ALG, "DestinationEncryptionAlgorithm": _ENC_ALG,
                  "GrantTokens": _GRANTS, "DryRun": _DRY, "DryRunModifiers": _M("list")},
    "GenerateDataKey": {"KeyId": _KEY_ID, "EncryptionContext": _CTX, "NumberOfBytes": _M("int", 1, 1024),
                        "KeySpec": _M("str", enum=("AES_256", "AES_128")), "GrantTokens": _GRANTS,
                        "Recipient": _M("recipient"), "DryRun": _DRY},
    "GenerateDataKeyWithoutPlaintext": {"KeyId": _KEY_ID, "EncryptionContext": _CTX,
                                        "KeySpec": _M("str", enum=("AES_256", "AES_128")),
                                        "NumberOfBytes": _M("int", 1, 1024), "GrantTokens": _GRANTS, "DryRun": _DRY},
    "GenerateDataKeyPair": {"EncryptionContext": _CTX, "KeyId": _KEY_ID,
                            "KeyPairSpec": _M("str", enum=_KEY_PAIR_SPECS_MODEL, required=True),
                            "GrantTokens": _GRANTS, "Recipient": _M("recipient"), "DryRun": _DRY},
    "GenerateDataKeyPairWithoutPlaintext": {"EncryptionContext": _CTX, "KeyId": _KEY_ID,
                                            "KeyPairSpec": _M("str", enum=_KEY_PAIR_SPECS_MODEL, required=True),
                                            "GrantTokens": _GRANTS, "DryRun": _DRY},
    "GenerateRandom": {"NumberOfBytes": _M("int", 1, 1024), "CustomKeyStoreId": _M("str", 1, 64),
                       "Recipient": _M("recipient")},
    "Sign": {"KeyId": _KEY_ID, "Message": _M("blob", 1, 4096, required=True), "MessageType": _MSG_TYPE,
             "GrantTokens": _GRANTS, "SigningAlgorithm": _SIGN_ALG, "DryRun": _DRY},
    "Verify": {"KeyId": _KEY_ID, "Message": _M("blob", 1, 4096, required=True), "MessageType": _MSG_TYPE,
               "Signature": _M("blob", 1, 6144, required=True), "SigningAlgorithm": _SIGN_ALG,
               "GrantTokens": _GRANTS, "DryRun": _DRY},
    "GetPublicKey": {"KeyId": _KEY_ID, "GrantTokens": _GRANTS},
}

READ_ONLY_OPERATIONS = frozenset({
    "DescribeKey", "ListKeys", "ListAliases", "GetKeyRotationStatus", "GetKeyPolicy", "ListKeyPolicies",
    "ListResourceTags", "GetPublicKey", "Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext", "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext",
    "GenerateRandom", "Sign", "Verify",
})
_SECRET_MEMBERS = {"Plaintext", "CiphertextBlob", "Message", "Signature", "Recipient"}


def _camel(name: str) -> str:
    return name[:1].lower() + name[1:]


def _serialization(message: str) -> KMSError:
    return KMSError("SerializationException", message)


def _validation(message: str) -> KMSError:
    return KMSError("ValidationException", message)


def _check_member(name: str, spec: _M, value: Any, errors: list[str]) -> Any:
    """Type errors raise SerializationException; constraint failures append to ``errors``."""
    at = _camel(name)
    if spec.kind == "str":
        if not isinstance(value, str):
            raise _serialization(f"{name} must be a string")
        if spec.min is not None and len(value) < spec.min:
            errors.append(f"Value '{value[:64]}' at '{at}' failed to satisfy constraint: Member must have length "
                          f"greater than or equal to {spec.min}")
        elif spec.max is not None and len(value) > spec.max:
            errors.append(f"Value at '{at}' failed to satisfy constraint: Member must have length less than or "
                          f"equal to {spec.max}")
        elif spec.enum is not None and value not in spec.enum:
            errors.append(f"Value '{value[:64]}' at '{at}' failed to satisfy constraint: Member must satisfy enum "
                          f"value set: [{', '.join(spec.enum)}]")
        elif spec.pattern is not None and not re.match(spec.pattern, value):
            errors.append(f"Value '{value[:64]}' at '{at}' failed to satisfy constraint: Member must satisfy "
                          f"regular expression pattern: {spec.pattern}")
        return value
    if spec.kind == "blob":
        if not isinstance(value, str):
            raise _serialization(f"{name} must be a base64 string")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _serialization(f"{name} is not valid base64") from None
        if spec.min is not None and len(raw) < spec.min:
            errors.append(f"Value at '{at}' failed to satisfy constraint: Member must have length greater than or "
                          f"equal to {spec.min}")
        elif spec.max is not None and len(raw) > spec.max:
            errors.append(f"Value at '{at}' failed to satisfy constraint: Member must have length less than or "
                          f"equal to {spec.max}")
        return raw
    if spec.kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise _serialization(f"{name} must be an integer")
        if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            bound = (f"greater than or equal to {spec.min}" if spec.min is not None and value < spec.min
                     else f"less than or equal to {spec.max}")
            errors.append(f"Value '{value}' at '{at}' failed to satisfy constraint: Member must have value {bound}")
        return value
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise _serialization(f"{name} must be a boolean")
        return value
    if spec.kind == "ctx":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            raise _serialization(f"{name} must be a map of strings to strings")
        if sum(len(k) + len(v) for k, v in value.items()) > _MAX_CONTEXT_CHARS:
            errors.append(f"Value at '{at}' failed to satisfy constraint: the encryption context is larger than "
                          f"{_MAX_CONTEXT_CHARS} characters")
        return dict(value)
    if spec.kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _serialization(f"{name} must be a list of strings")
        if (spec.min is not None and len(value) < spec.min) or (spec.max is not None and len(value) > spec.max):
            errors.append(f"Value at '{at}' failed to satisfy constraint: Member must have length between "
                          f"{spec.min} and {spec.max}")
        return list(value)
    if spec.kind == "tags":
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise _serialization(f"{name} must be a list of {{TagKey, TagValue}} objects")
        tags: list[tuple[str, str]] = []
        for i, tag in enumerate(value):
            key, val = tag.get("TagKey"), tag.get("TagValue")
            if not isinstance(key, str) or not isinstance(val, str) or set(tag) - {"TagKey", "TagValue"}:
                raise _serialization(f"{name} member {i + 1} must have string TagKey and TagValue")
            if not 1 <= len(key) <= 128:
                errors.append(f"Value '{key[:64]}' at '{at}.{i + 1}.member.tagKey' failed to satisfy constraint: "
                              "Member must have length between 1 and 128")
            if len(val) > 256:
                errors.append(f"Value at '{at}.{i + 1}.member.tagValue' failed to satisfy constraint: Member must "
                              "have length less than or equal to 256")
            tags.append((key, val))
        return tags
    if spec.kind == "recipient":
        return value  # parsed by recipient.parse_recipient (it needs the request's other members)
    if spec.kind == "list":
        if not isinstance(value, list):
            raise _serialization(f"{name} must be a list")
        return value
    raise AssertionError(spec.kind)  # pragma: no cover


def _validate(operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
    model = OPERATIONS[operation]
    errors: list[str] = []
    out: dict[str, Any] = {}
    for name, spec in model.items():
        value = params.get(name)
        if value is None:
            if spec.required:
                errors.append(f"Value null at '{_camel(name)}' failed to satisfy constraint: Member must not be null")
            continue
        out[name] = _check_member(name, spec, value, errors)
    if errors:
        count = len(errors)
        raise _validation(f"{count} validation error{'s' if count > 1 else ''} detected: " + "; ".join(errors[:5]))
    return out


def _audit_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """CloudTrail requestParameters: lowerCamelCase, never plaintext, blobs, messages or documents."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in _SECRET_MEMBERS:
            continue
        out[_camel(name)] = [{"tagKey": k, "tagValue": v} for k, v in value] if name == "Tags" else value
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _epoch(when: datetime | None) -> float | None:
    return None if when is None else when.timestamp()


# --------------------------------------------------------------------------------------------- the service


@dataclass
class _Call:
    request: KMSRequest
    params: dict[str, Any]
    audit: AuditInfo

    @property
    def now(self) -> datetime:
        return self.request.now


class KMSService:
    """The KMS operations over a :class:`~enclavekit.kms.store.KeyStore` (thread-safe if the store is)."""

    def __init__(
        self,
        store: KeyStore,
        *,
        trust_roots: Sequence[TrustRoot | x509.Certificate],
        account_id: str,
        region: str,
        rng: Callable[[int], bytes] = os.urandom,
        max_attestation_age: timedelta | None = None,
        single_use_nonces: bool = False,
        verifier_cache: ChainCache | None = DEFAULT_CACHE,
    ) -> None:
        if not re.fullmatch(r"\d{12}", account_id):
            raise ValueError("account_id is 12 digits")
        if not re.fullmatch(r"[a-z0-9-]{1,32}", region):
            raise ValueError("region is 1..32 characters of a-z, 0-9 and -")
        self.store = store
        self.account_id = account_id
        self.region = region
        self.rng = rng
        self.single_use_nonces = single_use_nonces
        self.recipients = RecipientVerifier(trust_roots, max_attestation_age=max_attestation_age,
                                            cache=verifier_cache)
        self._policies: OrderedDict[str, KeyPolicy] = OrderedDict()
        self._policies_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ entry point

    def handle(self, request: KMSRequest) -> KMSResult:
        audit = AuditInfo(read_only=request.operation in READ_ONLY_OPERATIONS)
        try:
            if request.operation not in OPERATIONS:
                raise KMSError("UnknownOperationException", f"Unknown operation {request.operation[:64]}")
            if not isinstance(request.params, Mapping):
                raise _serialization("the request body must be a JSON object")
            if request.now.tzinfo is None:
                raise ValueError("KMSRequest.now must be timezone-aware")
            params = _validate(request.operation, request.params)
            audit.request_parameters = _audit_parameters(params)
            handler: Callable[[_Call], dict[str, Any]] = getattr(self, "_op_" + request.operation)
            response = handler(_Call(request, params, audit))
            return KMSResult(response, audit)
        except KMSError as exc:
            exc.audit = audit
            raise
        except StoreError as exc:
            raise KMSError("KMSInternalException", "The key store is unavailable.", status=500,
                           audit=audit) from exc

    # ------------------------------------------------------------------------------------------ helpers

    def key_arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"

    def alias_arn(self, name: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:{name}"

    def _not_found_key(self, key_id: str) -> KMSError:
        return KMSError("NotFoundException", f"Key '{self.key_arn(key_id)}' does not exist")

    def _lookup(self, ref: str, now: datetime) -> KeyRecord:
        """A key id, key ARN, alias name or alias ARN -> the live key record (NotFoundException otherwise)."""
        key_id: str | None = None
        alias: str | None = None
        if m := _KEY_ARN.match(ref):
            if m.group(1) != self.region or m.group(2) != self.account_id:
                raise KMSError("NotFoundException", f"Key '{ref[:2048]}' does not exist")
            key_id = m.group(3)
        elif m := _ALIAS_ARN.match(ref):
            if m.group(1) != self.region or m.group(2) != self.account_id:
                raise KMSError("NotFoundException", f"Alias {ref[:2048]} is not found.")
            alias = m.group(3)
        elif ref.startswith("alias/"):
            alias = ref
        else:
            key_id = ref
        if alias is not None:
            found = self.store.get_alias(alias)
            if found is None:
                raise KMSError("NotFoundException", f"Alias {self.alias_arn(alias)} is not found.")
            key_id = found.key_id
        assert key_id is not None
        if not _UUID.match(key_id):
            raise KMSError("NotFoundException", f"Invalid keyId '{key_id[:256]}'")
        record = self.store.get_key(key_id)
        if record is None:
            raise self._not_found_key(key_id)
        return self._live(record, now)

    def _live(self, record: KeyRecord, now: datetime) -> KeyRecord:
        # the end of a deletion window: the key is gone (lazy deletion)
        if record.state == "PendingDeletion" and record.deletion_date is not None and now >= record.deletion_date:
            self.store.delete_key(record.key_id)
            raise self._not_found_key(record.key_id)
        # automatic rotation when due (lazy)
        if (record.rotation_enabled and record.next_rotation is not None and now >= record.next_rotation
                and record.state == "Enabled"):
            period = timedelta(days=record.rotation_period_days or 365)
            material = keycrypto.generate_material(record.key_spec, self.rng)

            def rotated(current: KeyRecord) -> KeyRecord:
                if current.next_rotation is None or now < current.next_rotation:
                    raise _AlreadyRotated
                return replace(current, next_rotation=now + period, last_rotation=now)

            try:
                updated = self.store.add_material(record.key_id, material, rotated)
            except _AlreadyRotated:
                updated = self.store.get_key(record.key_id)
            if updated is None:
                raise self._not_found_key(record.key_id)
            record = updated
        return record

    def _key(self, call: _Call, member: str = "KeyId") -> KeyRecord:
        record = self._lookup(call.params[member], call.now)
        resource = {"accountId": self.account_id, "type": "AWS::KMS::Key", "ARN": record.arn}
        if resource not in call.audit.resources:
            call.audit.resources.append(resource)
        return record

    def _policy(self, text: str) -> KeyPolicy:
        with self._policies_lock:
            hit = self._policies.get(text)
            if hit is not None:
                self._policies.move_to_end(text)
                return hit
        policy = KeyPolicy.from_json(text)
        with self._policies_lock:
            self._policies[text] = policy
            if len(self._policies) > 256:
                self._policies.popitem(last=False)
        return policy

    def _authorize(self, call: _Call, record: KeyRecord, action: str, *,
                   context: Mapping[str, str] | None = None, recipient: VerifiedRecipient | None = None) -> None:
        principal = call.request.principal
        conditions: dict[str, str | list[str]] = {
            "kms:CallerAccount": principal.account_id,
            "aws:PrincipalArn": principal.arn,
            "kms:KeySpec": record.key_spec,
            "kms:KeyUsage": record.key_usage,
            "kms:KeyOrigin": record.origin,
        }
        if context:
            # an absent or empty EncryptionContext sets no key at all: a Null condition on
            # kms:EncryptionContextKeys ("require a context") must see a request without context as missing
            for key, value in context.items():
                conditions[f"kms:EncryptionContext:{key}"] = value
            conditions["kms:EncryptionContextKeys"] = sorted(context)
        if recipient is not None:
            conditions.update(condition_keys(recipient.context))
        decision = self._policy(record.policy).evaluate(PolicyRequest(
            principal_arn=principal.arn, account=principal.account_id, action=f"kms:{action}",
            resource=record.arn, context=conditions))
        call.audit.decision = decision.reason
        if not decision.allowed:
            raise KMSError("AccessDeniedException", f"User: {principal.arn} is not authorized to perform: "
                           f"kms:{action} on resource: {record.arn} {decision.reason}")

    @staticmethod
    def _usable(record: KeyRecord) -> None:
        if record.state == "Disabled":
            raise KMSError("DisabledException", f"{record.arn} is disabled.")
        if record.state == "PendingDeletion":
            raise KMSError("KMSInvalidStateException", f"{record.arn} is pending deletion.")

    @staticmethod
    def _not_pending(record: KeyRecord) -> None:
        if record.state == "PendingDeletion":
            raise KMSError("KMSInvalidStateException", f"{record.arn} is pending deletion.")

    @staticmethod
    def _dry_run(call: _Call) -> None:
        if call.params.get("DryRun"):
            raise KMSError("DryRunOperationException", "The request would have succeeded, but the DryRun option "
                           "is set.", status=412)

    def _recipient(self, call: _Call) -> VerifiedRecipient | None:
        raw = call.params.get("Recipient")
        if raw is None:
            return None
        verified = self.recipients.verify(parse_recipient(raw), call.now)
        call.audit.recipient = verified.context
        return verified

    def _consume_nonce(self, call: _Call, recipient: VerifiedRecipient | None) -> None:
        """Single-use nonces (beyond AWS, off by default): a second request with the same nonce is refused."""
        if recipient is None or not self.single_use_nonces:
            return
        digest = recipient.nonce_digest
        if digest is None:
            raise KMSError("AccessDeniedException", "This KMS requires single-use nonces: the attestation "
                           "document has no nonce")
        if not self.store.use_nonce(digest, recipient.usable_until, call.now):
            raise KMSError("AccessDeniedException", "The attestation document's nonce was already used "
                           "(replayed document)")

    def _material(self, record: KeyRecord, version: int | None = None) -> bytes:
        material = self.store.get_material(record.key_id, version or record.current_version)
        if material is None:
            raise KMSError("KMSInternalException", "Key material is missing.", status=500)
        return material

    def _metadata(self, record: KeyRecord) -> dict[str, Any]:
        info = keycrypto.KEY_SPECS[record.key_spec]
        meta: dict[str, Any] = {
            "AWSAccountId": record.account_id,
            "KeyId": record.key_id,
            "Arn": record.arn,
            "CreationDate": _epoch(record.created),
            "Enabled": record.state == "Enabled",
            "Description": record.description,
            "KeyUsage": record.key_usage,
            "KeyState": record.state,
            "Origin": record.origin,
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": record.key_spec,
            "KeySpec": record.key_spec,
            "MultiRegion": False,
        }
        if record.key_usage == "ENCRYPT_DECRYPT":
            meta["EncryptionAlgorithms"] = list(info.encryption_algorithms)
        else:
            meta["SigningAlgorithms"] = list(info.signing_algorithms)
        if record.state == "PendingDeletion":
            meta["DeletionDate"] = _epoch(record.deletion_date)
            meta["PendingDeletionWindowInDays"] = record.pending_window_days
        return meta

    def _check_policy_lockout(self, call: _Call, policy: KeyPolicy, arn: str) -> None:
        """AWS's lockout safety check: the caller must still be able to PutKeyPolicy afterwards."""
        if call.params.get("BypassPolicyLockoutSafetyCheck"):
            return
        principal = call.request.principal
        decision = policy.evaluate(PolicyRequest(principal.arn, principal.account_id, "kms:PutKeyPolicy", arn,
                                                 {"kms:CallerAccount": principal.account_id,
                                                  "aws:PrincipalArn": principal.arn}))
        if not decision.allowed:
            raise KMSError("MalformedPolicyDocumentException", "The new key policy will not allow you to update "
                           "the key policy in the future.")

    def _parse_policy(self, text: str) -> KeyPolicy:
        try:
            return self._policy(text)
        except PolicyError as exc:
            raise KMSError("MalformedPolicyDocumentException", f"Policy contains a statement with one or more "
                           f"invalid elements: {exc.message}") from exc

    # ------------------------------------------------------------------------------------------ key lifecycle

    def _op_CreateKey(self, call: _Call) -> dict[str, Any]:
        p = call.params
        if "KeySpec" in p and "CustomerMasterKeySpec" in p:
            raise _validation("You cannot specify KeySpec and CustomerMasterKeySpec in the same request. "
                              "CustomerMasterKeySpec is deprecated.")
        spec = p.get("KeySpec", p.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT"))
        if p.get("Origin", "AWS_KMS") != "AWS_KMS" or "CustomKeyStoreId" in p or "XksKeyId" in p:
            raise KMSError("UnsupportedOperationException", "Only Origin AWS_KMS keys in the default key store "
                           "are supported by this KMS.")
        if p.get("MultiRegion"):
            raise KMSError("UnsupportedOperationException", "Multi-Region keys are not supported by this KMS.")
        info = keycrypto.KEY_SPECS.get(spec)
        if info is None:
            raise KMSError("UnsupportedOperationException", f"KeySpec {spec} is not supported by this KMS.")
        usage = p.get("KeyUsage", "ENCRYPT_DECRYPT")
        if usage not in info.usages:
            raise _validation(f"KeyUsage {usage} is not compatible with KeySpec {spec}.")
        key_id = str(uuid.UUID(bytes=self.rng(16), version=4))
        arn = self.key_arn(key_id)
        policy_text = p.get("Policy") or default_key_policy(self.account_id)
        policy = self._parse_policy(policy_text)
        if "Policy" in p:
            self._check_policy_lockout(call, policy, arn)
        tags = p.get("Tags", [])
        self._check_tags(tags, [])
        record = KeyRecord(key_id=key_id, arn=arn, account_id=self.account_id, created=call.now.astimezone(UTC),
                           key_spec=spec, key_usage=usage, policy=policy_text, description=p.get("Description", ""),
                           tags=tuple(dict(tags).items()))
        self.store.create_key(record, keycrypto.generate_material(spec, self.rng))
        call.audit.resources.append({"accountId": self.account_id, "type": "AWS::KMS::Key", "ARN": arn})
        meta = self._metadata(record)
        call.audit.response_elements = {"keyMetadata": {_camel(k): v for k, v in meta.items()}}
        return {"KeyMetadata": meta}

    def _op_DescribeKey(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "DescribeKey")
        return {"KeyMetadata": self._metadata(record)}

    def _page(self, items: list[Any], call: _Call, default_limit: int, ident: Callable[[Any], str]
              ) -> tuple[list[Any], dict[str, Any]]:
        start = 0
        marker = call.params.get("Marker")
        if marker is not None:
            positions = [i for i, item in enumerate(items) if ident(item) == marker]
            if not positions:
                raise KMSError("InvalidMarkerException", "The marker is not valid.")
            start = positions[0]
        limit = call.params.get("Limit", default_limit)
        page = items[start:start + limit]
        extra: dict[str, Any] = {"Truncated": start + limit < len(items)}
        if extra["Truncated"]:
            extra["NextMarker"] = ident(items[start + limit])
        return page, extra

    def _op_ListKeys(self, call: _Call) -> dict[str, Any]:
        live = []
        for record in self.store.list_keys():
            try:
                live.append(self._live(record, call.now))
            except KMSError:
                continue
        page, extra = self._page(live, call, 1000, lambda r: r.key_id)
        return {"Keys": [{"KeyId": r.key_id, "KeyArn": r.arn} for r in page], **extra}

    def _op_EnableKey(self, call: _Call) -> dict[str, Any]:
        return self._set_state(call, "EnableKey", "Enabled")

    def _op_DisableKey(self, call: _Call) -> dict[str, Any]:
        return self._set_state(call, "DisableKey", "Disabled")

    def _set_state(self, call: _Call, action: str, state: str) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, action)

        def change(current: KeyRecord) -> KeyRecord:
            self._not_pending(current)
            return replace(current, state=state)

        if self.store.modify_key(record.key_id, change) is None:
            raise self._not_found_key(record.key_id)
        return {}

    def _op_ScheduleKeyDeletion(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        days = call.params.get("PendingWindowInDays", 30)
        if not 7 <= days <= 30:
            raise _validation(f"1 validation error detected: Value '{days}' at 'pendingWindowInDays' failed to "
                              "satisfy constraint: Member must have value between 7 and 30")
        self._authorize(call, record, "ScheduleKeyDeletion")
        when = call.now.astimezone(UTC) + timedelta(days=days)

        def change(current: KeyRecord) -> KeyRecord:
            self._not_pending(current)
            return replace(current, state="PendingDeletion", deletion_date=when, pending_window_days=days)

        if self.store.modify_key(record.key_id, change) is None:
            raise self._not_found_key(record.key_id)
        call.audit.response_elements = {"keyId": record.arn, "deletionDate": when.isoformat(),
                                        "keyState": "PendingDeletion", "pendingWindowInDays": days}
        return {"KeyId": record.arn, "DeletionDate": _epoch(when), "KeyState": "PendingDeletion",
                "PendingWindowInDays": days}

    def _op_CancelKeyDeletion(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "CancelKeyDeletion")

        def change(current: KeyRecord) -> KeyRecord:
            if current.state != "PendingDeletion":
                raise KMSError("KMSInvalidStateException", f"{current.arn} is not pending deletion.")
            # AWS: a key whose deletion is cancelled comes back disabled
            return replace(current, state="Disabled", deletion_date=None, pending_window_days=None)

        if self.store.modify_key(record.key_id, change) is None:
            raise self._not_found_key(record.key_id)
        return {"KeyId": record.arn}

    # ------------------------------------------------------------------------------------------ rotation

    def _symmetric_only(self, record: KeyRecord) -> None:
        if record.key_spec != "SYMMETRIC_DEFAULT":
            raise KMSError("UnsupportedOperationException", f"{record.arn} key spec {record.key_spec} does not "
                           "support automatic or on-demand rotation.")

    def _op_EnableKeyRotation(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "EnableKeyRotation")
        self._usable(record)
        self._symmetric_only(record)
        days = call.params.get("RotationPeriodInDays", 365)
        due = call.now.astimezone(UTC) + timedelta(days=days)

        def change(current: KeyRecord) -> KeyRecord:
            self._usable(current)
            return replace(current, rotation_enabled=True, rotation_period_days=days, next_rotation=due)

        if self.store.modify_key(record.key_id, change) is None:
            raise self._not_found_key(record.key_id)
        return {}

    def _op_DisableKeyRotation(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "DisableKeyRotation")
        self._usable(record)
        self._symmetric_only(record)

        def change(current: KeyRecord) -> KeyRecord:
            return replace(current, rotation_enabled=False, next_rotation=None)

        if self.store.modify_key(record.key_id, change) is None:
            raise self._not_found_key(record.key_id)
        return {}

    def _op_GetKeyRotationStatus(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "GetKeyRotationStatus")
        self._not_pending(record)
        self._symmetric_only(record)
        out: dict[str, Any] = {"KeyRotationEnabled": record.rotation_enabled, "KeyId": record.arn}
        if record.rotation_enabled:
            out["RotationPeriodInDays"] = record.rotation_period_days
            out["NextRotationDate"] = _epoch(record.next_rotation)
        return out

    def _op_RotateKeyOnDemand(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "RotateKeyOnDemand")
        self._usable(record)
        self._symmetric_only(record)
        if record.on_demand_rotations >= MAX_ON_DEMAND_ROTATIONS:
            raise KMSError("LimitExceededException", f"{record.arn} has reached the limit of "
                           f"{MAX_ON_DEMAND_ROTATIONS} on-demand rotations.")
        material = keycrypto.generate_material(record.key_spec, self.rng)
        now = call.now.astimezone(UTC)

        def change(current: KeyRecord) -> KeyRecord:
            self._usable(current)
            if current.on_demand_rotations >= MAX_ON_DEMAND_ROTATIONS:
                raise KMSError("LimitExceededException", f"{current.arn} has reached the limit of "
                               f"{MAX_ON_DEMAND_ROTATIONS} on-demand rotations.")
            return replace(current, on_demand_rotations=current.on_demand_rotations + 1, last_rotation=now)

        if self.store.add_material(record.key_id, material, change) is None:
            raise self._not_found_key(record.key_id)
        return {"KeyId": record.arn}

    # ------------------------------------------------------------------------------------------ aliases

    def _alias_name(self, name: str) -> str:
        if not name.startswith("alias/") or len(name) == len("alias/"):
            raise KMSError("InvalidAliasNameException", "Alias must start with the prefix \"alias/\". Please see "
                           "https://docs.aws.amazon.com/kms/latest/developerguide/kms-alias.html")
        if name.startswith("alias/aws/"):
            raise KMSError("InvalidAliasNameException", "Alias names that begin with alias/aws/ are reserved for "
                           "AWS managed keys.")
        if not _ALIAS_NAME.match(name):
            raise KMSError("InvalidAliasNameException", "Alias name contains characters that are not allowed.")
        return name

    def _op_CreateAlias(self, call: _Call) -> dict[str, Any]:
        name = self._alias_name(call.params["AliasName"])
        record = self._key(call, "TargetKeyId")
        self._authorize(call, record, "CreateAlias")
        self._not_pending(record)
        if not self.store.create_alias(name, record.key_id, call.now.astimezone(UTC)):
            raise KMSError("AlreadyExistsException", f"An alias with the name {self.alias_arn(name)} already "
                           "exists")
        return {}

    def _op_UpdateAlias(self, call: _Call) -> dict[str, Any]:
        name = self._alias_name(call.params["AliasName"])
        current = self.store.get_alias(name)
        if current is None:
            raise KMSError("NotFoundException", f"Alias {self.alias_arn(name)} is not found.")
        new = self._key(call, "TargetKeyId")
        old = self.store.get_key(current.key_id)
        if old is not None:
            self._authorize(call, old, "UpdateAlias")
            if (old.key_spec == "SYMMETRIC_DEFAULT") != (new.key_spec == "SYMMETRIC_DEFAULT") or \
                    old.key_usage != new.key_usage:
                raise _validation("The alias and its new target key must have the same key type (symmetric or "
                                  "asymmetric) and the same key usage.")
        self._authorize(call, new, "UpdateAlias")
        self._not_pending(new)
        if not self.store.update_alias(name, new.key_id, call.now.astimezone(UTC)):
            raise KMSError("NotFoundException", f"Alias {self.alias_arn(name)} is not found.")
        return {}

    def _op_DeleteAlias(self, call: _Call) -> dict[str, Any]:
        name = self._alias_name(call.params["AliasName"])
        current = self.store.get_alias(name)
        if current is None:
            raise KMSError("NotFoundException", f"Alias {self.alias_arn(name)} is not found.")
        record = self.store.get_key(current.key_id)
        if record is not None:
            self._authorize(call, record, "DeleteAlias")
        if not self.store.delete_alias(name):
            raise KMSError("NotFoundException", f"Alias {self.alias_arn(name)} is not found.")
        return {}

    def _op_ListAliases(self, call: _Call) -> dict[str, Any]:
        key_id = None
        if "KeyId" in call.params:
            record = self._key(call)
            self._authorize(call, record, "ListAliases")
            key_id = record.key_id
        aliases = self.store.list_aliases(key_id)
        page, extra = self._page(aliases, call, 50, lambda a: a.name)
        return {"Aliases": [{"AliasName": a.name, "AliasArn": self.alias_arn(a.name), "TargetKeyId": a.key_id,
                             "CreationDate": _epoch(a.created), "LastUpdatedDate": _epoch(a.updated)}
                            for a in page], **extra}

    # ------------------------------------------------------------------------------------------ policies, tags

    def _policy_name(self, call: _Call) -> str:
        name = call.params.get("PolicyName", "default")
        if name != "default":
            raise KMSError("NotFoundException", "No such policy exists")
        return str(name)

    def _op_GetKeyPolicy(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "GetKeyPolicy")
        return {"Policy": record.policy, "PolicyName": self._policy_name(call)}

    def _op_PutKeyPolicy(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._policy_name(call)
        self._authorize(call, record, "PutKeyPolicy")
        text = call.params["Policy"]
        policy = self._parse_policy(text)
        self._check_policy_lockout(call, policy, record.arn)

        def change(current: KeyRecord) -> KeyRecord:
            self._not_pending(current)
            return replace(current, policy=text)

        if self.store.modify_key(record.key_id, change) is None:
            raise self._not_found_key(record.key_id)
        return {}

    def _op_ListKeyPolicies(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "ListKeyPolicies")
        return {"PolicyNames": ["default"], "Truncated": False}

    @staticmethod
    def _check_tags(new: list[tuple[str, str]], existing: list[tuple[str, str]]) -> None:
        for key, _ in new:
            if key.lower().startswith("aws:"):
                raise KMSError("TagException", "Tags beginning with aws: are reserved.")
        if len({k for k, _ in existing} | {k for k, _ in new}) > MAX_TAGS:
            raise KMSError("LimitExceededException", f"A key can have at most {MAX_TAGS} tags.")

    def _op_TagResource(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "TagResource")
        new = call.params["Tags"]

        def change(current: KeyRecord) -> KeyRecord:
            self._not_pending(current)
            self._check_tags(new, list(current.tags))
            tags = dict(current.tags)
            tags.update(new)
            return replace(current, tags=tuple(tags.items()))

        if self.store.modify_key(record.key_id, change) is None:
            raise self._not_found_key(record.key_id)
        return {}

    def _op_UntagResource(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "UntagResource")
        drop = set(call.params["TagKeys"])

        def change(current: KeyRecord) -> KeyRecord:
            self._not_pending(current)
            return replace(current, tags=tuple((k, v) for k, v in current.tags if k not in drop))

        if self.store.modify_key(record.key_id, change) is None:
            raise self._not_found_key(record.key_id)
        return {}

    def _op_ListResourceTags(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "ListResourceTags")
        page, extra = self._page(list(record.tags), call, 50, lambda t: t[0])
        return {"Tags": [{"TagKey": k, "TagValue": v} for k, v in page], **extra}

    # ------------------------------------------------------------------------------------------ encryption

    def _encryption_usage(self, record: KeyRecord, algorithm: str | None, context: Mapping[str, str]) -> str:
        if record.key_usage != "ENCRYPT_DECRYPT":
            raise KMSError("InvalidKeyUsageException", f"{record.arn} key usage is {record.key_usage} which is not "
                           "valid for this operation.")
        info = keycrypto.KEY_SPECS[record.key_spec]
        if info.symmetric:
            algorithm = algorithm or "SYMMETRIC_DEFAULT"
        elif algorithm is None:
            raise _validation("EncryptionAlgorithm is required for asymmetric KMS keys.")
        elif context:
            raise _validation("EncryptionContext is not supported with asymmetric KMS keys.")
        if algorithm not in info.encryption_algorithms:
            raise KMSError("InvalidKeyUsageException", f"{record.arn} does not support encryption algorithm "
                           f"{algorithm}.")
        return algorithm

    def _encrypt(self, record: KeyRecord, plaintext: bytes, context: Mapping[str, str], algorithm: str) -> bytes:
        if algorithm == "SYMMETRIC_DEFAULT":
            blob = seal_blob(key_id=record.key_id, material_version=record.current_version,
                             material=self._material(record), plaintext=plaintext, context=context,
                             iv=self.rng(12))
            return blob.to_bytes()
        return keycrypto.asymmetric_encrypt(self._material(record), algorithm, plaintext)

    def _op_Encrypt(self, call: _Call) -> dict[str, Any]:
        p = call.params
        record = self._key(call)
        context = p.get("EncryptionContext", {})
        self._authorize(call, record, "Encrypt", context=context)
        self._usable(record)
        algorithm = self._encryption_usage(record, p.get("EncryptionAlgorithm"), context)
        self._dry_run(call)
        blob = self._encrypt(record, p["Plaintext"], context, algorithm)
        return {"CiphertextBlob": _b64(blob), "KeyId": record.arn, "EncryptionAlgorithm": algorithm}

    def _decrypt(self, call: _Call, ciphertext: bytes, *, key_member: str, context: Mapping[str, str],
                 algorithm: str | None, action: str, recipient: VerifiedRecipient | None = None
                 ) -> tuple[KeyRecord, bytes, str]:
        """The shared part of Decrypt and ReEncrypt (source side): (key, plaintext, algorithm)."""
        named = self._key(call, key_member) if key_member in call.params else None
        if named is not None and named.key_spec != "SYMMETRIC_DEFAULT":
            # asymmetric: the blob is raw RSA-OAEP; KeyId and EncryptionAlgorithm are required
            self._authorize(call, named, action, context=context, recipient=recipient)
            self._usable(named)
            algorithm = self._encryption_usage(named, algorithm, context)
            self._dry_run(call)
            return named, keycrypto.asymmetric_decrypt(self._material(named), algorithm, ciphertext), algorithm
        if algorithm not in (None, "SYMMETRIC_DEFAULT"):
            raise KMSError("IncorrectKeyException", "The key ID in the request does not identify a KMS key that "
                           "can perform this operation.")
        try:
            blob = CiphertextBlob.from_bytes(ciphertext)
        except CiphertextError:
            raise KMSError("InvalidCiphertextException", "") from None
        if named is not None and named.key_id != blob.key_id:
            raise KMSError("IncorrectKeyException", "The key ID in the request does not identify a KMS key that "
                           "can perform this operation.")
        if named is not None:
            record = named
        else:
            found = self.store.get_key(blob.key_id)
            if found is None:
                raise KMSError("InvalidCiphertextException", "")
            record = self._live(found, call.now)
            resource = {"accountId": self.account_id, "type": "AWS::KMS::Key", "ARN": record.arn}
            call.audit.resources.append(resource)
        self._authorize(call, record, action, context=context, recipient=recipient)
        self._usable(record)
        if record.key_usage != "ENCRYPT_DECRYPT":
            raise KMSError("InvalidKeyUsageException", f"{record.arn} key usage is {record.key_usage} which is not "
                           "valid for this operation.")
        self._dry_run(call)
        material = self.store.get_material(record.key_id, blob.material_version)
        if material is None:
            raise KMSError("InvalidCiphertextException", "")
        try:
            plaintext = open_blob(blob, material=material, context=context)
        except CiphertextError:
            raise KMSError("InvalidCiphertextException", "") from None
        return record, plaintext, "SYMMETRIC_DEFAULT"

    def _op_Decrypt(self, call: _Call) -> dict[str, Any]:
        p = call.params
        recipient = self._recipient(call)
        record, plaintext, algorithm = self._decrypt(
            call, p["CiphertextBlob"], key_member="KeyId", context=p.get("EncryptionContext", {}),
            algorithm=p.get("EncryptionAlgorithm"), action="Decrypt", recipient=recipient)
        out: dict[str, Any] = {"KeyId": record.arn, "EncryptionAlgorithm": algorithm}
        if recipient is not None:
            self._consume_nonce(call, recipient)
            out["CiphertextForRecipient"] = _b64(seal_for_recipient(plaintext, recipient, self.rng))
        else:
            out["Plaintext"] = _b64(plaintext)
        return out

    def _op_ReEncrypt(self, call: _Call) -> dict[str, Any]:
        p = call.params
        source, plaintext, source_alg = self._decrypt(
            call, p["CiphertextBlob"], key_member="SourceKeyId", context=p.get("SourceEncryptionContext", {}),
            algorithm=p.get("SourceEncryptionAlgorithm"), action="ReEncryptFrom")
        dest = self._key(call, "DestinationKeyId")
        context = p.get("DestinationEncryptionContext", {})
        self._authorize(call, dest, "ReEncryptTo", context=context)
        self._usable(dest)
        dest_alg = self._encryption_usage(dest, p.get("DestinationEncryptionAlgorithm"), context)
        self._dry_run(call)
        blob = self._encrypt(dest, plaintext, context, dest_alg)
        return {"CiphertextBlob": _b64(blob), "SourceKeyId": source.arn, "KeyId": dest.arn,
                "SourceEncryptionAlgorithm": source_alg, "DestinationEncryptionAlgorithm": dest_alg}

    # ------------------------------------------------------------------------------------------ data keys, random

    def _symmetric_encryption_key(self, call: _Call, action: str, context: Mapping[str, str],
                                  recipient: VerifiedRecipient | None = None) -> KeyRecord:
        record = self._key(call)
        self._authorize(call, record, action, context=context, recipient=recipient)
        self._usable(record)
        if record.key_spec != "SYMMETRIC_DEFAULT" or record.key_usage != "ENCRYPT_DECRYPT":
            raise KMSError("InvalidKeyUsageException", f"{record.arn} is not a symmetric encryption KMS key; "
                           f"{action} needs one.")
        return record

    def _data_key(self, call: _Call, action: str, recipient: VerifiedRecipient | None) -> dict[str, Any]:
        p = call.params
        if ("NumberOfBytes" in p) == ("KeySpec" in p):
            raise _validation("Please specify either number of bytes or key spec." if "KeySpec" not in p else
                              "Please specify either number of bytes or key spec, not both.")
        size = p["NumberOfBytes"] if "NumberOfBytes" in p else (32 if p["KeySpec"] == "AES_256" else 16)
        context = p.get("EncryptionContext", {})
        record = self._symmetric_encryption_key(call, action, context, recipient)
        self._dry_run(call)
        data_key = self.rng(size)
        blob = self._encrypt(record, data_key, context, "SYMMETRIC_DEFAULT")
        out: dict[str, Any] = {"CiphertextBlob": _b64(blob), "KeyId": record.arn}
        if action == "GenerateDataKey":
            if recipient is not None:
                self._consume_nonce(call, recipient)
                out["CiphertextForRecipient"] = _b64(seal_for_recipient(data_key, recipient, self.rng))
            else:
                out["Plaintext"] = _b64(data_key)
        return out

    def _op_GenerateDataKey(self, call: _Call) -> dict[str, Any]:
        return self._data_key(call, "GenerateDataKey", self._recipient(call))

    def _op_GenerateDataKeyWithoutPlaintext(self, call: _Call) -> dict[str, Any]:
        return self._data_key(call, "GenerateDataKeyWithoutPlaintext", None)

    def _data_key_pair(self, call: _Call, action: str, recipient: VerifiedRecipient | None) -> dict[str, Any]:
        p = call.params
        spec = p["KeyPairSpec"]
        context = p.get("EncryptionContext", {})
        record = self._symmetric_encryption_key(call, action, context, recipient)
        if spec not in keycrypto.DATA_KEY_PAIR_SPECS:
            raise KMSError("UnsupportedOperationException", f"KeyPairSpec {spec} is not supported by this KMS.")
        self._dry_run(call)
        private, public = keycrypto.generate_key_pair(spec)
        blob = self._encrypt(record, private, context, "SYMMETRIC_DEFAULT")
        out: dict[str, Any] = {"PrivateKeyCiphertextBlob": _b64(blob), "PublicKey": _b64(public),
                               "KeyId": record.arn, "KeyPairSpec": spec}
        if action == "GenerateDataKeyPair":
            if recipient is not None:
                self._consume_nonce(call, recipient)
                out["CiphertextForRecipient"] = _b64(seal_for_recipient(private, recipient, self.rng))
            else:
                out["PrivateKeyPlaintext"] = _b64(private)
        return out

    def _op_GenerateDataKeyPair(self, call: _Call) -> dict[str, Any]:
        return self._data_key_pair(call, "GenerateDataKeyPair", self._recipient(call))

    def _op_GenerateDataKeyPairWithoutPlaintext(self, call: _Call) -> dict[str, Any]:
        return self._data_key_pair(call, "GenerateDataKeyPairWithoutPlaintext", None)

    def _op_GenerateRandom(self, call: _Call) -> dict[str, Any]:
        p = call.params
        if "CustomKeyStoreId" in p:
            raise KMSError("CustomKeyStoreNotFoundException", "Custom key stores are not supported by this KMS.")
        if "NumberOfBytes" not in p:
            raise _validation("1 validation error detected: Value null at 'numberOfBytes' failed to satisfy "
                              "constraint: Member must not be null")
        recipient = self._recipient(call)
        data = self.rng(p["NumberOfBytes"])
        if recipient is not None:
            self._consume_nonce(call, recipient)
            return {"CiphertextForRecipient": _b64(seal_for_recipient(data, recipient, self.rng))}
        return {"Plaintext": _b64(data)}

    # ------------------------------------------------------------------------------------------ signing

    def _signing_key(self, call: _Call, action: str) -> tuple[KeyRecord, str, str]:
        p = call.params
        record = self._key(call)
        self._authorize(call, record, action)
        self._usable(record)
        if record.key_usage != "SIGN_VERIFY":
            raise KMSError("InvalidKeyUsageException", f"{record.arn} key usage is {record.key_usage} which is not "
                           f"valid for {action}.")
        algorithm = p["SigningAlgorithm"]
        if algorithm not in keycrypto.KEY_SPECS[record.key_spec].signing_algorithms:
            raise KMSError("InvalidKeyUsageException", f"{record.arn} does not support signing algorithm "
                           f"{algorithm}.")
        message_type = p.get("MessageType", "RAW")
        if message_type == "EXTERNAL_MU":
            raise _validation("MessageType EXTERNAL_MU is only valid for ML-DSA keys.")
        self._dry_run(call)
        return record, algorithm, message_type

    def _op_Sign(self, call: _Call) -> dict[str, Any]:
        record, algorithm, message_type = self._signing_key(call, "Sign")
        signature = keycrypto.sign(self._material(record), algorithm, call.params["Message"], message_type)
        return {"KeyId": record.arn, "Signature": _b64(signature), "SigningAlgorithm": algorithm}

    def _op_Verify(self, call: _Call) -> dict[str, Any]:
        record, algorithm, message_type = self._signing_key(call, "Verify")
        keycrypto.verify(self._material(record), algorithm, call.params["Message"], message_type,
                         call.params["Signature"])
        return {"KeyId": record.arn, "SignatureValid": True, "SigningAlgorithm": algorithm}

    def _op_GetPublicKey(self, call: _Call) -> dict[str, Any]:
        record = self._key(call)
        self._authorize(call, record, "GetPublicKey")
        self._usable(record)
        if record.key_spec == "SYMMETRIC_DEFAULT":
            raise KMSError("UnsupportedOperationException", f"{record.arn} is a symmetric key; it has no public "
                           "key.")
        info = keycrypto.KEY_SPECS[record.key_spec]
        out: dict[str, Any] = {"KeyId": record.arn, "PublicKey": _b64(keycrypto.public_key_der(
            self._material(record))), "CustomerMasterKeySpec": record.key_spec, "KeySpec": record.key_spec,
            "KeyUsage": record.key_usage}
        if record.key_usage == "ENCRYPT_DECRYPT":
            out["EncryptionAlgorithms"] = list(info.encryption_algorithms)
        else:
            out["SigningAlgorithms"] = list(info.signing_algorithms)
        return out


class _AlreadyRotated(Exception):
    """Another server rotated the key first (raised inside a store transaction to abort it)."""
