"""Key policy parsing (one negative test per rule) and evaluation (IAM semantics, the deciding statement)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from enclavekit.kms.policy import KeyPolicy, PolicyError, PolicyRequest, default_key_policy

ACCOUNT = "111122223333"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def _policy(*statements: dict[str, Any]) -> KeyPolicy:
    return KeyPolicy.from_json(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


def _allow(**extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Principal": {"AWS": ALICE}, "Action": "kms:*", "Resource": "*", **extra}


def _req(action: str = "kms:Decrypt", principal: str = ALICE, **context: Any) -> PolicyRequest:
    account = principal.split(":")[4]
    return PolicyRequest(principal, account, action, KEY, context)


# ---------------------------------------------------------------------------------------------- parsing


def test_default_policy_allows_account_principals() -> None:
    policy = KeyPolicy.from_json(default_key_policy(ACCOUNT))
    assert policy.evaluate(_req()).allowed
    assert policy.evaluate(_req(principal=f"arn:aws:iam::{ACCOUNT}:role/r")).allowed
    assert not policy.evaluate(_req(principal="arn:aws:iam::999988887777:user/x")).allowed


def test_statement_may_be_an_object() -> None:
    policy = KeyPolicy.from_json(json.dumps({"Version": "2012-10-17", "Statement": _allow()}))
    assert policy.evaluate(_req()).allowed


@pytest.mark.parametrize(("text", "fragment"), [
    ("{", "not valid JSON"),
    ("[]", "JSON object"),
    (json.dumps({"Version": "2012-10-17"}), "Statement"),
    (json.dumps({"Version": "2012-10-17", "Statement": []}), "Statement"),
    (json.dumps({"Version": "2020-01-01", "Statement": _allow()}), "Version"),
    (json.dumps({"Version": "2012-10-17", "Statement": _allow(), "Extra": 1}), "unknown top-level"),
    ('{"Version": "2012-10-17", "Version": "2012-10-17", "Statement": []}', "duplicate"),
    (json.dumps({"Statement": [_allow(Effect="Maybe")]}), "Effect"),
    (json.dumps({"Statement": [_allow(Bogus=1)]}), "unknown element"),
    (json.dumps({"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}), "Principal"),
    (json.dumps({"Statement": [_allow(NotAction="kms:Decrypt")]}), "Action"),
    (json.dumps({"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*"}]}), "Resource"),
    (json.dumps({"Statement": [_allow(Action="s3:GetObject")]}), "not a kms: action"),
    (json.dumps({"Statement": [_allow(Action=[])]}), "non-empty list"),
    (json.dumps({"Statement": [_allow(Principal={"AWS": "bob"})]}), "invalid principal"),
    (json.dumps({"Statement": [_allow(Principal={"Alien": "x"})]}), "unknown principal type"),
    (json.dumps({"Statement": [_allow(Principal="someone")]}), "Principal must be"),
    (json.dumps({"Statement": [{"Effect": "Allow", "NotPrincipal": {"AWS": ALICE}, "Action": "kms:*",
                                "Resource": "*"}]}), "NotPrincipal"),
    (json.dumps({"Statement": [_allow(Condition={"StringFoo": {"a": "b"}})]}), "unsupported condition operator"),
    (json.dumps({"Statement": [_allow(Condition={"Maybe:StringEquals": {"a": "b"}})]}), "qualifier"),
    (json.dumps({"Statement": [_allow(Condition={"StringEquals": {}})]}), "must map keys"),
    (json.dumps({"Statement": [_allow(Condition={})]}), "non-empty object"),
    (json.dumps({"Statement": [_allow(Condition={"Null": {"a": "maybe"}})]}), "true or false"),
    (json.dumps({"Statement": [_allow(Condition={"Null": {"a": ["true", "false"]}})]}), "one value"),
    (json.dumps({"Statement": [_allow(Condition={"StringEquals": {"a": None}})]}), "string, number or boolean"),
    (json.dumps({"Statement": [_allow(Condition={"StringEquals": {"a": {"b": "c"}}})]}), "string, number"),
    (json.dumps({"Statement": [_allow(Condition={"StringEquals": {"a": ["x", None]}})]}), "string, number"),
    (json.dumps({"Statement": [_allow(Condition={"StringEquals": {"a": []}})]}), "non-empty list"),
    (json.dumps({"Statement": [_allow(Condition={"Bool": {"a": 1}})]}), "true or false"),
    ('{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*", '
     '"Condition": {"StringEquals": {"a": NaN}}}]}', "NaN is not a JSON value"),
    (json.dumps({"Statement": [_allow(Principal={"AWS": 111122223333})]}), "Principal AWS"),
    (json.dumps({"Statement": [_allow(Resource=5)]}), "Resource"),
    (json.dumps({"Statement": [_allow(Sid="a"), _allow(Sid="a")]}), "unique"),
    (json.dumps({"Statement": [_allow(Sid=5)]}), "Sid"),
    (json.dumps({"Statement": _allow(), "Id": 5}), "Id"),
    ('{"Statement": ' + "[" * 20000, "nested too deeply|not valid JSON"),
    (json.dumps({"Statement": _allow(Sid="x" * 40000)}), "larger than"),
])
def test_malformed_policies(text: str, fragment: str) -> None:
    with pytest.raises(PolicyError, match=fragment):
        KeyPolicy.from_json(text)


def test_from_json_needs_text() -> None:
    with pytest.raises(TypeError):
        KeyPolicy.from_json(b"{}")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- evaluation


def test_explicit_deny_beats_allow() -> None:
    policy = _policy(_allow(Sid="All"), {"Sid": "NoDecrypt", "Effect": "Deny", "Principal": "*",
                                         "Action": "kms:Decrypt", "Resource": "*"})
    decision = policy.evaluate(_req())
    assert not decision.allowed and decision.explicit_deny and decision.statement == "'NoDecrypt'"
    assert "explicit deny" in decision.reason
    assert policy.evaluate(_req("kms:Encrypt")).allowed


def test_implicit_deny() -> None:
    decision = _policy(_allow(Action="kms:Encrypt")).evaluate(_req())
    assert not decision.allowed and not decision.explicit_deny
    assert decision.reason == "because no resource-based policy allows the action"


@pytest.mark.parametrize(("pattern", "action", "allowed"), [
    ("kms:*", "kms:Decrypt", True), ("kms:Gen*", "kms:GenerateDataKey", True), ("kms:Gen*", "kms:Decrypt", False),
    ("KMS:decrypt", "kms:Decrypt", True), ("kms:De?rypt", "kms:Decrypt", True), ("*", "kms:Sign", True),
])
def test_action_wildcards(pattern: str, action: str, allowed: bool) -> None:
    assert _policy(_allow(Action=pattern)).evaluate(_req(action)).allowed is allowed


def test_not_action_and_not_resource() -> None:
    policy = _policy({"Effect": "Allow", "Principal": "*", "NotAction": "kms:Decrypt", "Resource": "*"})
    assert policy.evaluate(_req("kms:Encrypt")).allowed and not policy.evaluate(_req()).allowed
    other = _policy({"Effect": "Allow", "Principal": "*", "Action": "kms:*", "NotResource": KEY})
    assert not other.evaluate(_req()).allowed


def test_principal_forms() -> None:
    for principal in ("*", {"AWS": "*"}, {"AWS": ACCOUNT}, {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                      {"AWS": [ALICE, "arn:aws:iam::999988887777:root"]}):
        assert _policy(_allow(Principal=principal)).evaluate(_req()).allowed, principal
    assert not _policy(_allow(Principal={"AWS": f"arn:aws:iam::{ACCOUNT}:user/bob"})).evaluate(_req()).allowed


def test_not_principal_deny() -> None:
    policy = _policy(_allow(Principal="*"), {"Effect": "Deny", "NotPrincipal": {"AWS": ALICE}, "Action": "kms:*",
                                             "Resource": "*"})
    assert policy.evaluate(_req()).allowed
    assert not policy.evaluate(_req(principal=f"arn:aws:iam::{ACCOUNT}:user/bob")).allowed


PCR0 = "ab" * 48


@pytest.mark.parametrize(("operator", "value", "context", "allowed"), [
    ("StringEquals", PCR0, {"kms:RecipientAttestation:ImageSha384": PCR0}, True),
    ("StringEquals", PCR0.upper(), {"kms:RecipientAttestation:ImageSha384": PCR0}, False),
    ("StringEqualsIgnoreCase", PCR0.upper(), {"kms:RecipientAttestation:ImageSha384": PCR0}, True),
    ("StringEquals", PCR0, {}, False),
    ("StringNotEquals", PCR0, {"kms:RecipientAttestation:ImageSha384": PCR0}, False),
    ("StringNotEquals", PCR0, {"kms:RecipientAttestation:ImageSha384": "00"}, True),
    ("StringNotEquals", PCR0, {}, True),
    ("StringNotEqualsIgnoreCase", PCR0.upper(), {"kms:RecipientAttestation:ImageSha384": PCR0}, False),
    ("StringLike", "ab*", {"kms:RecipientAttestation:ImageSha384": PCR0}, True),
    ("StringLike", "ab?", {"kms:RecipientAttestation:ImageSha384": PCR0}, False),
    ("StringNotLike", "cd*", {"kms:RecipientAttestation:ImageSha384": PCR0}, True),
    ("StringEqualsIfExists", PCR0, {}, True),
    ("StringEqualsIfExists", PCR0, {"kms:RecipientAttestation:ImageSha384": "00"}, False),
    ("StringEquals", [PCR0, "00"], {"kms:RecipientAttestation:ImageSha384": "00"}, True),
    ("Null", "true", {}, True),
    ("Null", "false", {}, False),
    ("Null", "false", {"kms:RecipientAttestation:ImageSha384": PCR0}, True),
    ("Bool", "true", {"kms:RecipientAttestation:ImageSha384": "TRUE"}, True),
    ("Bool", True, {"kms:RecipientAttestation:ImageSha384": "false"}, False),
])
def test_condition_operators(operator: str, value: Any, context: dict[str, str], allowed: bool) -> None:
    policy = _policy(_allow(Condition={operator: {"kms:RecipientAttestation:ImageSha384": value}}))
    assert policy.evaluate(_req(**context)).allowed is allowed


def test_condition_key_names_are_case_insensitive() -> None:
    policy = _policy(_allow(Condition={"StringEquals": {"KMS:RECIPIENTATTESTATION:PCR0": "aa"}}))
    assert policy.evaluate(_req(**{"kms:RecipientAttestation:PCR0": "aa"})).allowed
    image = _policy(_allow(Condition={"StringEquals": {"kms:recipientattestation:imagesha384": "aa"}}))
    assert image.evaluate(_req(**{"kms:RecipientAttestation:ImageSha384": "aa"})).allowed
    assert not image.evaluate(_req(**{"kms:RecipientAttestation:ImageSha384": "AA"})).allowed


def test_encryption_context_key_part_is_case_insensitive_values_are_not() -> None:
    # AWS KMS developer guide, kms:EncryptionContext:context-key: the context-key is not case sensitive; the
    # value is, with StringEquals
    ctx = _policy(_allow(Condition={"StringEquals": {"kms:EncryptionContext:Tenant": "t1"}}))
    assert ctx.evaluate(_req(**{"kms:EncryptionContext:Tenant": "t1"})).allowed
    assert ctx.evaluate(_req(**{"kms:EncryptionContext:tenant": "t1"})).allowed
    assert ctx.evaluate(_req(**{"KMS:ENCRYPTIONCONTEXT:TENANT": "t1"})).allowed
    assert not ctx.evaluate(_req(**{"kms:EncryptionContext:tenant": "T1"})).allowed
    assert not ctx.evaluate(_req(**{"kms:EncryptionContext:tenants": "t1"})).allowed
    null = _policy(_allow(Condition={"Null": {"kms:EncryptionContext:TENANT": "false"}}))
    assert null.evaluate(_req(**{"kms:EncryptionContext:tenant": "t1"})).allowed


def test_case_twins_must_all_satisfy_an_allow_and_any_fires_a_deny() -> None:
    twins = {"kms:EncryptionContext:tenant": "t1", "kms:EncryptionContext:Tenant": "t2"}
    allow = _policy(_allow(Condition={"StringEquals": {"kms:EncryptionContext:tenant": "t1"}}))
    assert not allow.evaluate(_req(**twins)).allowed
    assert allow.evaluate(_req(**(twins | {"kms:EncryptionContext:Tenant": "t1"}))).allowed
    deny = _policy(_allow(), {"Sid": "D", "Effect": "Deny", "Principal": "*", "Action": "kms:*", "Resource": "*",
                              "Condition": {"StringEquals": {"kms:EncryptionContext:TENANT": "t2"}}})
    decision = deny.evaluate(_req(**twins))
    assert not decision.allowed and decision.explicit_deny
    assert deny.evaluate(_req(**{"kms:EncryptionContext:tenant": "t1"})).allowed


@pytest.mark.parametrize(("effect", "null", "keys", "allowed"), [
    ("Allow", "false", [], False),     # "require a context": a request without one is refused
    ("Allow", "false", None, False),
    ("Allow", "false", ["a"], True),
    ("Allow", "true", [], True),
    ("Deny", "true", [], False),       # "deny without a context" fires for an empty key
    ("Deny", "true", None, False),
    ("Deny", "true", ["a"], True),
])
def test_null_treats_an_empty_multi_valued_key_as_missing(effect: str, null: str, keys: list[str] | None,
                                                          allowed: bool) -> None:
    statement = {"Effect": effect, "Principal": "*", "Action": "kms:*", "Resource": "*",
                 "Condition": {"Null": {"kms:EncryptionContextKeys": null}}}
    policy = _policy(statement) if effect == "Allow" else _policy(_allow(), statement)
    context = {} if keys is None else {"kms:EncryptionContextKeys": keys}
    assert policy.evaluate(_req(**context)).allowed is allowed


@pytest.mark.parametrize(("operator", "allowed"), [
    ("StringEqualsIfExists", True), ("StringEquals", False), ("StringNotEquals", True),
])
def test_empty_multi_valued_key_is_missing_for_other_operators(operator: str, allowed: bool) -> None:
    policy = _policy(_allow(Condition={operator: {"kms:EncryptionContextKeys": "a"}}))
    assert policy.evaluate(_req(**{"kms:EncryptionContextKeys": []})).allowed is allowed


def test_number_and_boolean_condition_values_are_their_json_text() -> None:
    text = json.dumps({"Statement": [_allow(Condition={"StringEquals": {"kms:EncryptionContext:n": "@"}})]})
    policy = KeyPolicy.from_json(text.replace('"@"', "[5, -2, 1.50, 1e3, true, false]"))
    for value in ("5", "-2", "1.50", "1e3", "true", "false"):
        assert policy.evaluate(_req(**{"kms:EncryptionContext:n": value})).allowed, value
    for value in ("1.5", "1000.0", "True", "5.0"):
        assert not policy.evaluate(_req(**{"kms:EncryptionContext:n": value})).allowed, value
    single = _policy(_allow(Condition={"StringNotEquals": {"kms:EncryptionContext:n": 7}}))
    assert not single.evaluate(_req(**{"kms:EncryptionContext:n": "7"})).allowed
    assert single.evaluate(_req(**{"kms:EncryptionContext:n": "8"})).allowed
    flag = _policy(_allow(Condition={"Bool": {"kms:EncryptionContext:f": [True]}}))
    assert flag.evaluate(_req(**{"kms:EncryptionContext:f": "true"})).allowed


@pytest.mark.parametrize(("operator", "values", "keys", "allowed"), [
    ("ForAllValues:StringEquals", ["a", "b"], ["a"], True),
    ("ForAllValues:StringEquals", ["a", "b"], ["a", "c"], False),
    ("ForAllValues:StringEquals", ["a"], None, True),
    ("ForAnyValue:StringEquals", ["a", "b"], ["c", "b"], True),
    ("ForAnyValue:StringEquals", ["a"], ["c"], False),
    ("ForAnyValue:StringEquals", ["a"], None, False),
    ("ForAnyValue:StringLike", ["ten*"], ["tenant"], True),
    ("ForAllValues:StringNotEquals", ["secret"], ["a", "b"], True),
    ("ForAllValues:StringNotEquals", ["secret"], ["a", "secret"], False),
])
def test_set_qualifiers(operator: str, values: list[str], keys: list[str] | None, allowed: bool) -> None:
    policy = _policy(_allow(Condition={operator: {"kms:EncryptionContextKeys": values}}))
    context = {} if keys is None else {"kms:EncryptionContextKeys": keys}
    assert policy.evaluate(_req(**context)).allowed is allowed


def test_all_conditions_must_hold_and_denial_names_the_failing_one() -> None:
    policy = _policy(_allow(Sid="AllowEnclave", Condition={
        "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0},
        "StringEquals": {"kms:RecipientAttestation:PCR3": "cc", "aws:PrincipalArn": ALICE}}))
    ok = {"kms:RecipientAttestation:ImageSha384": PCR0, "kms:RecipientAttestation:PCR3": "cc",
          "aws:PrincipalArn": ALICE}
    assert policy.evaluate(_req(**ok)).allowed
    decision = policy.evaluate(_req(**(ok | {"kms:RecipientAttestation:PCR3": "dd"})))
    assert not decision.allowed
    assert decision.reason == ("because statement 'AllowEnclave' condition StringEquals "
                               "kms:RecipientAttestation:PCR3 did not match")
    assert "dd" not in decision.reason and "cc" not in decision.reason


def test_statement_without_sid_is_named_by_index() -> None:
    policy = _policy(_allow(Action="kms:Encrypt"), _allow(Condition={"StringEquals": {"kms:CallerAccount": "1"}}))
    assert policy.evaluate(_req(**{"kms:CallerAccount": ACCOUNT})).statement == "#1"


def test_deny_with_failed_condition_does_not_apply() -> None:
    policy = _policy(_allow(), {"Sid": "D", "Effect": "Deny", "Principal": "*", "Action": "kms:*", "Resource": "*",
                                "Condition": {"StringEquals": {"kms:CallerAccount": "999988887777"}}})
    assert policy.evaluate(_req(**{"kms:CallerAccount": ACCOUNT})).allowed
    assert not policy.evaluate(_req(**{"kms:CallerAccount": "999988887777"})).allowed
