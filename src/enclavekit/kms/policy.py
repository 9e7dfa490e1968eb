"""Key policies in IAM JSON: a strict parser and an evaluator that says which statement and condition decided.

``KeyPolicy.from_json(text)`` accepts the IAM policy grammar KMS key policies use (``Version``, ``Id``,
``Statement`` as an object or a list; per statement ``Sid``, ``Effect``, ``Principal``/``NotPrincipal``,
``Action``/``NotAction``, ``Resource``/``NotResource``, ``Condition``) and refuses anything else with
:class:`PolicyError` (the service answers ``MalformedPolicyDocumentException``).

``policy.evaluate(request)`` applies IAM's rule: an explicit ``Deny`` wins over any ``Allow``; without an
``Allow`` the request is implicitly denied.  The :class:`PolicyDecision` names the deciding statement (its Sid,
or ``#<index>`` without one) and, for a condition failure, the operator and key — never values, so a denial
message never leaks key data or request data.

Conditions (spec 4.5 plus the IAM operators KMS policies use): ``StringEquals``, ``StringNotEquals``,
``StringEqualsIgnoreCase``, ``StringNotEqualsIgnoreCase``, ``StringLike``, ``StringNotLike`` (``*`` and ``?``),
each with an ``…IfExists`` form; ``Bool`` (and ``BoolIfExists``); ``Null``; the set qualifiers ``ForAnyValue:``
and ``ForAllValues:`` for multi-valued keys such as ``kms:EncryptionContextKeys``.  IAM semantics: several
operators in a block, and several keys under an operator, must all hold; several values for one key are
alternatives; a missing key fails a positive operator and satisfies a negated one; ``…IfExists`` is satisfied by a
missing key; ``ForAllValues`` is satisfied by a missing key, ``ForAnyValue`` is not; a multi-valued key with no
values (``kms:EncryptionContextKeys`` of a request without context) is missing, also for ``Null``.

Condition key names are case-insensitive, the ``<key>`` part of ``kms:EncryptionContext:<key>`` included (AWS
KMS developer guide, kms:EncryptionContext:context-key); values keep their case unless the operator ignores it.
An encryption context may hold two keys that differ only in case; then ``kms:EncryptionContext:<key>`` names
both, and the condition must hold for each of them in an ``Allow`` but for one of them in a ``Deny`` (both
choices fail closed).  Condition values written as JSON numbers or booleans are taken as their JSON text
(``5`` -> ``"5"``, ``true`` -> ``"true"``), as IAM takes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from enclavekit.errors import FormatError

__all__ = [
    "PolicyError",
    "Statement",
    "Condition",
    "KeyPolicy",
    "PolicyRequest",
    "PolicyDecision",
    "default_key_policy",
    "MAX_POLICY_SIZE",
]

MAX_POLICY_SIZE = 32 * 1024  # AWS key policy limit: 32 KiB
_VERSIONS = ("2012-10-17", "2008-10-17")
_STATEMENT_KEYS = {"Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction", "Resource", "NotResource",
                   "Condition"}
_BASE_OPERATORS = {
    "StringEquals", "StringNotEquals", "StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase", "StringLike",
    "StringNotLike", "Bool",
}
_NEGATED = {"StringNotEquals", "StringNotEqualsIgnoreCase", "StringNotLike"}
_ACCOUNT = re.compile(r"^\d{12}$")


class PolicyError(FormatError):
    """A key policy document is malformed; the message says what is wrong."""

    code = "E87"


def _fail(message: str) -> PolicyError:
    return PolicyError(message)


@dataclass(frozen=True)
class _JSONNumber:
    """A JSON number kept as its text: only condition values accept numbers, anywhere else it is refused."""

    text: str


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN, Infinity and -Infinity, which are not JSON (RFC 8259 section 6)
    raise _fail(f"the policy is not valid JSON ({name} is not a JSON value)")


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _fail(f"{what} must be a string or a non-empty list of strings")


def _scalar_text(value: Any) -> str | None:
    """A condition value as IAM compares it: strings as they are, numbers and booleans as their JSON text."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _JSONNumber):
        return value.text
    return None


