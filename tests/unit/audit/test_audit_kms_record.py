"""The KMS HTTP pipeline's audit record (issue 6 items 16-17): eventTime is the completion time (spec §1.2) and
an over-size request becomes a capped record, never a 500."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from enclavekit.kms.auditlog import MemorySink
from enclavekit.kms.http import KMSApp
from enclavekit.kms.sigv4 import sign_request_headers
from enclavekit.kms.types import AuditInfo, KMSRequest, KMSResult, Principal

START = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
AKID = "AKIAEXAMPLEKEY000001"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ALICE = Principal(AKID, "arn:aws:iam::111122223333:user/alice", "111122223333", "alice")


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


class SlowService:
    """A CreateKey that takes 7 seconds (the clock moves while the service works) and echoes its input."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def handle(self, request: KMSRequest) -> KMSResult:
        self.clock.now += timedelta(seconds=7)
        return KMSResult({"KeyMetadata": {"KeyId": "k"}},
                         AuditInfo(request_parameters={"description": request.params.get("Description")},
                                   response_elements={"keyMetadata": {"keyId": "k"}}))


def _call(app: KMSApp, body: dict[str, Any]) -> int:
    data = json.dumps(body).encode()
    headers = {"Host": "127.0.0.1:4566", "Content-Type": "application/x-amz-json-1.1",
               "X-Amz-Target": "TrentService.CreateKey"}
    headers = sign_request_headers(url="http://127.0.0.1:4566/", body=data, headers=headers, access_key_id=AKID,
                                   secret=SECRET, region="us-east-1", now=START)
    return app.handle(method="POST", path="/", headers=list(headers.items()), body=data).status


def _app(sink: MemorySink) -> KMSApp:
    clock = Clock()
    return KMSApp(SlowService(clock), lambda akid: (ALICE, SECRET) if akid == AKID else None, sink,
                  region="us-east-1", account_id="111122223333", clock=clock)


def test_event_time_is_the_completion_time() -> None:
    sink = MemorySink()
    assert _call(_app(sink), {"Description": "d"}) == 200
    (record,) = sink.events
    assert record["eventTime"] == "2026-03-01T12:00:07Z"


def test_huge_request_parameters_are_capped_not_a_500() -> None:
    sink = MemorySink()
    assert _call(_app(sink), {"Description": "x" * (200 * 1024)}) == 200
    (record,) = sink.events
    assert record["requestParameters"]["omitted"] is True
    assert record["responseElements"] == {"keyMetadata": {"keyId": "k"}}
