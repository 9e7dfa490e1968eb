"""The enclave-side NSM client: describe, extend, lock, attest, random.

The same code runs on real Nitro and inside enclavekit enclaves; only the transport differs, and both carry the
same CBOR bytes (spec nsm-attestation-kms §1.2):

* :class:`IoctlTransport`: the real ``/dev/nsm`` device and its single ioctl, ``NSM_IOCTL_RAW`` (§1.1);
* :class:`SocketTransport`: the emulated NSM's Unix socket (framing in :mod:`enclavekit.nsm.server`).

:meth:`NSMClient.open` picks one: ``ENCLAVEKIT_NSM_SOCKET`` if set (the enclavekit runtime sets it), else
``/dev/nsm`` if it exists, else :class:`~enclavekit.errors.NSMTransportError`.  Error responses raise
:class:`~enclavekit.errors.NSMError` carrying the wire code (``error_code``), as libnsm returns it.

Example::

    with NSMClient.open() as nsm:
        document = nsm.attestation(nonce=nonce, public_key=public_key_der)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from enclavekit.errors import NSMError, NSMTransportError
from enclavekit.formats import nsm_messages as msg
from enclavekit.formats.nsm_messages import NSMErrorCode
from enclavekit.nsm.server import FRAME_HEADER, read_exact, write_frame

__all__ = [
    "NSM_DEVICE",
    "NSM_IOCTL_RAW",
    "NSM_RAW",
    "SOCKET_ENV",
    "Transport",
    "IoctlFunction",
    "IoctlTransport",
    "SocketTransport",
    "NSMClient",
]

NSM_DEVICE = "/dev/nsm"
SOCKET_ENV = "ENCLAVEKIT_NSM_SOCKET"
# §1.1: _IOWR(0x0A, 0, struct nsm_raw) on 64-bit Linux: dir read|write, size 32, type 0x0A, nr 0
NSM_IOCTL_RAW = 0xC0200A00
# §1.1: struct nsm_raw = {u64 request.addr, u64 request.len, u64 response.addr, u64 response.len}, little-endian
NSM_RAW = struct.Struct("<QQQQ")

_R = TypeVar("_R")


class Transport(Protocol):
    """Carries one NSM request (CBOR bytes) and returns the response bytes."""

    def exchange(self, request: bytes) -> bytes: ...

    def close(self) -> None: ...


class IoctlFunction(Protocol):
    """The shape of :func:`fcntl.ioctl` used here: ``ioctl(fd, request, mutable_buffer, True)``."""

    def __call__(self, fd: int, request: int, arg: bytearray, mutate_flag: bool, /) -> Any: ...


def _fcntl_ioctl(fd: int, request: int, arg: bytearray, mutate_flag: bool, /) -> Any:
    return fcntl.ioctl(fd, request, arg, mutate_flag)


class IoctlTransport:
    """The ``/dev/nsm`` ioctl transport (§1.1, §1.2).

    ``ioctl`` is injectable so tests can run it against a fake descriptor; the default is :func:`fcntl.ioctl`.
    The response buffer is always 0x3000 bytes, as the Rust and C libraries pass (QEMU requires it).
    """

    def __init__(self, fd: int, *, ioctl: IoctlFunction = _fcntl_ioctl, close_fd: bool = False) -> None:
        self._fd = fd
        self._ioctl = ioctl
        self._close_fd = close_fd
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str] = NSM_DEVICE) -> IoctlTransport:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NSMTransportError(f"cannot open NSM device {os.fspath(path)}: {exc.strerror or exc}") from exc
        return cls(fd, close_fd=True)

    def exchange(self, request: bytes) -> bytes:
        # §1.2: ctypes buffers for the request and 0x3000 response bytes, struct nsm_raw with their addresses
        request_buf = ctypes.create_string_buffer(bytes(request), max(len(request), 1))
        response_buf = ctypes.create_string_buffer(msg.RESPONSE_MAX_SIZE)
        raw = bytearray(NSM_RAW.pack(ctypes.addressof(request_buf), len(request),
                                     ctypes.addressof(response_buf), msg.RESPONSE_MAX_SIZE))
        with self._lock:
            try:
                self._ioctl(self._fd, NSM_IOCTL_RAW, raw, True)
            except OSError as exc:
                # §1.1: the Rust driver maps EMSGSIZE to InputTooLarge and any other errno to InternalError
                if exc.errno == errno.EMSGSIZE:
                    raise NSMError(NSMErrorCode.INPUT_TOO_LARGE.value,
                                   f"NSM request of {len(request)} bytes is too large") from exc
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                raise NSMError(NSMErrorCode.INTERNAL_ERROR.value, f"NSM ioctl failed with {name}") from exc
        # §1.1: the kernel writes the number of response bytes back into response.len
        (_, _, _, length) = NSM_RAW.unpack(raw)
        if length > msg.RESPONSE_MAX_SIZE:
            raise NSMError(NSMErrorCode.INTERNAL_ERROR.value,
                           f"NSM device reported a {length}-byte response for a {msg.RESPONSE_MAX_SIZE}-byte buffer")
        return response_buf.raw[:length]

    def close(self) -> None:
        if self._close_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


class SocketTransport:
    """The emulated NSM's Unix socket (framing: :mod:`enclavekit.nsm.server`).

    Connects at construction; every failure (no socket, refused, timeout, closed mid-response) raises
    :class:`NSMTransportError`.  ``timeout`` bounds each connect, send and receive (seconds).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self._path = Path(path)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._connect()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            sock.connect(str(self._path))
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise NSMTransportError(f"cannot connect to the NSM socket {self._path}: {reason}") from exc
        self._sock = sock

    def _peer_closed(self, sock: socket.socket) -> bool:
        """True if the server closed the connection while it was idle (its idle timeout)."""
        # a socket with a timeout waits for readability before recv(): peek in non-blocking mode instead
        sock.settimeout(0.0)
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(self._timeout)

    def exchange(self, request: bytes) -> bytes:
        with self._lock:
            if self._sock is None or self._peer_closed(self._sock):
                self._drop()
                self._connect()
            sock = self._sock
            assert sock is not None
            try:
                write_frame(sock, bytes(request))
                header = read_exact(sock, FRAME_HEADER.size)
                if header is None:
                    raise NSMTransportError(f"the NSM socket {self._path} closed the connection")
                (length,) = FRAME_HEADER.unpack(header)
                if length > msg.RESPONSE_MAX_SIZE:
                    raise NSMTransportError(f"the NSM sent a {length}-byte response, the limit is "
                                            f"{msg.RESPONSE_MAX_SIZE}")
                body = read_exact(sock, length)
                if body is None:
                    raise NSMTransportError(f"the NSM socket {self._path} closed the connection mid-response")
                return body
            except NSMTransportError:
                self._drop()
                raise
            except TimeoutError as exc:
                self._drop()
                raise NSMTransportError(f"the NSM did not answer within {self._timeout} s") from exc
            except OSError as exc:
                self._drop()
                raise NSMTransportError(f"NSM socket {self._path} failed: {exc.strerror or exc}") from exc

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class NSMClient:
    """Talks to the NSM through ``transport``; every method sends one request."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @classmethod
    def open(cls, *, environ: Mapping[str, str] | None = None, device: str | os.PathLike[str] = NSM_DEVICE,
             timeout: float = 30.0) -> NSMClient:
        """The NSM of this enclave: ``$ENCLAVEKIT_NSM_SOCKET``, else ``/dev/nsm``, else NSMTransportError."""
        env = os.environ if environ is None else environ
        socket_path = env.get(SOCKET_ENV)
        if socket_path:
            return cls(SocketTransport(socket_path, timeout=timeout))
        if os.path.exists(device):
            return cls(IoctlTransport.open(device))
        raise NSMTransportError(
            f"no NSM available: {os.fspath(device)} does not exist and {SOCKET_ENV} is not set",
            hint="Run inside a Nitro or enclavekit enclave, or point ENCLAVEKIT_NSM_SOCKET at an NSM socket.",
        )

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> NSMClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- core

    def request(self, message: msg.Request) -> msg.Response:
        """Send ``message``; return the response, raising :class:`NSMError` for an Error response."""
        data = self._transport.exchange(message.to_bytes())
        try:
            response = msg.decode_response(data)
        except msg.NSMMessageError as exc:
            # §1.1: a response that does not decode is InternalError (nsm-api driver)
            raise NSMError(NSMErrorCode.INTERNAL_ERROR.value, f"the NSM response did not decode: {exc}") from exc
        if isinstance(response, msg.ErrorResponse):
            raise NSMError(response.error.value, f"NSM returned {response.error.value} for {message.VARIANT}")
        return response

    def _call(self, message: msg.Request, expected: type[_R]) -> _R:
        response = self.request(message)
        if not isinstance(response, expected):
            # §2.4: InvalidResponse is the client-side code for a response of the wrong variant
            raise NSMError(NSMErrorCode.INVALID_RESPONSE.value,
                           f"NSM answered {message.VARIANT} with {type(response).VARIANT}")
        return response

    # ---------------------------------------------------------------------------------------- requests

    def describe_nsm(self) -> msg.DescribeNSMResponse:
        return self._call(msg.DescribeNSMRequest(), msg.DescribeNSMResponse)

    def describe_pcr(self, index: int) -> msg.DescribePCRResponse:
        """The PCR's value (``.data``) and lock state (``.lock``)."""
        return self._call(msg.DescribePCRRequest(index), msg.DescribePCRResponse)

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; return the new value."""
        return self._call(msg.ExtendPCRRequest(index, bytes(data)), msg.ExtendPCRResponse).data

    def lock_pcr(self, index: int) -> None:
        self._call(msg.LockPCRRequest(index), msg.LockPCRResponse)

    def lock_pcrs(self, range_: int) -> None:
        """Lock PCRs ``[0, range_)``."""
        self._call(msg.LockPCRsRequest(range_), msg.LockPCRsResponse)

    def attestation(self, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes:
        """An attestation document (COSE_Sign1 bytes) binding the optional inputs (each at most 1024 bytes)."""
        request = msg.AttestationRequest(
            user_data=None if user_data is None else bytes(user_data),
            nonce=None if nonce is None else bytes(nonce),
            public_key=None if public_key is None else bytes(public_key),
        )
        return self._call(request, msg.AttestationResponse).document

    def get_random(self) -> bytes:
        """Random bytes from the NSM (256 from the emulator)."""
        return self._call(msg.GetRandomRequest(), msg.GetRandomResponse).random
