"""CloudTrail event records (spec cloudtrail-trail §1) for the KMS and for the enclave runtime.

Builders are pure: the event time, the event id and every identity are inputs.  KMS records are built from the
service's :class:`~enclavekit.kms.types.AuditInfo` (§1.4: ``requestParameters`` without secrets,
``responseElements: null`` for read-only calls, ``additionalEventData.recipient`` for attested requests).  Runtime
records use our own ``eventSource`` (``enclaves.enclavekit.local``): ``RunEnclave`` and ``TerminateEnclave`` are
``AwsApiCall`` events, ``EnclaveBootFailure`` and ``EnclaveOutOfMemory`` are ``AwsServiceEvent`` events with
``serviceEventDetails``.

Encoding choice (§1.4 pitfall): our writer logs PCR values as lower-case hex, as AWS's documentation does;
:func:`normalise_pcr` accepts hex or base64 when reading events written elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from enclavekit.errors import AuditFormatError
from enclavekit.kms.auditlog import RequestFacts, principal_id
from enclavekit.kms.types import AuditInfo

__all__ = [
    "EVENT_VERSION",
    "RUNTIME_EVENT_SOURCE",
    "RUNTIME_EVENT_NAMES",
    "format_time",
    "parse_time",
    "parse_event_version",
    "normalise_pcr",
    "kms_event",
    "runtime_event",
    "TRAIL_EVENT_SOURCE",
    "trail_service_event",
    "cap_record",
    "check_record",
]

EVENT_VERSION = "1.08"
RUNTIME_EVENT_SOURCE = "enclaves.enclavekit.local"
RUNTIME_EVENT_NAMES = ("RunEnclave", "TerminateEnclave", "EnclaveBootFailure", "EnclaveOutOfMemory")
_SERVICE_EVENTS = frozenset({"EnclaveBootFailure", "EnclaveOutOfMemory"})
_CAP_1KB = 1024                    # §1.1: userAgent, errorCode, errorMessage, requestID are cut to 1 KB
_CAP_100KB = 100 * 1024            # §1.1: requestParameters, responseElements, serviceEventDetails
_CAP_28KB = 28 * 1024              # §1.1: additionalEventData
_CAPS = (("requestParameters", _CAP_100KB), ("responseElements", _CAP_100KB), ("serviceEventDetails", _CAP_100KB),
         ("additionalEventData", _CAP_28KB))
TRAIL_EVENT_SOURCE = "trail.enclavekit.local"     # records the trail writes about itself (ClockWentBackwards)
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")
_VERSION_RE = re.compile(r"(\d{1,3})\.(\d{1,3})\Z")
# §1.2: fields every record carries (Insights events aside, which we neither write nor read)
_REQUIRED = ("eventVersion", "userIdentity", "eventTime", "eventSource", "eventName", "awsRegion",
             "sourceIPAddress", "requestParameters", "responseElements", "eventID", "eventType")


def format_time(when: datetime) -> str:
    """§1.1: ``YYYY-MM-DDTHH:MM:SSZ``, UTC, second precision."""
    if when.tzinfo is None:
        raise ValueError("event times must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """The inverse of :func:`format_time`; raises :class:`AuditFormatError` for anything else."""
    if not isinstance(text, str) or not _TIME_RE.match(text):
        raise AuditFormatError(f"expected a time such as 2026-03-02T09:14:52Z, got {str(text)[:40]!r}")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise AuditFormatError(f"not a valid date: {text!r}") from exc


def parse_event_version(text: str) -> tuple[int, int]:
    """§1.1: both parts are integers (``"1.10"`` is (1, 10)); only major version 1 is known."""
    match = _VERSION_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise AuditFormatError(f"eventVersion must look like 1.08, got {str(text)[:20]!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    if major != 1:
        raise AuditFormatError(f"eventVersion {text} has major version {major}; only 1 is understood")
    return major, minor


def normalise_pcr(value: str) -> bytes:
    """§1.4 pitfall: a PCR in an event may be hex (AWS docs, our writer) or standard base64 (seen in the wild)."""
    if re.fullmatch(r"[0-9a-fA-F]{64}|[0-9a-fA-F]{96}|[0-9a-fA-F]{128}", value):
        return bytes.fromhex(value)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuditFormatError("a PCR value is neither hex nor base64") from exc
    if len(raw) not in (32, 48, 64):
        raise AuditFormatError(f"a PCR value decodes to {len(raw)} bytes, expected 32, 48 or 64")
    return raw


def kms_event(facts: RequestFacts, audit: AuditInfo | None, *, event_id: str, error_code: str | None = None,
              error_message: str | None = None) -> dict[str, Any]:
    """One KMS ``AwsApiCall`` record (§1.4, examples A and B); allowed and denied calls have the same shape."""
    info = audit or AuditInfo()
    identity: dict[str, Any]
    if facts.principal is not None:
        p = facts.principal
        identity = {"type": "IAMUser", "principalId": principal_id(p), "arn": p.arn, "accountId": p.account_id,
                    "accessKeyId": p.access_key_id, "userName": p.name}
    else:
        identity = {"type": "Unknown", "accountId": facts.account_id}
        if facts.access_key_id:
            identity["accessKeyId"] = facts.access_key_id[:128]
    record: dict[str, Any] = {
        "eventVersion": EVENT_VERSION,
        "userIdentity": identity,
        "eventTime": format_time(facts.event_time),
        "eventSource": "kms.amazonaws.com",
        "eventName": facts.operation or "Unknown",
        "awsRegion": facts.region,
        "sourceIPAddress": facts.source_ip,
        "userAgent": facts.user_agent[:_CAP_1KB],
    }
    if error_code is not None:
        record["errorCode"] = error_code[:_CAP_1KB]
        record["errorMessage"] = (error_message or "")[:_CAP_1KB]
    # §1.1: requestParameters and responseElements are always present, possibly null
    record["requestParameters"] = info.request_parameters
    record["responseElements"] = info.response_elements
    additional: dict[str, Any] = {}
    if info.recipient is not None:
        r = info.recipient
        # §1.4: the current page's field names; PCR values in lower-case hex
        recipient: dict[str, str] = {
            "attestationDocumentModuleId": r.module_id,
            "attestationDocumentEnclaveImageDigest": r.image_sha384.lower(),
        }
        for index in (1, 2, 3, 4, 8):
            if index in r.pcrs:
                recipient[f"attestationDocumentEnclavePCR{index}"] = r.pcrs[index].lower()
        additional["recipient"] = recipient
    if info.decision:
        additional["policyDecision"] = info.decision
    if additional:
        record["additionalEventData"] = additional
    record.update({
        "requestID": facts.request_id[:_CAP_1KB],
        "eventID": event_id,
        "readOnly": info.read_only,
        "resources": [dict(item) for item in info.resources],
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": facts.account_id,
        "eventCategory": "Management",
    })
    return cap_record(record)


def runtime_event(name: str, *, event_time: datetime, event_id: str, region: str, account_id: str,
                  enclave_id: str, enclave_name: str | None = None, user: str = "root",
                  request_parameters: Mapping[str, Any] | None = None,
                  response_elements: Mapping[str, Any] | None = None,
                  details: Mapping[str, Any] | None = None, error_code: str | None = None,
                  error_message: str | None = None) -> dict[str, Any]:
    """A runtime record: ``RunEnclave``/``TerminateEnclave`` calls, ``EnclaveBootFailure``/``EnclaveOutOfMemory``."""
    if name not in RUNTIME_EVENT_NAMES:
        raise ValueError(f"unknown runtime event {name!r}; expected one of {', '.join(RUNTIME_EVENT_NAMES)}")
    service_event = name in _SERVICE_EVENTS
    identity: dict[str, Any]
    if service_event:
        identity = {"type": "AWSService", "invokedBy": RUNTIME_EVENT_SOURCE}
    else:
        identity = {"type": "Root" if user == "root" else "IAMUser", "accountId": account_id, "userName": user}
    arn = f"arn:aws:ec2:{region}:{account_id}:enclave/{enclave_id}"
    record: dict[str, Any] = {
        "eventVersion": EVENT_VERSION,
        "userIdentity": identity,
        "eventTime": format_time(event_time),
        "eventSource": RUNTIME_EVENT_SOURCE,
        "eventName": name,
        "awsRegion": region,
        "sourceIPAddress": RUNTIME_EVENT_SOURCE if service_event else "127.0.0.1",
    }
    if not service_event:
        record["userAgent"] = "enclavekit"
    if error_code is not None:
        record["errorCode"] = error_code[:_CAP_1KB]
        record["errorMessage"] = (error_message or "")[:_CAP_1KB]
    params = dict(request_parameters or {})
    params.setdefault("enclaveId", enclave_id)
    if enclave_name is not None:
        params.setdefault("enclaveName", enclave_name)
    record["requestParameters"] = params
    record["responseElements"] = dict(response_elements) if response_elements is not None else None
    record["eventID"] = event_id
    record["readOnly"] = False
    record["resources"] = [{"accountId": account_id, "type": "AWS::EC2::Enclave", "ARN": arn}]
    record["eventType"] = "AwsServiceEvent" if service_event else "AwsApiCall"
    record["managementEvent"] = True
    record["recipientAccountId"] = account_id
    if service_event:
        record["serviceEventDetails"] = dict(details or {})
    record["eventCategory"] = "Management"
    return cap_record(record)


def trail_service_event(name: str, *, event_time: datetime, event_id: str, region: str, account_id: str,
                        trail_name: str, details: Mapping[str, Any]) -> dict[str, Any]:
    """An ``AwsServiceEvent`` the trail writes about itself (e.g. ``ClockWentBackwards``)."""
    arn = f"arn:aws:cloudtrail:{region}:{account_id}:trail/{trail_name}"
    return {
        "eventVersion": EVENT_VERSION,
        "userIdentity": {"type": "AWSService", "invokedBy": TRAIL_EVENT_SOURCE},
        "eventTime": format_time(event_time),
        "eventSource": TRAIL_EVENT_SOURCE,
        "eventName": name,
        "awsRegion": region,
        "sourceIPAddress": TRAIL_EVENT_SOURCE,
        "requestParameters": None,
        "responseElements": None,
        "eventID": event_id,
        "readOnly": False,
        "resources": [{"accountId": account_id, "type": "AWS::CloudTrail::Trail", "ARN": arn}],
        "eventType": "AwsServiceEvent",
        "managementEvent": True,
        "recipientAccountId": account_id,
        "serviceEventDetails": dict(details),
        "eventCategory": "Management",
    }


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode())


def cap_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """§1.1 size caps, applied like CloudTrail: an over-size field is not an error, its value is replaced.

    ``requestParameters``/``responseElements``/``serviceEventDetails`` over 100 KB and ``additionalEventData`` over
    28 KB become the marker ``{"omitted": true, "originalSizeBytes": N}`` (the field stays, an object, so readers
    see that something was dropped); the 1 KB fields are cut.  Returns a new dict; small records are unchanged.
    """
    out = dict(record)
    for name, limit in _CAPS:
        if out.get(name) is not None:
            size = _json_size(out[name])
            if size > limit:
                out[name] = {"omitted": True, "originalSizeBytes": size}
    for name in ("userAgent", "errorCode", "errorMessage", "requestID"):
        if isinstance(out.get(name), str) and len(out[name]) > _CAP_1KB:
            out[name] = out[name][:_CAP_1KB]
    return out


def check_record(record: Any) -> None:
    """§1.2: a record is an object with the always-present fields, a known version and a well-formed time."""
    if not isinstance(record, dict):
        raise AuditFormatError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [name for name in _REQUIRED if name not in record]
    if missing:
        raise AuditFormatError(f"a record lacks {', '.join(missing)}")
    parse_event_version(record["eventVersion"])
    parse_time(record["eventTime"])
    if not isinstance(record["userIdentity"], dict) or not isinstance(record["userIdentity"].get("type"), str):
        raise AuditFormatError("userIdentity must be an object with a type")
    for name in ("eventSource", "eventName", "awsRegion", "eventID", "eventType"):
        if not isinstance(record[name], str):
            raise AuditFormatError(f"{name} must be a string")
    for name in ("requestParameters", "responseElements"):
        if record[name] is not None and not isinstance(record[name], dict):
            raise AuditFormatError(f"{name} must be an object or null")