def _condition_values(value: Any, what: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    texts = [_scalar_text(v) for v in items]
    if not items or any(t is None for t in texts):
        raise _fail(f"{what} must be a string, number or boolean, or a non-empty list of them")
    return tuple(t for t in texts if t is not None)


def _wildcard(pattern: str, *, ignore_case: bool) -> re.Pattern[str]:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{regex}$", re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


@dataclass(frozen=True)
class Condition:
    """One operator/key pair of a Condition block: ``qualifier`` is "", ``ForAnyValue`` or ``ForAllValues``."""

    operator: str            # as written, e.g. "ForAnyValue:StringEqualsIfExists"
    base: str                # StringEquals, …, Bool, Null
    qualifier: str
    if_exists: bool
    key: str
    values: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.operator} {self.key}"

    def _one(self, actual: str) -> bool:
        """Does a single request value match any of the condition's values?"""
        base = self.base
        if base in ("StringEquals", "StringNotEquals"):
            hit = actual in self.values
        elif base in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
            folded = actual.casefold()
            hit = any(folded == v.casefold() for v in self.values)
        elif base in ("StringLike", "StringNotLike"):
            hit = any(_wildcard(v, ignore_case=False).match(actual) for v in self.values)
        elif base == "Bool":
            hit = any(actual.lower() == v.lower() for v in self.values)
        else:  # pragma: no cover - parse() admits no other operators
            raise AssertionError(base)
        return hit

    def holds(self, context: Mapping[str, str | Sequence[str]], *, deny: bool = False) -> bool:
        """Does the condition hold?  ``deny``: it belongs to a Deny statement (decides how case twins combine)."""
        candidates = _lookup(context, self.key)
        if len(candidates) <= 1:
            return self._holds(candidates[0] if candidates else None)
        # keys that differ only in case (an encryption context may have both): fail closed either way
        results = [self._holds(c) for c in candidates]
        return any(results) if deny else all(results)

    def _holds(self, actual: str | Sequence[str] | None) -> bool:
        values: tuple[str, ...] | None
        if actual is None:
            values = None
        elif isinstance(actual, str):
            values = (actual,)
        else:
            # IAM: a multi-valued key with no values is absent (Null, …IfExists and the qualifiers see it so)
            values = tuple(actual) or None
        if self.base == "Null":
            want_missing = self.values[0].lower() == "true"
            return (values is None) == want_missing
        negated = self.base in _NEGATED
        if self.qualifier == "ForAllValues":
            # every request value must match (vacuously true when the key is missing or empty)
            if not values:
                return True
            return all(self._positive(v, negated) for v in values)
        if self.qualifier == "ForAnyValue":
            if not values:
                return self.if_exists
            return any(self._positive(v, negated) for v in values)
        if not values:
            return self.if_exists or negated
        if negated:
            # negated operators: true when no request value matches any condition value
            return not any(self._one(v) for v in values)
        return any(self._one(v) for v in values)

    def _positive(self, value: str, negated: bool) -> bool:
        hit = self._one(value)
        return not hit if negated else hit


def _lookup(context: Mapping[str, str | Sequence[str]], key: str) -> list[str | Sequence[str]]:
    """Every request value whose key name equals ``key`` ignoring case (IAM: condition key names are
    case-insensitive, the <key> of kms:EncryptionContext:<key> included)."""
    lowered = key.lower()
    return [value for name, value in context.items() if name.lower() == lowered]


def _parse_conditions(block: Any, where: str) -> tuple[Condition, ...]:
    if not isinstance(block, dict) or not block:
        raise _fail(f"{where}: Condition must be a non-empty object")
    out = []
    for operator, pairs in block.items():
        qualifier, _, rest = operator.rpartition(":")
        if qualifier not in ("", "ForAnyValue", "ForAllValues"):
            raise _fail(f"{where}: unknown condition qualifier '{qualifier}'")
        if_exists = rest.endswith("IfExists")
        base = rest.removesuffix("IfExists")
        if base not in _BASE_OPERATORS and not (base == "Null" and not if_exists and not qualifier):
            raise _fail(f"{where}: unsupported condition operator '{operator}'")
        if not isinstance(pairs, dict) or not pairs:
            raise _fail(f"{where}: condition operator '{operator}' must map keys to values")
        for key, raw in pairs.items():
            if not isinstance(key, str) or not key:
                raise _fail(f"{where}: empty condition key")
            values = _condition_values(raw, f"{where}: values of {operator} {key}")
            if base in ("Null", "Bool") and any(v.lower() not in ("true", "false") for v in values):
                raise _fail(f"{where}: {operator} takes true or false")
            if base == "Null" and len(values) != 1:
                raise _fail(f"{where}: Null takes one value")
            out.append(Condition(operator, base, qualifier, if_exists, key, values))
    return tuple(out)


