"""vsock transports: the Unix-socket emulation used under enclavekit, and real ``AF_VSOCK`` for real Nitro.

Emulation layout (the "vsock root" ``R``; one channel directory per CID)::

    R/3/<port>.sock        the parent's listener on vsock port <port>: enclaves reach it at (3, <port>)
    R/<cid>/<port>.sock    the listener of the enclave <cid> on <port>: the parent reaches it at (<cid>, <port>)

A vsock address maps to exactly one path, ``R/<cid>/<port>.sock``.  The parent directory ``R/3`` is shared by every
enclave, as the parent's listeners are on real Nitro; an enclave's own directory ``R/<cid>`` is reachable only by
the parent.  A sandbox therefore needs exactly two directories of the host: ``R/3`` and its own ``R/<cid>``.
The seccomp translation of unmodified applications (spec unmodified-apps §3.2) uses the same mapping: ``connect``
to ``(3, p)`` → ``R/3/p.sock`` (only CID 3 is allowed from an enclave; anything else is a refusal, as vsock's
``ECONNRESET``), ``bind(VMADDR_CID_ANY or own CID, p)`` → ``R/<own cid>/p.sock``; ``getsockname`` reports
``(own cid, port from OK)``, ``accept``/``getpeername`` report ``(3, port assigned in OK)``.  The supervisor does
the handshake below on the target's behalf (it holds the same open file description through ``pidfd_getfd``).

Every emulated connection starts with Firecracker's handshake (:mod:`enclavekit.vsock.protocol`): the connector
sends ``CONNECT <port>\\n``, the acceptor checks the port and answers ``OK <peer port>\\n``.  Handshake lines are
read with ``MSG_PEEK`` so that no application byte is consumed.  After the handshake the channel is a plain
``AF_UNIX`` stream socket: byte-exact, ordered, with half-close (``shutdown(SHUT_WR)``).

The accepting side of the parent does not learn which enclave connected (Firecracker's line carries only the
port): such peers are reported with CID ``VMADDR_CID_ANY``.  An enclave's peer is always the parent (CID 3).

:class:`AFVsockTransport` opens real ``AF_VSOCK`` sockets through an injected ``socket_factory``: it is meant for
real Nitro only, and tests drive it with a fake factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import select
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from enclavekit.errors import (
    TransportError,
    VsockConnectionRefused,
    VsockHandshakeError,
    VsockTimeout,
)
from enclavekit.vsock.address import (
    VMADDR_CID_ANY,
    VMADDR_CID_PARENT,
    VMADDR_PORT_ANY,
    VsockAddress,
    check_cid,
    check_port,
)
from enclavekit.vsock.protocol import (
    MAX_LINE_LENGTH,
    AcceptorHandshake,
    ConnectorHandshake,
    run_acceptor,
    run_connector,
)

__all__ = [
    "AF_VSOCK",
    "DEFAULT_CONNECT_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "EPHEMERAL_PORT_START",
    "SocketFactory",
    "VsockConnection",
    "VsockListener",
    "AsyncVsockListener",
    "VsockTransport",
    "UnixVsockTransport",
    "AFVsockTransport",
    "socket_path",
]

# Linux's address family number for vsock; Python exposes it as socket.AF_VSOCK on Linux.
AF_VSOCK: int = getattr(socket, "AF_VSOCK", 40)
DEFAULT_CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 5.0
EPHEMERAL_PORT_START = 49152
# sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107
_ACCEPT_POLL = 0.25

SocketFactory = Callable[..., Any]


def socket_path(root: Path, address: VsockAddress) -> Path:
    """Where the listener of ``address`` lives under the vsock root ``root``: ``root/<cid>/<port>.sock``."""
    return Path(root) / str(address.cid) / f"{address.port}.sock"


class VsockConnection:
    """An established vsock stream: the socket plus the local and peer vsock addresses.

    ``socket`` is a plain stream socket (``AF_UNIX`` under the emulation, ``AF_VSOCK`` on Nitro), in blocking mode.
    """

    def __init__(self, sock: socket.socket, local: VsockAddress, peer: VsockAddress) -> None:
        self.socket = sock
        self.local = local
        self.peer = peer

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self.socket.sendall(data)

    def recv(self, bufsize: int) -> bytes:
        return self.socket.recv(bufsize)

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        return self.socket.recv_into(buffer, nbytes)

    def shutdown(self, how: int) -> None:
        self.socket.shutdown(how)

    def settimeout(self, value: float | None) -> None:
        self.socket.settimeout(value)

    def fileno(self) -> int:
        return self.socket.fileno()

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> VsockConnection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VsockConnection(local={self.local}, peer={self.peer})"


class VsockListener(Protocol):
    address: VsockAddress

    def accept(self, timeout: float | None = None) -> tuple[VsockConnection, VsockAddress]: ...

    def close(self) -> None: ...

    def fileno(self) -> int: ...


class AsyncVsockListener(Protocol):
    address: VsockAddress

    async def accept(self, timeout: float | None = None
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, VsockAddress]: ...

    async def close(self) -> None: ...


class VsockTransport(Protocol):
    """What the SDK and vsock-proxy need: connect and listen, blocking and asyncio."""

    def connect(self, cid: int, port: int, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> VsockConnection: ...

    def listen(self, port: int, backlog: int = 128) -> VsockListener: ...

    async def open_connection(self, cid: int, port: int, timeout: float = DEFAULT_CONNECT_TIMEOUT
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, VsockAddress]: ...

    async def start_listener(self, port: int, backlog: int = 128) -> AsyncVsockListener: ...


# ---------------------------------------------------------------------------------------------- emulation


class _PeekLineStream:
    """A socket seen as a ByteStream that never reads past the first newline (MSG_PEEK, then consume)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv(self, bufsize: int, /) -> bytes:
        data = self._sock.recv(bufsize, socket.MSG_PEEK)
        if not data:
            return b""
        end = data.find(b"\n")
        take = end + 1 if end >= 0 else len(data)
        return self._sock.recv(take)

    def sendall(self, data: bytes, /) -> None:
        self._sock.sendall(data)


