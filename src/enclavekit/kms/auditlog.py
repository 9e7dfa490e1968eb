"""CloudTrail-format audit events for KMS calls and their append-only, hash-chained, fsync'd local log (spec §4.8).

Every request, allowed or denied (authentication failures included), becomes one event built by
:func:`cloudtrail_event`.  :class:`HashChainedLog` appends events to ``<data-dir>/audit/events.jsonl``, one JSON
object a line::

    {"seq": 7, "prevSha256": "<sha256 hex of line 6, without its newline>", "event": {...}}

The first line's ``prevSha256`` is 64 zeros.  :func:`verify_chain` re-reads the file and raises
:class:`AuditChainError` at the first line that breaks the chain.

Durability: :meth:`HashChainedLog.append` returns only after the event's line is written and ``fsync``'d, so the
HTTP layer acknowledges a request only once its event is on disk.  Group commit: one writer thread per process
takes every event queued while the previous ``fsync`` ran and writes them with a single ``write`` + ``fsync``.
Several ``kms serve`` processes may share one log: each batch is written under an exclusive ``flock`` and the
chain continues from whatever line is last in the file at that moment.

The writer is pluggable: the HTTP layer only needs an :class:`AuditSink` (``append(event)``, ``close()``); a
later trail writer (signed digests, object-store delivery) implements the same protocol.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from enclavekit.errors import FileOperationError, VerificationError
from enclavekit.kms.types import AuditInfo, Principal

__all__ = [
    "EVENT_VERSION",
    "GENESIS",
    "AuditSink",
    "AuditChainError",
    "ChainReport",
    "HashChainedLog",
    "MemorySink",
    "RequestFacts",
    "cloudtrail_event",
    "principal_id",
    "verify_chain",
]

EVENT_VERSION = "1.08"
GENESIS = "0" * 64
_TAIL_CHUNK = 64 * 1024
_MAX_LINE = 1 << 20


class AuditChainError(VerificationError):
    """The audit log's hash chain is broken (a line was changed, removed, reordered or is not JSON)."""

    def __init__(self, message: str, *, line: int, rule: str = "audit-chain") -> None:
        super().__init__(message, rule=rule, details={"line": str(line)})
        self.line = line