@dataclass(frozen=True)
class _PrincipalSpec:
    anyone: bool = False
    arns: tuple[str, ...] = ()      # exact ARNs
    accounts: tuple[str, ...] = ()  # account ids (from "1234…" or "arn:aws:iam::1234…:root")

    def matches(self, principal_arn: str, account: str) -> bool:
        return self.anyone or principal_arn in self.arns or account in self.accounts


def _parse_principal(value: Any, where: str) -> _PrincipalSpec:
    if value == "*":
        return _PrincipalSpec(anyone=True)
    if not isinstance(value, dict) or not value:
        raise _fail(f"{where}: Principal must be \"*\" or an object such as {{\"AWS\": \"arn:…\"}}")
    arns: list[str] = []
    accounts: list[str] = []
    anyone = False
    for kind, raw in value.items():
        if kind != "AWS":
            # Service and Federated principals never call this KMS
            if kind not in ("Service", "Federated", "CanonicalUser"):
                raise _fail(f"{where}: unknown principal type '{kind}'")
            _str_list(raw, f"{where}: Principal {kind}")
            continue
        for item in _str_list(raw, f"{where}: Principal AWS"):
            if item == "*":
                anyone = True
            elif _ACCOUNT.match(item):
                accounts.append(item)
            elif m := re.fullmatch(r"arn:aws[\w-]*:iam::(\d{12}):root", item):
                accounts.append(m.group(1))
            elif re.fullmatch(r"arn:aws[\w-]*:(iam|sts)::\d{12}:[\w+=,.@/-]+", item):
                arns.append(item)
            else:
                raise _fail(f"{where}: invalid principal '{item}'")
    return _PrincipalSpec(anyone, tuple(arns), tuple(accounts))


@dataclass(frozen=True)
class Statement:
    index: int
    sid: str | None
    effect: str
    principal: _PrincipalSpec | None
    not_principal: _PrincipalSpec | None
    actions: tuple[str, ...]
    not_action: bool
    resources: tuple[str, ...]
    not_resource: bool
    conditions: tuple[Condition, ...] = ()

    @property
    def name(self) -> str:
        return f"'{self.sid}'" if self.sid else f"#{self.index}"

    def applies_to(self, principal_arn: str, account: str, action: str, resource: str) -> bool:
        if self.principal is not None and not self.principal.matches(principal_arn, account):
            return False
        if self.not_principal is not None and self.not_principal.matches(principal_arn, account):
            return False
        # IAM: action names are case-insensitive; wildcards * and ?
        hit = any(_wildcard(a, ignore_case=True).match(action) for a in self.actions)
        if hit == self.not_action:
            return False
        res_hit = any(_wildcard(r, ignore_case=False).match(resource) for r in self.resources)
        return res_hit != self.not_resource

    def failed_condition(self, context: Mapping[str, str | Sequence[str]]) -> Condition | None:
        for cond in self.conditions:
            if not cond.holds(context, deny=self.effect == "Deny"):
                return cond
        return None


def _parse_statement(raw: Any, index: int) -> Statement:
    where = f"statement #{index}"
    if not isinstance(raw, dict):
        raise _fail(f"{where} is not an object")
    unknown = set(raw) - _STATEMENT_KEYS
    if unknown:
        raise _fail(f"{where}: unknown element '{sorted(unknown)[0]}'")
    sid = raw.get("Sid")
    if sid is not None and (not isinstance(sid, str) or not re.fullmatch(r"[\w \-.:/@+=,]*", sid)):
        raise _fail(f"{where}: Sid must be a string")
    if sid:
        where = f"statement '{sid}'"
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise _fail(f"{where}: Effect must be \"Allow\" or \"Deny\"")
    if ("Principal" in raw) == ("NotPrincipal" in raw):
        raise _fail(f"{where}: exactly one of Principal and NotPrincipal is required in a key policy")
    if ("Action" in raw) == ("NotAction" in raw):
        raise _fail(f"{where}: exactly one of Action and NotAction is required")
    if ("Resource" in raw) == ("NotResource" in raw):
        raise _fail(f"{where}: exactly one of Resource and NotResource is required")
    if "NotPrincipal" in raw and effect == "Allow":
        raise _fail(f"{where}: NotPrincipal is only allowed with Effect Deny")
    actions = _str_list(raw.get("Action", raw.get("NotAction")), f"{where}: Action")
    for action in actions:
        if action != "*" and not re.fullmatch(r"kms:[A-Za-z*?]+", action, re.IGNORECASE):
            raise _fail(f"{where}: action '{action}' is not a kms: action")
    resources = _str_list(raw.get("Resource", raw.get("NotResource")), f"{where}: Resource")
    conditions = _parse_conditions(raw["Condition"], where) if "Condition" in raw else ()
    return Statement(
        index=index, sid=sid or None, effect=effect,
        principal=_parse_principal(raw["Principal"], where) if "Principal" in raw else None,
        not_principal=_parse_principal(raw["NotPrincipal"], where) if "NotPrincipal" in raw else None,
        actions=actions, not_action="NotAction" in raw, resources=resources, not_resource="NotResource" in raw,
        conditions=conditions)


