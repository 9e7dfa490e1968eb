"""The CLI ↔ supervisor control protocol, over each enclave's Unix socket ``<run>/<id>/control.sock``.

nitro-cli's own protocol (spec eif-pcr-cli §3.11) frames CBOR with a u64 length and sends each command twice; this
one is simpler and documented here (and in docs/runtime.md):

* A **frame** is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one object.
  Frames are at most 1 MiB; a longer length, a truncated frame or a payload that is not a JSON object is a
  protocol error (E08).
* The client sends one **request** frame ``{"v": 1, "op": OP, "args": {...}}`` where OP is one of
  ``ping``, ``describe``, ``terminate``, ``console``.
* The supervisor answers one **reply** frame: ``{"v": 1, "ok": true, "result": ...}`` or
  ``{"v": 1, "ok": false, "error": {"code": "E44", "message": "...", "details": {...}}}``.
* After an ``ok`` reply to ``console`` the connection carries the raw console bytes (no framing) until the
  enclave exits (EOF) or the client disconnects.
* Permissions (as nitro-cli's, §3.11): the enclave's owner uid and root may do everything; other users may only
  ``ping`` and ``describe``.  The peer's uid comes from ``SO_PEERCRED``; a refusal is E18.

The framing functions are pure (:func:`encode_frame`, :class:`FrameDecoder`); :func:`request` and
:class:`ControlServer` are the socket shells.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclavekit.errors import CATALOGUE, EnclaveKitError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_FRAME",
    "OPS",
    "OWNER_ONLY_OPS",
    "DEFAULT_TIMEOUT",
    "ControlError",
    "Request",
    "encode_frame",
    "FrameDecoder",
    "encode_request",
    "parse_request",
    "encode_reply",
    "parse_reply",
    "send_frame",
    "recv_frame",
    "connect",
    "request",
    "ControlServer",
]

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20
OPS = ("ping", "describe", "terminate", "console")
OWNER_ONLY_OPS = frozenset({"terminate", "console"})
# §3.11: nitro-cli waits 3000 ms for a reply (ENCLAVE_PROC_WAIT_TIMEOUT_MSEC); terminating takes longer here.
DEFAULT_TIMEOUT = 3.0
_HEADER = struct.Struct(">I")


class ControlError(EnclaveKitError):
    """A control connection broke the protocol, or could not be used (nitro-cli's UnusableConnection)."""

    code = "E08"


@dataclass(frozen=True)
class Request:
    op: str
    args: dict[str, Any]


# ---------------------------------------------------------------- pure framing

def encode_frame(obj: dict[str, Any]) -> bytes:
    """One frame: 4-byte big-endian length + compact JSON."""
    if not isinstance(obj, dict):
        raise TypeError("a frame holds one JSON object")
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes is larger than {MAX_FRAME}")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes, get the complete frames' objects."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        out: list[dict[str, Any]] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise ControlError(f"control frame announces {length} bytes; at most {MAX_FRAME} are allowed")
            if len(self._buffer) < _HEADER.size + length:
                break
            payload = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
            del self._buffer[:_HEADER.size + length]
            out.append(_decode_payload(payload))
        return out


def _decode_payload(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError("control frame is not UTF-8 JSON") from exc
    if not isinstance(obj, dict):
        raise ControlError(f"control frame holds a JSON {type(obj).__name__}, expected an object")
    return obj


def encode_request(op: str, **args: Any) -> bytes:
    if op not in OPS:
        raise ValueError(f"unknown control operation {op!r}")
    return encode_frame({"v": PROTOCOL_VERSION, "op": op, "args": args})


def parse_request(obj: dict[str, Any]) -> Request:
    if obj.get("v") != PROTOCOL_VERSION:
        raise ControlError(f"control request has version {obj.get('v')!r}, expected {PROTOCOL_VERSION}")
    op, args = obj.get("op"), obj.get("args", {})
    if op not in OPS:
        raise EnclaveKitError(f"unknown control operation {str(op)[:40]!r}", code="E14")
    if not isinstance(args, dict):
        raise ControlError("control request args must be an object")
    return Request(op=str(op), args=args)


def encode_reply(result: Any = None, *, error: EnclaveKitError | None = None) -> bytes:
    if error is not None:
        return encode_frame({"v": PROTOCOL_VERSION, "ok": False,
                             "error": {"code": error.code, "message": error.message, "details": error.details}})
    return encode_frame({"v": PROTOCOL_VERSION, "ok": True, "result": result})


def parse_reply(obj: dict[str, Any]) -> Any:
    """The result of a reply; an error reply is raised as an :class:`EnclaveKitError` with its code."""
    if obj.get("v") != PROTOCOL_VERSION or not isinstance(obj.get("ok"), bool):
        raise ControlError("control reply is not a version-1 reply")
    if obj["ok"]:
        return obj.get("result")
    err = obj.get("error")
    if not isinstance(err, dict):
        raise ControlError("control error reply lacks its error object")
    code = err.get("code")
    message = err.get("message")
    details = err.get("details") or {}
    if not isinstance(code, str) or code not in CATALOGUE:
        code = "E38"
    if not isinstance(details, dict):
        details = {}
    raise EnclaveKitError(str(message)[:4000], code=code,
                          details={str(k): str(v) for k, v in details.items()})


# ---------------------------------------------------------------- socket shell

def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(encode_frame(obj))


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            if remaining == size:
                return None
            raise ControlError(f"control connection closed inside a frame ({size - remaining}/{size} bytes)")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame's object, or None at a clean EOF between frames."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ControlError(f"control frame announces {length} bytes; at most {MAX_FRAME} are allowed")
    payload = _recv_exact(sock, length) if length else b""
    if payload is None:
        raise ControlError("control connection closed after a frame header")
    return _decode_payload(payload)


def connect(path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """Connect to a supervisor's control socket: E40 if the socket is missing, E39 if nobody answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError as exc:
        sock.close()
        raise EnclaveKitError(f"the enclave's control socket {path} does not exist", code="E40") from exc
    except OSError as exc:
        sock.close()
        raise EnclaveKitError(f"cannot reach the enclave supervisor at {path}: {exc.strerror or exc}",
                              code="E39") from exc
    return sock


def request(path: Path, op: str, *, timeout: float = DEFAULT_TIMEOUT, **args: Any) -> Any:
    """Send one request to the supervisor at ``path`` and return its result (errors are raised)."""
    sock = connect(path, timeout=timeout)
    with sock:
        try:
            sock.sendall(encode_request(op, **args))
            reply = recv_frame(sock)
        except TimeoutError as exc:
            raise EnclaveKitError(f"the enclave supervisor at {path} did not answer within {timeout:g} s",
                                  code="E38") from exc
        except OSError as exc:
            raise EnclaveKitError(f"control connection to {path} failed: {exc.strerror or exc}",
                                  code="E39") from exc
    if reply is None:
        raise EnclaveKitError(f"the enclave supervisor at {path} closed the connection without a reply",
                              code="E38")
    return parse_reply(reply)


# Handler: (request, peer uid, connected socket) -> result.  A handler that takes over the socket (console)
# returns the sentinel ``ControlServer.DETACHED`` after sending its own ok reply.
Handler = Callable[[Request, int, socket.socket], Any]


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """Serves ``handler`` on the Unix socket ``path``, one thread per connection, until :meth:`close`."""

    DETACHED = object()

    def __init__(self, path: Path, handler: Handler, *, owner_uid: int, mode: int = 0o666) -> None:
        self.path = Path(path)
        self._handler = handler
        self._owner_uid = owner_uid
        self._mode = mode
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        # everyone may connect (describe is open to all, §3.11); the handler enforces the owner-only operations
        self.path.chmod(self._mode)
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        detached = False
        try:
            conn.settimeout(DEFAULT_TIMEOUT)
            try:
                obj = recv_frame(conn)
                if obj is None:
                    return
                req = parse_request(obj)
                uid = _peer_uid(conn)
                if req.op in OWNER_ONLY_OPS and uid not in (0, self._owner_uid):
                    raise EnclaveKitError(f"uid {uid} may not {req.op} an enclave owned by uid {self._owner_uid}",
                                          code="E18")
                conn.settimeout(None)
                result = self._handler(req, uid, conn)
            except EnclaveKitError as exc:
                conn.sendall(encode_reply(error=exc))
                return
            if result is ControlServer.DETACHED:
                detached = True
                return
            conn.sendall(encode_reply(result))
        except OSError:
            return
        finally:
            if not detached:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
