"""The KMS side of auditing (kms/auditlog.py): request facts, principal ids, the sinks, and the records the HTTP
layer builds with audit.events.kms_event (§4.8 / cloudtrail-trail §1.4)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from enclavekit.audit.events import check_record, kms_event
from enclavekit.kms.auditlog import MemorySink, RequestFacts, UnsafeDiscardSink, principal_id
from enclavekit.kms.types import AuditInfo, Principal, RecipientContext

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ALICE = Principal("AKIAEXAMPLEKEY000001", "arn:aws:iam::111122223333:user/alice", "111122223333", "alice")
KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def facts(principal: Principal | None = ALICE, **kw: Any) -> RequestFacts:
    base: dict[str, Any] = {"request_id": "req-1", "event_time": NOW, "operation": "Decrypt", "region": "us-east-1",
                            "account_id": "111122223333", "source_ip": "127.0.0.1", "user_agent": "boto3/1.0",
                            "principal": principal}
    base.update(kw)
    return RequestFacts(**base)


def test_attested_decrypt_record_has_the_cloudtrail_fields() -> None:
    recipient = RecipientContext(module_id="i-0123-enc0123", image_sha384="AB" * 48,
                                 pcrs={0: "ab" * 48, 1: "00" * 48, 2: "11" * 48, 8: "CD" * 48},
                                 public_key_spki=b"\x30\x00")
    info = AuditInfo(request_parameters={"keyId": KEY_ARN, "encryptionAlgorithm": "SYMMETRIC_DEFAULT"},
                     resources=[{"accountId": "111122223333", "type": "AWS::KMS::Key", "ARN": KEY_ARN}],
                     recipient=recipient, read_only=True)
    ev = kms_event(facts(), info, event_id="ev-1")
    check_record(ev)
    assert ev["userIdentity"] == {"type": "IAMUser", "principalId": principal_id(ALICE), "arn": ALICE.arn,
                                  "accountId": "111122223333", "accessKeyId": ALICE.access_key_id,
                                  "userName": "alice"}
    assert (ev["eventTime"], ev["eventSource"], ev["eventName"]) == ("2026-03-01T12:00:00Z", "kms.amazonaws.com",
                                                                     "Decrypt")
    assert ev["requestParameters"] == info.request_parameters
    assert ev["responseElements"] is None
    # cloudtrail-trail §1.4: the current field names, PCRs 1/2/3/4/8 one field each, lower-case hex
    assert ev["additionalEventData"]["recipient"] == {
        "attestationDocumentModuleId": "i-0123-enc0123",
        "attestationDocumentEnclaveImageDigest": "ab" * 48,
        "attestationDocumentEnclavePCR1": "00" * 48,
        "attestationDocumentEnclavePCR2": "11" * 48,
        "attestationDocumentEnclavePCR8": "cd" * 48,
    }
    assert (ev["requestID"], ev["eventID"], ev["readOnly"]) == ("req-1", "ev-1", True)
    assert ev["resources"] == info.resources
    assert "errorCode" not in ev
    assert b"public_key" not in json.dumps(ev).encode()


def test_denied_record_carries_error_and_decision() -> None:
    info = AuditInfo(decision="statement 'DenyOthers' (Deny) matched")
    ev = kms_event(facts(), info, event_id="ev-2", error_code="AccessDeniedException", error_message="denied")
    check_record(ev)
    assert (ev["errorCode"], ev["errorMessage"]) == ("AccessDeniedException", "denied")
    assert ev["additionalEventData"]["policyDecision"] == "statement 'DenyOthers' (Deny) matched"


def test_unauthenticated_record_names_the_claimed_key_only() -> None:
    ev = kms_event(facts(None, access_key_id="AKIAUNKNOWN", operation=None), None, event_id="ev-3",
                   error_code="UnrecognizedClientException", error_message="invalid")
    check_record(ev)
    assert ev["userIdentity"] == {"type": "Unknown", "accountId": "111122223333", "accessKeyId": "AKIAUNKNOWN"}
    assert ev["eventName"] == "Unknown"
    assert ev["requestParameters"] is None


def test_principal_id_is_stable_and_iam_shaped() -> None:
    pid = principal_id(ALICE)
    assert pid == principal_id(ALICE)
    assert pid.startswith("AIDA")
    assert len(pid) == 21


def test_memory_sink_keeps_copies_and_discard_sink_keeps_nothing() -> None:
    record = kms_event(facts(), None, event_id="ev-4")
    memory = MemorySink()
    memory.append(record)
    record["eventName"] = "Changed"
    assert memory.events[0]["eventName"] == "Decrypt"
    discard = UnsafeDiscardSink()
    discard.append(record)
    discard.close()
    assert discard.discarded == 1
    assert not hasattr(discard, "events")