@dataclass(frozen=True)
class PolicyRequest:
    """What the evaluator sees: who, what, on which key, and the condition context."""

    principal_arn: str
    account: str
    action: str                       # "kms:Decrypt"
    resource: str                     # the key ARN
    context: Mapping[str, str | Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    explicit_deny: bool = False
    statement: str | None = None      # "'Sid'" or "#index"
    condition: str | None = None      # "StringEqualsIgnoreCase kms:RecipientAttestation:ImageSha384"

    @property
    def reason(self) -> str:
        """Why, in words, for the AccessDeniedException message and the audit event."""
        if self.allowed:
            return f"allowed by statement {self.statement}"
        if self.explicit_deny:
            return f"with an explicit deny in a resource-based policy (statement {self.statement})"
        if self.statement and self.condition:
            return f"because statement {self.statement} condition {self.condition} did not match"
        return "because no resource-based policy allows the action"


@dataclass(frozen=True)
class KeyPolicy:
    version: str
    statements: tuple[Statement, ...]
    policy_id: str | None = None

    @classmethod
    def from_json(cls, text: str) -> KeyPolicy:
        if not isinstance(text, str):
            raise TypeError("policy text must be a string")
        if len(text.encode("utf-8")) > MAX_POLICY_SIZE:
            raise _fail(f"the policy is larger than {MAX_POLICY_SIZE} bytes")

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in pairs:
                if key in out:
                    raise _fail(f"duplicate element '{key}'")
                out[key] = value
            return out

        try:
            doc = json.loads(text, object_pairs_hook=no_duplicates, parse_int=_JSONNumber,
                             parse_float=_JSONNumber, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise _fail(f"the policy is not valid JSON (line {exc.lineno} column {exc.colno})") from exc
        except RecursionError as exc:
            raise _fail("the policy is nested too deeply") from exc
        if not isinstance(doc, dict):
            raise _fail("the policy must be a JSON object")
        unknown = set(doc) - {"Version", "Id", "Statement"}
        if unknown:
            raise _fail(f"unknown top-level element '{sorted(unknown)[0]}'")
        version = doc.get("Version", "2008-10-17")
        if version not in _VERSIONS:
            raise _fail(f"unsupported policy Version '{version}' (use 2012-10-17)")
        policy_id = doc.get("Id")
        if policy_id is not None and not isinstance(policy_id, str):
            raise _fail("Id must be a string")
        raw = doc.get("Statement")
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise _fail("Statement must be an object or a non-empty list")
        statements = tuple(_parse_statement(s, i) for i, s in enumerate(raw))
        sids = [s.sid for s in statements if s.sid]
        if len(sids) != len(set(sids)):
            raise _fail("statement Sids must be unique")
        return cls(version, statements, policy_id)

    def evaluate(self, request: PolicyRequest) -> PolicyDecision:
        """Explicit Deny > Allow > implicit deny; the decision names the statement and condition."""
        allow: Statement | None = None
        near_miss: tuple[Statement, Condition] | None = None
        for st in self.statements:
            if not st.applies_to(request.principal_arn, request.account, request.action, request.resource):
                continue
            failed = st.failed_condition(request.context)
            if st.effect == "Deny":
                if failed is None:
                    return PolicyDecision(False, explicit_deny=True, statement=st.name,
                                          condition=st.conditions[0].describe() if st.conditions else None)
                continue
            if failed is None:
                allow = allow or st
            elif near_miss is None:
                near_miss = (st, failed)
        if allow is not None:
            return PolicyDecision(True, statement=allow.name)
        if near_miss is not None:
            return PolicyDecision(False, statement=near_miss[0].name, condition=near_miss[1].describe())
        return PolicyDecision(False)


def default_key_policy(account_id: str) -> str:
    """AWS's default key policy: the account (its IAM principals) may do everything with the key."""
    return json.dumps({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [{
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
            "Action": "kms:*",
            "Resource": "*",
        }],
    }, indent=2)