def _ports(start: int) -> Iterator[int]:
    for n in itertools.count():
        yield EPHEMERAL_PORT_START + (start - EPHEMERAL_PORT_START + n) % (VMADDR_PORT_ANY - EPHEMERAL_PORT_START)


def _check_path(path: Path) -> str:
    text = os.fsdecode(path)
    if len(os.fsencode(text)) > _MAX_UNIX_PATH:
        raise TransportError(f"vsock channel path is longer than {_MAX_UNIX_PATH} bytes: {text}",
                             hint="use a shorter vsock directory (ENCLAVEKIT_VSOCK_DIR / --vsock-dir)")
    return text


def _untrusted_target(address: VsockAddress) -> bool:
    """An enclave's channel directory is writable by that enclave: the parent must not follow what it puts there."""
    return address.cid != VMADDR_CID_PARENT


@contextlib.contextmanager
def _pinned(path: str, address: VsockAddress) -> Iterator[str]:
    """A path to connect to that names exactly the socket inode at ``path``, never a symlink's target.

    For an enclave's directory (:func:`_untrusted_target`) the socket file is opened ``O_PATH | O_NOFOLLOW`` and
    the connection goes through ``/proc/self/fd/N``: a symlink or a swap after the check cannot redirect the
    parent to another socket of the host.
    """
    if not _untrusted_target(address):
        yield path
        return
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)  # O_PATH|O_NOFOLLOW opens a symlink itself
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISSOCK(mode):
            what = "a symlink" if stat.S_ISLNK(mode) else "not a socket"
            raise VsockConnectionRefused(f"connection to vsock {address} refused: its channel is {what}")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


