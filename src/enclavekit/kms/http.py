"""The KMS HTTP shell: AWS JSON 1.1 protocol over HTTP/1.1 with keep-alive (spec §4.1, §4.7).

Two layers:

* :class:`KMSApp` is the request pipeline without sockets: method and path, body size, SigV4, ``X-Amz-Target``,
  JSON body, ``service.handle(KMSRequest)``, the audit record (CloudTrail format, built by
  :func:`enclavekit.audit.events.kms_event`; durable before the response is returned), and the AWS-shaped
  response.  Unit tests drive it directly.
* :class:`KMSHTTPServer` is a threaded HTTP/1.1 server around it: keep-alive, optional TLS (handshake in the
  connection's thread), each connection served by one thread of a bounded pool, so the service and the store only
  ever see a fixed set of threads.  Several processes may serve one listening socket (pre-fork).

Wire rules (§4.1): ``POST /``, ``X-Amz-Target: TrentService.<Operation>``, ``Content-Type:
application/x-amz-json-1.1``; success is 200 with a JSON body; every response carries ``x-amzn-RequestId``;
errors are ``{"__type": "<ExceptionName>", "message": "..."}`` with AWS's status.  Bad input never stops the
server and never reaches the log in clear: messages name what was wrong, not the bytes that were sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from enclavekit.audit.events import kms_event
from enclavekit.kms.auditlog import AuditSink, RequestFacts
from enclavekit.kms.sigv4 import MAX_SKEW, PrincipalLookup, verify_request
from enclavekit.kms.types import AuditInfo, KMSError, KMSRequest, KMSResult, Principal

__all__ = [
    "CONTENT_TYPE",
    "MAX_BODY",
    "HTTPResponse",
    "KMSApp",
    "KMSHTTPServer",
    "KMSServiceLike",
    "error_body",
]

CONTENT_TYPE = "application/x-amz-json-1.1"
# largest legal request: a 262144-byte attestation document plus a 6144-byte blob, base64'd, fits well inside
MAX_BODY = 1 << 20
_ACCEPTED_TYPES = {"application/x-amz-json-1.1", "application/x-amz-json-1.0", "application/json"}
_TARGET_RE = re.compile(r"TrentService\.([A-Za-z0-9]{1,64})")
_CREDENTIAL_RE = re.compile(r"Credential=([A-Za-z0-9]{1,128})/")
# pre-fork balance: a worker already holding N connections waits N x this before accepting (capped), so an idle
# worker, woken by the same readiness event, takes the connection first
_ACCEPT_DELAY_S = 0.002
_ACCEPT_DELAY_CAP = 10

log = logging.getLogger("enclavekit.kms")


class KMSServiceLike(Protocol):
    def handle(self, request: KMSRequest) -> KMSResult: ...


@dataclass(frozen=True)
class HTTPResponse:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


def error_body(aws_code: str, message: str) -> bytes:
    """§4.1: ``{"__type": name, "message": msg}``."""
    return json.dumps({"__type": aws_code, "message": message}).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate member '{key[:64]}'")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        text = body.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise KMSError("SerializationException", "the request body is not UTF-8") from None
    except RecursionError:
        raise KMSError("SerializationException", "the request body nests too deeply") from None
    except ValueError as exc:
        raise KMSError("SerializationException", f"the request body is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise KMSError("SerializationException", "the request body must be a JSON object")
    return value


class KMSApp:
    """The request pipeline (see the module doc).  Thread-safe if the service, lookup and audit sink are."""

    def __init__(self, service: KMSServiceLike, lookup: PrincipalLookup, audit: AuditSink, *, region: str,
                 account_id: str, clock: Callable[[], datetime] | None = None,
                 request_ids: Callable[[], str] | None = None, event_ids: Callable[[], str] | None = None,
                 max_skew: timedelta = MAX_SKEW, require_signed_target: bool = False) -> None:
        self.service = service
        self.lookup = lookup
        self.audit = audit
        self.region = region
        self.account_id = account_id
        self.clock = clock or (lambda: datetime.now(UTC))
        self.request_ids = request_ids or (lambda: str(uuid.uuid4()))
        self.event_ids = event_ids or (lambda: str(uuid.uuid4()))
        self.max_skew = max_skew
        self.require_signed_target = require_signed_target
        self._inflight = 0
        self._idle = threading.Condition()

    # ------------------------------------------------------------------------------------ pipeline

    def handle(self, *, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes,
               source_ip: str = "127.0.0.1", body_too_large: bool = False) -> HTTPResponse:
        """One request in, one response out; never raises for anything the client sent."""
        with self._idle:
            self._inflight += 1
        try:
            return self._handle(method, path, list(headers), body, source_ip=source_ip,
                                body_too_large=body_too_large)
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in progress (clean shutdown); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def _handle(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, *, source_ip: str,
                body_too_large: bool) -> HTTPResponse:
        request_id = self.request_ids()
        now = self.clock()
        lower = {name.lower(): value for name, value in headers}
        target = lower.get("x-amz-target", "")
        match = _TARGET_RE.fullmatch(target.strip())
        operation = match.group(1) if match else None
        claimed = _CREDENTIAL_RE.search(lower.get("authorization", ""))
        facts = RequestFacts(request_id=request_id, event_time=now, operation=operation, region=self.region,
                             account_id=self.account_id, source_ip=source_ip,
                             user_agent=lower.get("user-agent", ""),
                             access_key_id=claimed.group(1) if claimed else None)
        principal: Principal | None = None
        try:
            # §4.1: POST / only
            if method != "POST" or path.split("?", 1)[0] != "/":
                raise KMSError("UnknownOperationException", "KMS accepts POST / only", status=404 if
                               method == "POST" else 405)
            if body_too_large:
                raise KMSError("ValidationException", f"the request body is larger than {MAX_BODY} bytes",
                               status=413)
            principal = verify_request(method=method, path=path, headers=headers, body=body, lookup=self.lookup,
                                       now=now, region=self.region, max_skew=self.max_skew,
                                       require_signed_target=self.require_signed_target)
            facts = replace(facts, principal=principal)
            if operation is None:
                raise KMSError("UnknownOperationException", "X-Amz-Target must be TrentService.<Operation>")
            content_type = lower.get("content-type", "").split(";", 1)[0].strip().lower()
            if content_type not in _ACCEPTED_TYPES:
                raise KMSError("SerializationException", f"Content-Type must be {CONTENT_TYPE}")
            params = _parse_body(body)
            result = self.service.handle(KMSRequest(operation=operation, params=params, principal=principal,
                                                    request_id=request_id, now=now, source_ip=source_ip,
                                                    user_agent=facts.user_agent))
            response = json.dumps(result.response, separators=(",", ":")).encode()
            audit_info: AuditInfo = result.audit
            error: KMSError | None = None
        except KMSError as exc:
            error = exc
            audit_info = exc.audit
        except Exception as exc:  # a bug in the service: answer like AWS's fault, log no request data
            log.error("request %s: internal error %s", request_id, type(exc).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            error = KMSError("KMSInternalException", f"An internal error occurred. Request ID: {request_id}",
                             status=500)
            audit_info = AuditInfo()
        # §4.8: every request, allowed or denied, leaves a record; the response waits until it is durable.
        # cloudtrail §1.2: eventTime is the request's completion time (the clock is read again, after the service
        # answered).  kms_event applies the §1.1 size caps, so a huge request never makes the record fail.
        # Residual window (docs/audit.md): the service commits a mutating operation (CreateKey, PutKeyPolicy,
        # ScheduleKeyDeletion ...) before this append; if the append then fails, the client gets a 500 and retries,
        # but the committed change has no record.  The spool append only fails when the state disk fails (full,
        # read-only, I/O error); no intent record is written before executing (a deliberate choice: it would
        # double the fsyncs of every mutating call and CloudTrail has no such record to mirror).
        facts = replace(facts, event_time=self.clock())
        event = kms_event(facts, audit_info, event_id=self.event_ids(),
                          error_code=error.aws_code if error else None,
                          error_message=error.aws_message if error else None)
        try:
            self.audit.append(event)
        except Exception as exc:
            log.error("request %s: the audit event could not be written (%s); answering 500%s", request_id,
                      type(exc).__name__, "; a mutating operation committed WITHOUT an audit record"
                      if error is None and not audit_info.read_only else "")
            error = KMSError("KMSInternalException", f"An internal error occurred. Request ID: {request_id}",
                             status=500)
        base = [("Content-Type", CONTENT_TYPE), ("x-amzn-RequestId", request_id)]
        if error is not None:
            return HTTPResponse(status=error.status, body=error_body(error.aws_code, error.aws_message),
                                headers=base, close=body_too_large)
        return HTTPResponse(status=200, body=response, headers=base)


# --------------------------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "enclavekit-kms"
    sys_version = ""
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    disable_nagle_algorithm = True
    server: KMSHTTPServer
    busy = False

    def setup(self) -> None:
        super().setup()
        self.server.track(self, add=True)
        if self.server.stopping:  # accepted just before shutdown, registered after the idle scan
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.server.track(self, add=False)
        super().finish()

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        self.busy = True
        try:
            self._dispatch_busy(method)
        finally:
            self.busy = False
            if self.server.stopping:
                self.close_connection = True

    def _dispatch_busy(self, method: str) -> None:
        app = self.server.app
        raw_length = self.headers.get("Content-Length")
        too_large = False
        body = b""
        if raw_length is None:
            if self.headers.get("Transfer-Encoding"):
                self._send(HTTPResponse(411, error_body("ValidationException", "Content-Length is required"),
                                        [("Content-Type", CONTENT_TYPE)], close=True))
                return
        else:
            try:
                length = int(raw_length)
                if length < 0:
                    raise ValueError
            except ValueError:
                self._send(HTTPResponse(400, error_body("SerializationException", "Content-Length is not valid"),
                                        [("Content-Type", CONTENT_TYPE)], close=True))
                return
            if length > MAX_BODY:
                too_large = True
            else:
                body = self.rfile.read(length)
                if len(body) != length:
                    self.close_connection = True
                    return
        self._send(app.handle(method=method, path=self.path, headers=self.headers.items(), body=body,
                              source_ip=self.client_address[0] if self.client_address else "",
                              body_too_large=too_large))

    def _send(self, response: HTTPResponse) -> None:
        lines = [f"HTTP/1.1 {response.status} {self.responses.get(response.status, ('',))[0]}"]
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        lines.append(f"Content-Length: {len(response.body)}")
        lines.append(f"Date: {self.date_time_string()}")
        if response.close:
            lines.append("Connection: close")
            self.close_connection = True
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + response.body)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        # no access log by default: request lines carry nothing useful and the audit log records every call
        return None


class KMSHTTPServer(ThreadingHTTPServer):
    """HTTP/1.1 server for a :class:`KMSApp` on a bounded pool of connection threads.

    ``sock`` is an already bound, listening socket (pre-fork workers share one).  Each accepted connection is
    served, keep-alive requests and all, by one thread of a pool of ``max_connections`` threads, so the service
    and the store only ever see that fixed set of threads (connections beyond it wait for a free thread).
    ``ssl_context`` enables TLS; the handshake runs in the connection's pool thread, never in the accept loop.

    ``balance_accept`` (pre-fork, several workers on one socket): clients keep their connections alive, so
    whichever worker accepts a connection serves all its requests.  Every worker is woken for each new
    connection; without balancing the first one awake tends to take them all (three keep-alive clients measured
    3 : 0 on two workers, leaving one core idle).  With it, a worker that already holds connections waits a few
    milliseconds per held connection before its accept, so the least loaded worker wins the race; the loser's
    non-blocking accept finds nothing and it goes back to waiting.  Only connection set-up is delayed.
    """

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, app: KMSApp, sock: socket.socket, *, ssl_context: ssl.SSLContext | None = None,
                 max_connections: int = 64, balance_accept: bool = False) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.app = app
        self.ssl_context = ssl_context
        self.stopping = False
        self.balance_accept = balance_accept
        self.pool = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="kms-conn")
        self._handlers: set[_Handler] = set()
        self._handlers_lock = threading.Lock()
        self._held = 0  # accepted connections not yet closed

    def get_request(self) -> tuple[socket.socket, Any]:
        if self.balance_accept:
            with self._handlers_lock:
                held = self._held
            if held:
                time.sleep(min(held, _ACCEPT_DELAY_CAP) * _ACCEPT_DELAY_S)
        # the socket is non-blocking: if another worker took the connection meanwhile this raises
        # BlockingIOError, which socketserver treats as "nothing to accept"
        accepted: tuple[socket.socket, Any] = self.socket.accept()
        with self._handlers_lock:  # counted at once, not when its thread starts: a burst must see it
            self._held += 1
        return accepted

    def shutdown_request(self, request: Any) -> None:
        with self._handlers_lock:
            self._held -= 1
        super().shutdown_request(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.pool.submit(self.process_request_thread, request, client_address)

    def track(self, handler: _Handler, *, add: bool) -> None:
        with self._handlers_lock:
            if add:
                self._handlers.add(handler)
            else:
                self._handlers.discard(handler)

    def server_close(self) -> None:
        """After ``shutdown()``: idle keep-alive connections are closed, busy ones after their response."""
        self.stopping = True
        with self._handlers_lock:
            idle = [h for h in self._handlers if not h.busy]
        for handler in idle:
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request.settimeout(30)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError):
                with contextlib.suppress(OSError):
                    request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a connection died or a client sent garbage: the server goes on, no traceback with request data
        log.debug("connection error from %s", client_address, exc_info=True)
