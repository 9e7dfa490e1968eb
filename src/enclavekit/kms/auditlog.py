"""What the KMS HTTP layer needs from an audit sink, and the request facts an audit record is built from.

Every request, allowed or denied (authentication failures included), becomes one CloudTrail record built by
:func:`enclavekit.audit.events.kms_event` from the :class:`RequestFacts` below and the service's ``AuditInfo``.
The record goes to an :class:`AuditSink`; ``append`` returns once the record is durable (or raises), so the HTTP
layer acknowledges a request only after its record is on disk.  ``kms serve`` uses the audit trail
(:class:`enclavekit.audit.trail.Trail`: a group-committed spool, CloudTrail log files, signed chained digests).

:class:`MemorySink` keeps records in a list for tests; :class:`UnsafeDiscardSink` drops them and exists only to
measure what the audit path costs (``kms serve --unsafe-no-audit``).
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from enclavekit.kms.types import Principal

__all__ = [
    "AuditSink",
    "MemorySink",
    "RequestFacts",
    "UnsafeDiscardSink",
    "principal_id",
]


class AuditSink(Protocol):
    """Where records go.  ``append`` returns once the record is durable, or raises."""

    def append(self, event: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RequestFacts:
    """What the HTTP layer knows of a request, whether or not it authenticated."""

    request_id: str
    event_time: datetime
    operation: str | None
    region: str
    account_id: str
    source_ip: str
    user_agent: str
    principal: Principal | None = None
    access_key_id: str | None = None   # as claimed in the Authorization header when authentication failed


def principal_id(principal: Principal) -> str:
    """A stable IAM-style unique id (``AIDA`` + 17 base32 characters) derived from the principal's ARN."""
    digest = hashlib.sha256(principal.arn.encode()).digest()
    return "AIDA" + base64.b32encode(digest).decode()[:17]


class MemorySink:
    """Keeps records in a list; for tests and tools that need no durability."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def append(self, event: Mapping[str, Any]) -> None:
        with self._lock:
            self.events.append(dict(event))

    def close(self) -> None:
        return None


class UnsafeDiscardSink:
    """Drops every record: NO audit trail.  Only for measuring the audit path's cost (benchmarks/audit.py)."""

    def __init__(self) -> None:
        self.discarded = 0

    def append(self, event: Mapping[str, Any]) -> None:
        self.discarded += 1

    def close(self) -> None:
        return None