class AuditSink(Protocol):
    """Where events go.  ``append`` returns once the event is durable, or raises."""

    def append(self, event: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------- events


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


def _time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cloudtrail_event(facts: RequestFacts, audit: AuditInfo | None, *, error_code: str | None = None,
                     error_message: str | None = None, event_id: str | None = None) -> dict[str, Any]:
    """One CloudTrail ``AwsApiCall`` event (§4.8).  ``audit`` comes from the service; None before it was reached."""
    info = audit or AuditInfo()
    identity: dict[str, Any]
    if facts.principal is not None:
        p = facts.principal
        identity = {"type": "IAMUser", "principalId": principal_id(p), "arn": p.arn, "accountId": p.account_id,
                    "accessKeyId": p.access_key_id, "userName": p.name}
    else:
        # authentication failed: CloudTrail records what the caller claimed, nothing more
        identity = {"type": "Unknown", "accountId": facts.account_id}
        if facts.access_key_id:
            identity["accessKeyId"] = facts.access_key_id[:128]
    event: dict[str, Any] = {
        "eventVersion": EVENT_VERSION,
        "userIdentity": identity,
        "eventTime": _time(facts.event_time),
        "eventSource": "kms.amazonaws.com",
        "eventName": facts.operation or "Unknown",
        "awsRegion": facts.region,
        "sourceIPAddress": facts.source_ip,
        "userAgent": facts.user_agent[:1024],
    }
    if error_code is not None:
        event["errorCode"] = error_code
        event["errorMessage"] = (error_message or "")[:1024]
    event["requestParameters"] = info.request_parameters
    event["responseElements"] = info.response_elements
    additional: dict[str, Any] = {}
    if info.recipient is not None:
        r = info.recipient
        # §4.8: additionalEventData.recipient carries the module id, PCR0 and the document's PCRs
        additional["recipient"] = {
            "attestationDocumentModuleId": r.module_id,
            "attestationDocumentEnclaveImageDigest": r.image_sha384,
            "attestationDocumentEnclavePCRs": {str(i): v for i, v in sorted(r.pcrs.items())},
        }
    if info.decision:
        additional["policyDecision"] = info.decision
    if additional:
        event["additionalEventData"] = additional
    event.update({
        "requestID": facts.request_id,
        "eventID": event_id or str(uuid.uuid4()),
        "readOnly": info.read_only,
        "resources": list(info.resources),
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": facts.account_id,
        "eventCategory": "Management",
    })
    return event


# --------------------------------------------------------------------------------------------- sinks


class MemorySink:
    """Keeps events in a list; for tests and tools that need no durability."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def append(self, event: Mapping[str, Any]) -> None:
        with self._lock:
            self.events.append(dict(event))

    def close(self) -> None:
        return None


class _Pending:
    __slots__ = ("done", "error", "event")

    def __init__(self, event: Mapping[str, Any]) -> None:
        self.event = event
        self.done = False
        self.error: BaseException | None = None


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class HashChainedLog:
    """The append-only, hash-chained, fsync'd JSON-lines log with group commit (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise FileOperationError(f"cannot open the audit log {self.path}: {exc.strerror}") from exc
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._closed = False
        self._tail_offset = -1      # file size after our last write; -1 = unknown, re-read the tail
        self._tail_hash = GENESIS
        self._tail_seq = 0
        self.batches = 0            # number of write+fsync rounds (group commit: fewer than events)
        self.appended = 0
        with self._locked():
            self._repair_torn_tail()
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._writer.start()

    # -------------------------------------------------------------------------------- public

    def append(self, event: Mapping[str, Any]) -> None:
        pending = _Pending(event)
        with self._cond:
            if self._closed:
                raise RuntimeError("the audit log is closed")
            self._queue.append(pending)
            self._cond.notify_all()
            while not pending.done:
                self._cond.wait()
        if pending.error is not None:
            raise FileOperationError(f"cannot append to the audit log {self.path}: {pending.error}") \
                from pending.error

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        os.close(self._fd)

    def __enter__(self) -> HashChainedLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- writer

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue and self._closed:
                    return
                batch, self._queue = self._queue, []
            error: BaseException | None = None
            try:
                self._write_batch(batch)
            except (OSError, ValueError, TypeError) as exc:
                error = exc
            with self._cond:
                for pending in batch:
                    pending.error = error
                    pending.done = True
                self._cond.notify_all()

    def _locked(self) -> _FileLock:
        return _FileLock(self._fd)

    def _write_batch(self, batch: list[_Pending]) -> None:
        with self._locked():
            size = os.fstat(self._fd).st_size
            if size != self._tail_offset:
                # another process appended since our last write (or first write): continue from the file's tail,
                # dropping a torn line a killed writer may have left
                self._repair_torn_tail()
                size = os.fstat(self._fd).st_size
                self._tail_seq, self._tail_hash = _read_tail(self._fd, size)
            lines = []
            prev, seq = self._tail_hash, self._tail_seq
            for pending in batch:
                seq += 1
                line = json.dumps({"seq": seq, "prevSha256": prev, "event": pending.event},
                                  separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
                lines.append(line)
                prev = _line_hash(line)
            data = b"\n".join(lines) + b"\n"
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._tail_offset = size + len(data)
            self._tail_hash, self._tail_seq = prev, seq
        # fsync outside the lock: another process may append meanwhile; whichever fsync runs flushes every line
        # written before it, ours included, so each writer acknowledges only after its own fsync returns
        os.fsync(self._fd)
        self.batches += 1
        self.appended += len(batch)

    def _repair_torn_tail(self) -> None:
        """A crash during a write can leave a last line without its newline; it was never acknowledged: drop it."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        if os.pread(self._fd, 1, size - 1) == b"\n":
            return
        start = size
        while start > 0:
            step = min(_TAIL_CHUNK, start)
            chunk = os.pread(self._fd, step, start - step)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                start = start - step + idx + 1
                break
            start -= step
        os.ftruncate(self._fd, start)
        os.fsync(self._fd)


class _FileLock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def _read_tail(fd: int, size: int) -> tuple[int, str]:
    """(seq, sha256) of the last line of a file that ends with a newline, or (0, GENESIS) if it is empty."""
    if size == 0:
        return 0, GENESIS
    buf = b""
    pos = size - 1  # leave out the final newline
    line = b""
    while True:
        step = min(_TAIL_CHUNK, pos)
        if step == 0:
            line = buf
            break
        buf = os.pread(fd, step, pos - step) + buf
        pos -= step
        idx = buf.rfind(b"\n")
        if idx >= 0:
            line = buf[idx + 1:]
            break
        if len(buf) > _MAX_LINE:
            raise ValueError("the last line of the audit log is too long")
    record = json.loads(line)
    seq = record.get("seq") if isinstance(record, dict) else None
    if not isinstance(seq, int):
        raise ValueError("the last line of the audit log has no sequence number")
    return seq, _line_hash(line)


# --------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class ChainReport:
    events: int
    last_sha256: str


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from fh


def verify_chain(path: Path) -> ChainReport:
    """Check every line's ``prevSha256`` and ``seq``; raises :class:`AuditChainError` at the first break."""
    prev, seq = GENESIS, 0
    try:
        lines = _lines(Path(path))
        for number, raw in enumerate(lines, start=1):
            if not raw.endswith(b"\n"):
                raise AuditChainError(f"line {number} of the audit log is incomplete (no newline)", line=number,
                                      rule="audit-torn-line")
            line = raw[:-1]
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise AuditChainError(f"line {number} of the audit log is not JSON", line=number,
                                      rule="audit-json") from None
            if not isinstance(record, dict) or set(record) != {"seq", "prevSha256", "event"}:
                raise AuditChainError(f"line {number} is not a {{seq, prevSha256, event}} record", line=number,
                                      rule="audit-record")
            if record["seq"] != seq + 1:
                raise AuditChainError(f"line {number} has seq {record['seq']!r}, expected {seq + 1}", line=number,
                                      rule="audit-seq")
            if record["prevSha256"] != prev:
                raise AuditChainError(f"line {number} does not chain to line {number - 1}: prevSha256 is not the "
                                      "SHA-256 of the previous line", line=number, rule="audit-chain")
            if not isinstance(record["event"], dict):
                raise AuditChainError(f"line {number} carries no event object", line=number, rule="audit-record")
            prev, seq = _line_hash(line), seq + 1
    except OSError as exc:
        raise FileOperationError(f"cannot read the audit log {path}: {exc.strerror}") from exc
    return ChainReport(events=seq, last_sha256=prev)
