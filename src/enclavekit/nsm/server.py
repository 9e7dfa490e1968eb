"""Serve one emulated NSM over a Unix stream socket.

Inside an enclavekit enclave there is no ``/dev/nsm``; the runtime starts one :class:`NSMServer` per enclave and
points ``ENCLAVEKIT_NSM_SOCKET`` at it.  The bytes exchanged are the NSM API's CBOR messages, unchanged (spec
nsm-attestation-kms §1.2: keep the CBOR identical, make the transport pluggable).

Framing (both directions)::

    +-------------------------+------------------------------+
    | length: u32 big-endian  | length bytes of CBOR message |
    +-------------------------+------------------------------+

A client sends a request frame and reads one response frame; a connection carries any number of such exchanges,
one at a time.  Rules:

* a request over 4096 bytes (``NSM_REQUEST_MAX_SIZE``, §1.1) is answered ``{"Error":"InputTooLarge"}``: its body is
  read and discarded when it is at most :data:`MAX_DISCARD` bytes (1 MiB); above that the error is sent and the
  connection closed without reading the body;
* a body that does not decode as a request is answered like the NSM does (``InvalidOperation``);
* a frame cut short (end of stream inside the header or body) or an idle connection (``idle_timeout``) closes the
  connection;
* responses are at most 0x3000 bytes (``NSM_RESPONSE_MAX_SIZE``).

Every connection gets its own thread; the NSM itself processes one request at a time.  The socket file is created
with mode 0600 (put it in a private directory: the mode is applied right after ``bind``).  Only ``AF_UNIX`` is
used, never ``AF_VSOCK``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
from pathlib import Path
from types import TracebackType
from typing import Protocol

from enclavekit.errors import NSMTransportError
from enclavekit.formats import nsm_messages as msg

__all__ = ["NSMHandler", "NSMServer", "FRAME_HEADER", "MAX_DISCARD", "read_exact", "write_frame"]

_log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct(">I")
# Oversized request bodies up to this size are drained so the connection stays usable; larger ones close it.
MAX_DISCARD = 1 << 20
_CHUNK = 65536


class NSMHandler(Protocol):
    """Anything that answers NSM request bytes with response bytes (an :class:`~enclavekit.nsm.module.EmulatedNSM`)."""

    def handle(self, request: bytes) -> bytes: ...


def read_exact(sock: socket.socket, size: int) -> bytes | None:
    """Read exactly ``size`` bytes; None if the stream ends first."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), _CHUNK))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def write_frame(sock: socket.socket, payload: bytes) -> None:
    """Send one frame: u32 big-endian length, then the payload."""
    sock.sendall(FRAME_HEADER.pack(len(payload)) + payload)


_INPUT_TOO_LARGE = msg.ErrorResponse(msg.NSMErrorCode.INPUT_TOO_LARGE).to_bytes()
_INTERNAL_ERROR = msg.ErrorResponse(msg.NSMErrorCode.INTERNAL_ERROR).to_bytes()


def _discard(sock: socket.socket, size: int) -> bool:
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, _CHUNK))
        if not chunk:
            return False
        remaining -= len(chunk)
    return True


class NSMServer:
    """Serves ``nsm`` on the Unix socket ``path`` until :meth:`close`.

    Use as a context manager, or call :meth:`start` and :meth:`close`.  ``idle_timeout`` (seconds) closes
    connections that send nothing for that long (None: never).
    """

    def __init__(self, nsm: NSMHandler, path: str | os.PathLike[str], *, idle_timeout: float | None = 300.0,
                 backlog: int = 16) -> None:
        self._nsm = nsm
        self._path = Path(path)
        self._idle_timeout = idle_timeout
        self._backlog = backlog
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}

    @property
    def path(self) -> Path:
        return self._path

    def connection_count(self) -> int:
        """Connections currently being served."""
        with self._lock:
            return len(self._connections)

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("server already started")
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self._path))
            os.chmod(self._path, 0o600)
            listener.listen(self._backlog)
        except OSError as exc:
            listener.close()
            raise NSMTransportError(f"cannot listen on NSM socket {self._path}: {exc.strerror or exc}") from exc
        # a short accept timeout lets the accept loop notice close() promptly
        listener.settimeout(0.2)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nsm-accept", daemon=True)
        self._accept_thread.start()

    def close(self) -> None:
        """Stop accepting, close every connection, wait for the threads and remove the socket file."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
            self._accept_thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        with self._lock:
            connections = list(self._connections.items())
        for conn, _ in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in connections:
            thread.join()

    def __enter__(self) -> NSMServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _remove_stale_socket(self) -> None:
        try:
            mode = self._path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise NSMTransportError(f"{self._path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self._path))
        except OSError:
            self._path.unlink()  # nobody listens: a stale socket from an earlier run
            return
        finally:
            probe.close()
        raise NSMTransportError(f"another process already serves {self._path}")

    # ------------------------------------------------------------------------------------------ serving

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                _log.exception("accept failed on %s", self._path)
                continue
            conn.settimeout(self._idle_timeout)
            thread = threading.Thread(target=self._connection_thread, args=(conn,), name="nsm-conn", daemon=True)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._connections[conn] = thread
            thread.start()

    def _connection_thread(self, conn: socket.socket) -> None:
        try:
            self.serve_connection(conn)
        finally:
            conn.close()
            with self._lock:
                self._connections.pop(conn, None)

    def serve_connection(self, conn: socket.socket) -> None:
        """Answer frames on ``conn`` until the peer closes it, a frame is malformed, or the idle timeout hits."""
        try:
            while not self._stop.is_set():
                header = read_exact(conn, FRAME_HEADER.size)
                if header is None:
                    return  # peer closed (between frames or inside the header: either way we are done)
                (length,) = FRAME_HEADER.unpack(header)
                if length > msg.REQUEST_MAX_SIZE:
                    # §2.5: a request over 4096 bytes -> InputTooLarge; drain moderate bodies, close on huge ones
                    if length > MAX_DISCARD:
                        write_frame(conn, _INPUT_TOO_LARGE)
                        return
                    if not _discard(conn, length):
                        return
                    write_frame(conn, _INPUT_TOO_LARGE)
                    continue
                body = read_exact(conn, length)
                if body is None:
                    return  # truncated frame: close
                write_frame(conn, self._answer(body))
        except TimeoutError:
            _log.debug("closing idle NSM connection on %s", self._path)
        except OSError as exc:
            if not self._stop.is_set():
                _log.debug("NSM connection on %s failed: %s", self._path, exc)

    def _answer(self, body: bytes) -> bytes:
        try:
            response = self._nsm.handle(body)
        except Exception:  # a bug in the handler must not kill the connection thread silently
            _log.exception("NSM handler failed")
            return _INTERNAL_ERROR
        if len(response) > msg.RESPONSE_MAX_SIZE:
            return _INTERNAL_ERROR
        return response