class UnixVsockTransport:
    """The emulation: vsock addresses are Unix sockets under ``root`` (see the module docstring for the layout).

    ``local_cid`` is this side's CID: 3 for the parent, the enclave's CID inside an enclave.  An enclave may only
    connect to the parent (CID 3), as on Nitro.
    """

    def __init__(self, root: str | os.PathLike[str], local_cid: int = VMADDR_CID_PARENT,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.root = Path(root)
        self.local_cid = check_cid(local_cid)
        if self.local_cid == VMADDR_CID_ANY:
            raise ValueError("local_cid must be a concrete CID, not VMADDR_CID_ANY")
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        self.handshake_timeout = handshake_timeout

    @property
    def is_enclave(self) -> bool:
        return self.local_cid != VMADDR_CID_PARENT

    def path_of(self, address: VsockAddress) -> Path:
        return socket_path(self.root, address)

    def _target(self, cid: int, port: int) -> tuple[VsockAddress, str]:
        address = VsockAddress(check_cid(cid), check_port(port))
        if self.is_enclave and address.cid != VMADDR_CID_PARENT:
            # unmodified-apps §3.2 step 4: only CID 3 is reachable from an enclave; vsock reports a reset.
            raise VsockConnectionRefused(f"connection to vsock {address} refused: an enclave reaches only the "
                                         f"parent (CID {VMADDR_CID_PARENT})")
        return address, _check_path(self.path_of(address))

    def _peer_of_accepted(self, peer_port: int) -> VsockAddress:
        return VsockAddress(VMADDR_CID_PARENT if self.is_enclave else VMADDR_CID_ANY, peer_port)

    # ---- blocking

    def connect(self, cid: int, port: int, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> VsockConnection:
        """Connect to ``(cid, port)``; :class:`VsockConnectionRefused` at once when nobody listens."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        address, path = self._target(cid, port)
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            with _pinned(path, address) as target:
                sock.connect(target)
            sock.settimeout(_remaining(deadline))
            result = run_connector(_PeekLineStream(sock), address.port)
            sock.settimeout(None)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError) as exc:
            sock.close()
            raise VsockConnectionRefused(f"connection to vsock {address} refused: nobody listens") from exc
        except TimeoutError as exc:
            sock.close()
            raise VsockTimeout(f"connecting to vsock {address} timed out after {timeout:g} s") from exc
        except (VsockConnectionRefused, VsockHandshakeError):
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise TransportError(f"connecting to vsock {address} failed: {exc.strerror or exc}") from exc
        return VsockConnection(sock, VsockAddress(self.local_cid, result.local_port), address)

    def _bind(self, port: int, backlog: int) -> tuple[socket.socket, VsockAddress, str]:
        check_port(port)
        directory = self.root / str(self.local_cid)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransportError(f"cannot create the vsock channel directory {directory}: {exc.strerror}") from exc
        candidates = _ports(int.from_bytes(os.urandom(2), "big") + EPHEMERAL_PORT_START) \
            if port == VMADDR_PORT_ANY else iter([port])
        for attempt, candidate in enumerate(candidates):
            address = VsockAddress(self.local_cid, candidate)
            path = _check_path(self.path_of(address))
            try:
                _remove_stale(path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind(path)
                    sock.listen(backlog)
                except BaseException:
                    sock.close()
                    raise
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and port == VMADDR_PORT_ANY and attempt < 1000:
                    continue
                if exc.errno == errno.EADDRINUSE:
                    raise TransportError(f"Could not bind to cid: {self.local_cid} port: {candidate}: "
                                         "the port is already in use") from exc
                raise TransportError(f"Could not bind to cid: {self.local_cid} port: {candidate}: "
                                     f"{exc.strerror or exc}") from exc
            return sock, address, path
        raise AssertionError("unreachable")  # pragma: no cover

    def listen(self, port: int, backlog: int = 128) -> UnixVsockListener:
        """Listen on ``(own cid, port)``; ``VMADDR_PORT_ANY`` picks a free ephemeral port."""
        sock, address, path = self._bind(port, backlog)
        return UnixVsockListener(sock, address, path, self)

    # ---- asyncio

    async def open_connection(self, cid: int, port: int, timeout: float = DEFAULT_CONNECT_TIMEOUT
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, VsockAddress]:
        """asyncio variant of :meth:`connect`: the streams and this side's local address."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        address, path = self._target(cid, port)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                with _pinned(path, address) as target:
                    reader, writer = await asyncio.open_unix_connection(target)
                machine = ConnectorHandshake(address.port)
                writer.write(machine.request())
                await writer.drain()
                line = await _read_line(reader)
                result = machine.receive(line)
                assert result is not None  # a complete line settles the handshake
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError) as exc:
            _abort(writer)
            raise VsockConnectionRefused(f"connection to vsock {address} refused: nobody listens") from exc
        except TimeoutError as exc:
            _abort(writer)
            raise VsockTimeout(f"connecting to vsock {address} timed out after {timeout:g} s") from exc
        except (VsockConnectionRefused, VsockHandshakeError):
            _abort(writer)
            raise
        except OSError as exc:
            _abort(writer)
            raise TransportError(f"connecting to vsock {address} failed: {exc.strerror or exc}") from exc
        return reader, writer, VsockAddress(self.local_cid, result.local_port)

    async def start_listener(self, port: int, backlog: int = 128) -> AsyncUnixVsockListener:
        """asyncio variant of :meth:`listen`."""
        sock, address, path = self._bind(port, backlog)
        listener = AsyncUnixVsockListener(address, path, self)
        try:
            await listener._start(sock)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return listener


def _abort(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort()


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """One handshake line; the stream keeps what follows it.  EOF before a newline returns the partial bytes."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        # EOF: an empty read means "closed" to the state machines; a partial line is a broken line.
        if not exc.partial:
            return b""
        raise VsockHandshakeError("stream ended inside a handshake line", rule="no-newline") from exc
    except asyncio.LimitOverrunError as exc:
        raise VsockHandshakeError(f"no newline within {MAX_LINE_LENGTH} bytes", rule="line-too-long") from exc


def _remove_stale(path: str) -> None:
    """Remove a socket file left by a dead listener; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody accepts on it: a leftover
        return
    except OSError:
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "address in use")


class _UnlinkOnClose:
    """Remove the listener's socket file on close, only if it is still the one this listener bound."""

    def __init__(self, path: str) -> None:
        self.path = path
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)


class UnixVsockListener:
    """A listening emulated vsock port.  :meth:`accept` returns handshaken connections only."""

    def __init__(self, sock: socket.socket, address: VsockAddress, path: str, transport: UnixVsockTransport) -> None:
        self._sock = sock
        self.address = address
        self.path = path
        self._transport = transport
        self._file = _UnlinkOnClose(path)
        self._peer_ports = _ports(EPHEMERAL_PORT_START)
        self._closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> tuple[VsockConnection, VsockAddress]:
        """The next connection and its peer address; :class:`VsockTimeout` after ``timeout`` seconds.

        A peer that breaks the handshake (or does not finish it within the transport's handshake timeout) is
        dropped and the wait goes on.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise TransportError(f"vsock listener {self.address} is closed")
            wait = _ACCEPT_POLL if deadline is None else min(_ACCEPT_POLL, max(0.0, deadline - time.monotonic()))
            try:
                ready, _, _ = select.select([self._sock], [], [], wait)
            except (OSError, ValueError) as exc:
                raise TransportError(f"vsock listener {self.address} failed: {exc}") from exc
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    raise VsockTimeout(f"no connection on vsock {self.address} within {timeout:g} s")
                continue
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                raise TransportError(f"accept on vsock {self.address} failed: {exc.strerror or exc}") from exc
            try:
                conn.settimeout(self._transport.handshake_timeout)
                result = run_acceptor(_PeekLineStream(conn), self.address.port, next(self._peer_ports))
                conn.settimeout(None)
            except (VsockHandshakeError, OSError):
                conn.close()  # a broken or silent peer must not stall the listener
                continue
            return (VsockConnection(conn, self.address, self._transport._peer_of_accepted(result.peer_port)),
                    self._transport._peer_of_accepted(result.peer_port))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()
            self._file.unlink()

    def __enter__(self) -> UnixVsockListener:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _AsyncQueueListener:
    """The part both asyncio listeners share: accepted connections wait in a queue for :meth:`accept`."""

    def __init__(self, address: VsockAddress) -> None:
        self.address = address
        self._queue: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter, VsockAddress]] = \
            asyncio.Queue()
        self._server: asyncio.AbstractServer | None = None

    async def accept(self, timeout: float | None = None
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, VsockAddress]:
        if self._server is None:
            raise TransportError(f"vsock listener {self.address} is closed")
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError as exc:
            raise VsockTimeout(f"no connection on vsock {self.address} within {timeout:g} s") from exc

    def _closed(self) -> None:
        """Hook for what a subclass releases when the listener closes."""

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self._closed()
            while not self._queue.empty():  # connections nobody accepted are dropped, not left half-open
                _, writer, _ = self._queue.get_nowait()
                writer.transport.abort()


class AsyncUnixVsockListener(_AsyncQueueListener):
    """asyncio listener: connections are handshaken in the background and queued for :meth:`accept`."""

    def __init__(self, address: VsockAddress, path: str, transport: UnixVsockTransport) -> None:
        super().__init__(address)
        self.path = path
        self._transport = transport
        self._file = _UnlinkOnClose(path)
        self._peer_ports = _ports(EPHEMERAL_PORT_START)

    async def _start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._on_connection, sock=sock)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        machine = AcceptorHandshake(self.address.port)
        try:
            async with asyncio.timeout(self._transport.handshake_timeout):
                machine.receive(await _read_line(reader))
            reply, result = machine.reply(next(self._peer_ports))
            writer.write(reply)
            await writer.drain()
        except (VsockHandshakeError, OSError, TimeoutError):
            writer.transport.abort()
            return
        await self._queue.put((reader, writer, self._transport._peer_of_accepted(result.peer_port)))

    def _closed(self) -> None:
        self._file.unlink()


# ---------------------------------------------------------------------------------------------- real AF_VSOCK



def _connect_failure(exc: OSError, address: VsockAddress, timeout: float | None) -> TransportError:
    """The typed error for a failed AF_VSOCK connect (blocking or asyncio)."""
    if isinstance(exc, ConnectionRefusedError | ConnectionResetError):
        # vsock answers a connect to a port nobody listens on with ECONNRESET.
        return VsockConnectionRefused(f"connection to vsock {address} refused: nobody listens")
    if isinstance(exc, TimeoutError):
        return VsockTimeout(f"connecting to vsock {address} timed out after {timeout:g} s")
    return TransportError(f"connecting to vsock {address} failed: {exc.strerror or exc}")

class AFVsockTransport:
    """Real ``AF_VSOCK`` sockets, for real Nitro only.  ``socket_factory(family, type)`` makes the sockets."""

    def __init__(self, socket_factory: SocketFactory = socket.socket) -> None:
        self._factory = socket_factory

    def _new(self) -> Any:
        try:
            return self._factory(AF_VSOCK, socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"cannot create an AF_VSOCK socket: {exc.strerror or exc}") from exc

    def connect(self, cid: int, port: int, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> VsockConnection:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        address = VsockAddress(check_cid(cid), check_port(port))
        sock = self._new()
        try:
            sock.settimeout(timeout)
            sock.connect(address.as_tuple())
            local = VsockAddress(*sock.getsockname())
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise _connect_failure(exc, address, timeout) from exc
        return VsockConnection(sock, local, address)

    def _bind(self, port: int, backlog: int) -> tuple[Any, VsockAddress]:
        check_port(port)
        sock = self._new()
        try:
            sock.bind((VMADDR_CID_ANY, port))
            sock.listen(backlog)
            address = VsockAddress(*sock.getsockname())
        except OSError as exc:
            sock.close()
            raise TransportError(f"Could not bind to cid: {VMADDR_CID_ANY} port: {port}: "
                                 f"{exc.strerror or exc}") from exc
        return sock, address

    def listen(self, port: int, backlog: int = 128) -> AFVsockListener:
        sock, address = self._bind(port, backlog)
        return AFVsockListener(sock, address)

    async def open_connection(self, cid: int, port: int, timeout: float = DEFAULT_CONNECT_TIMEOUT
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, VsockAddress]:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        address = VsockAddress(check_cid(cid), check_port(port))
        sock = self._new()
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, address.as_tuple())
                reader, writer = await asyncio.open_connection(sock=sock)
            local = VsockAddress(*sock.getsockname())
        except OSError as exc:
            sock.close()
            raise _connect_failure(exc, address, timeout) from exc
        return reader, writer, local

    async def start_listener(self, port: int, backlog: int = 128) -> AsyncAFVsockListener:
        sock, address = self._bind(port, backlog)
        listener = AsyncAFVsockListener(address)
        await listener._start(sock)
        return listener


class AFVsockListener:
    def __init__(self, sock: Any, address: VsockAddress) -> None:
        self._sock = sock
        self.address = address

    def fileno(self) -> int:
        fileno: int = self._sock.fileno()
        return fileno

    def accept(self, timeout: float | None = None) -> tuple[VsockConnection, VsockAddress]:
        try:
            self._sock.settimeout(timeout)
            conn, (cid, port) = self._sock.accept()
        except TimeoutError as exc:
            raise VsockTimeout(f"no connection on vsock {self.address} within {timeout:g} s") from exc
        except OSError as exc:
            raise TransportError(f"accept on vsock {self.address} failed: {exc.strerror or exc}") from exc
        conn.settimeout(None)
        peer = VsockAddress(cid, port)
        return VsockConnection(conn, self.address, peer), peer

    def close(self) -> None:
        self._sock.close()


class AsyncAFVsockListener(_AsyncQueueListener):
    async def _start(self, sock: Any) -> None:
        self._server = await asyncio.start_server(self._on_connection, sock=sock)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid, port = writer.get_extra_info("peername")
        await self._queue.put((reader, writer, VsockAddress(cid, port)))
