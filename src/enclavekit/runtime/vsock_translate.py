"""AF_VSOCK for unmodified programs: vsock system calls translated onto the Unix-socket emulation.

The sandbox's filter sends ``socket(AF_VSOCK, ...)`` and every ``connect``, ``bind``, ``accept``, ``accept4``,
``getsockname`` and ``getpeername`` to the supervisor (spec unmodified-apps §3.1); this module answers them
(§3.2), against the emulation's layout of :mod:`enclavekit.vsock.transport` (``R/<cid>/<port>.sock`` and
Firecracker's ``CONNECT <port>\\n`` / ``OK <port>\\n`` handshake):

* ``socket(AF_VSOCK, SOCK_STREAM[|NONBLOCK|CLOEXEC], 0)``: the supervisor creates an ``AF_UNIX`` stream socket and
  installs it in the caller with ``ADDFD_FLAG_SEND`` (the call returns its fd number, atomically).  Its
  ``(st_dev, st_ino)`` marks it as an emulated vsock socket;
* every other call: the supervisor takes the caller's fd once with ``pidfd_getfd`` (same open file description,
  ``ID_VALID`` checked in between) and decides from the copy's ``(st_dev, st_ino)``: a fd the caller ``dup2``'d
  over meanwhile is never mistaken for the socket it replaced, and the copy is closed on every path;
* ``connect`` to ``(3, port)``: connects the caller's socket to ``R/3/<port>.sock`` (resolved in the supervisor's
  namespaces) and does the ``CONNECT``/``OK`` handshake on it before the call returns, on a worker thread with
  a deadline (``SO_SNDTIMEO`` for a full backlog), so a parent that never accepts cannot stall the loop; any
  other CID, or nobody listening, is ``ECONNRESET`` as vsock reports it, no answer in time ``ETIMEDOUT``;
* ``bind`` to ``(VMADDR_CID_ANY or own CID, port)``: binds the caller's socket to ``R/<own cid>/<port>.sock``
  (``VMADDR_PORT_ANY`` picks an ephemeral port); ``listen`` is native;
* ``accept``/``accept4`` on such a listener: the supervisor accepts, answers the parent's ``CONNECT`` with
  ``OK <peer port>``, writes ``sockaddr_vm{cid 3, peer port}`` and installs the connection with ``ADDFD_FLAG_SEND``
  (``SOCK_NONBLOCK``/``SOCK_CLOEXEC`` applied).  A non-blocking listener with nothing pending gets ``EAGAIN``;
* ``getsockname``/``getpeername`` report ``sockaddr_vm`` values (required: Go's ``mdlayher/vsock`` type-asserts
  them, §3.2).  Calls on sockets that are not emulated are ``CONTINUE``d (they are not vsock sockets: see below).

Safety (§3.4): a real vsock socket never exists in the sandbox.  ``socket(AF_VSOCK)`` is always answered here
(an injected ``AF_UNIX`` fd or an errno) and never ``CONTINUE``d; ``socketpair(AF_VSOCK)`` and ``io_uring_setup``
are refused in BPF; when the supervisor is gone, the kernel answers every notified call ``ENOSYS``.  A
``sockaddr_vm`` reaching the kernel through a ``CONTINUE`` (a connect on a non-vsock socket) is refused by the
kernel itself (``EAFNOSUPPORT``/``EINVAL``).

Differences from vsock, by design: ``SOCK_STREAM`` only (Nitro's type); blocking ``connect``/``accept`` are
interrupted only by fatal signals (``WAIT_KILLABLE_RECV``, §5); a non-blocking ``connect`` completes the handshake
before returning 0 instead of ``EINPROGRESS``; ``listen`` on an unbound socket is the kernel's AF_UNIX autobind
(unreachable from the parent) where vsock says ``EINVAL``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from enclavekit.errors import VsockConnectionRefused, VsockHandshakeError
from enclavekit.runtime.seccomp import AF_VSOCK, USER_NOTIF, Action, ArgMatch, SyscallRule
from enclavekit.runtime.usernotif import (
    PARK_CHECK_INTERVAL,
    Notification,
    NotificationListener,
    NotificationServer,
    TargetMemory,
    caller_fd,
    fd_identity,
)
from enclavekit.vsock.address import VMADDR_CID_ANY, VMADDR_CID_PARENT, VMADDR_PORT_ANY, VsockAddress
from enclavekit.vsock.protocol import AcceptorHandshake, ConnectorHandshake

__all__ = [
    "VsockTranslator",
    "SOCKADDR_VM",
    "CONNECT_TIMEOUT",
    "pack_sockaddr_vm",
    "unpack_sockaddr_vm",
]

_log = logging.getLogger(__name__)

# <linux/vm_sockets.h> struct sockaddr_vm: u16 family, u16 reserved1, u32 port, u32 cid, u8 flags, u8 zero[3]
SOCKADDR_VM = struct.Struct("<HHIIB3s")
_SOCKADDR_STORAGE = 128
# vsock's default connect timeout (VSOCK_DEFAULT_CONNECT_TIMEOUT, 2 s)
CONNECT_TIMEOUT = 2.0
_SOCK_TYPE_MASK = 0xF
_SOCK_NONBLOCK = os.O_NONBLOCK
_SOCK_CLOEXEC = os.O_CLOEXEC
_PRUNE_EVERY = 1024
# connects run on worker threads (each waits at most connect_timeout); more at once queue up
_CONNECT_WORKERS = 8
_MAX_UNIX_PATH = 107
# The emulation's constants, as enclavekit.vsock.transport defines them (not imported: that module loads asyncio,
# which would slow every enclave launch; a unit test checks they agree).
EPHEMERAL_PORT_START = 49152
HANDSHAKE_TIMEOUT = 5.0


def socket_path(root: Path, address: VsockAddress) -> Path:
    """``root/<cid>/<port>.sock``: the emulation's one path per vsock address (vsock.transport's layout)."""
    return Path(root) / str(address.cid) / f"{address.port}.sock"


def pack_sockaddr_vm(address: VsockAddress) -> bytes:
    return SOCKADDR_VM.pack(AF_VSOCK, 0, address.port, address.cid, 0, b"\0\0\0")


def unpack_sockaddr_vm(data: bytes) -> VsockAddress:
    """Parse a caller's ``sockaddr_vm`` the way ``vsock_addr_cast`` does; OSError(errno) when it would fail."""
    if len(data) < SOCKADDR_VM.size:
        raise OSError(errno.EFAULT, "sockaddr_vm too short")  # vsock_addr_cast: short is -EFAULT
    family, _, port, cid, _flags, zero = SOCKADDR_VM.unpack_from(data)
    if family != AF_VSOCK:
        raise OSError(errno.EAFNOSUPPORT, "not an AF_VSOCK address")
    if zero[0] != 0:
        raise OSError(errno.EINVAL, "sockaddr_vm.svm_zero is not zero")
    return VsockAddress(cid, port)


@dataclass
class _VSocket:
    """What the supervisor knows about one emulated socket (keyed by the AF_UNIX socket's identity)."""

    local: VsockAddress | None = None
    peer: VsockAddress | None = None
    bound_path: str | None = None
    bound_identity: tuple[int, int] | None = None
    peer_ports: Iterator[int] = field(default_factory=lambda: itertools.count(EPHEMERAL_PORT_START))


class _Errno(Exception):
    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


def _line_part(sock: socket.socket, wanted: int) -> bytes | None:
    """Up to the first newline of what is buffered, consumed (never past it); None when nothing is there yet."""
    try:
        data = sock.recv(max(1, wanted), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    if not data:
        return b""
    end = data.find(b"\n")
    take = end + 1 if end >= 0 else len(data)
    return sock.recv(take, socket.MSG_DONTWAIT)


class VsockTranslator:
    """Answers the vsock system calls of one sandbox.

    ``root`` is the vsock emulation's root as the supervisor sees it; ``local_cid`` the enclave's CID.  The parent's
    listeners are ``root/3/<port>.sock``; this enclave's are created in ``root/<local_cid>/``.
    """

    def __init__(self, root: str | os.PathLike[str], local_cid: int, *,
                 connect_timeout: float = CONNECT_TIMEOUT, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.root = Path(root)
        self.local_cid = local_cid
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self._sockets: dict[tuple[int, int], _VSocket] = {}
        self._ephemeral = itertools.count(EPHEMERAL_PORT_START + int.from_bytes(os.urandom(2), "big") % 8192)
        self._since_prune = 0
        self._table_lock = threading.Lock()  # the table is also updated by connect workers
        self._workers: ThreadPoolExecutor | None = None

    # ---- filter rules

    def rules(self) -> list[SyscallRule]:
        return [
            SyscallRule("socket", USER_NOTIF, (ArgMatch(0, AF_VSOCK),)),
            # §3.1: never a vsock socketpair; io_uring bypasses seccomp (§5)
            SyscallRule("socketpair", Action.errno(errno.EAFNOSUPPORT), (ArgMatch(0, AF_VSOCK),)),
            SyscallRule("io_uring_setup", Action.errno(errno.ENOSYS)),
            *(SyscallRule(name, USER_NOTIF) for name in
              ("connect", "bind", "accept", "accept4", "getsockname", "getpeername")),
        ]

    def syscalls(self) -> tuple[str, ...]:
        return ("socket", "connect", "bind", "accept", "accept4", "getsockname", "getpeername")

    def socket_count(self) -> int:
        return len(self._sockets)

    # ---- dispatch

    def handle(self, server: NotificationServer, notification: Notification, name: str) -> None:
        listener = server.listener
        if name == "socket":
            self._socket(listener, notification)
            return
        fd = notification.args[0] & 0xFFFFFFFF
        key = fd_identity(notification.pid, fd)
        if key is None or key not in self._sockets:
            # not an emulated socket, hence not a vsock socket at all (§3.4): the kernel decides
            listener.continue_call(notification.id)
            return
        # §2.1 step 2: take the fd once and decide from the copy (the look above is only a fast path)
        try:
            dup = caller_fd(listener, notification, fd)
        except OSError as exc:
            listener.fail(notification.id, exc.errno or errno.EBADF)
            return
        try:
            st = os.fstat(dup)
            vs = self._sockets.get((st.st_dev, st.st_ino))
            # an emulated socket is an AF_UNIX socket of ours: anything else was dup2'd over the fd meanwhile
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=dup) if vs is not None else None
        except OSError:
            os.close(dup)
            listener.fail(notification.id, errno.EBADF)
            return
        if vs is None or sock is None:
            os.close(dup)
            listener.continue_call(notification.id)  # now a file or another socket: the kernel answers
            return
        # ``sock`` belongs to the method called now: it closes it, or hands it on (a worker, a parked wait)
        try:
            if name == "connect":
                self._connect(server, notification, sock, vs)
            elif name == "bind":
                self._bind(listener, notification, sock, vs)
            elif name in ("accept", "accept4"):
                self._accept(server, notification, sock, vs, four=name == "accept4")
            else:
                sock.close()
                self._name(listener, notification, vs, peer=name == "getpeername")
        except _Errno as exc:
            listener.fail(notification.id, exc.number)

    # ---- socket

    def _socket(self, listener: NotificationListener, n: Notification) -> None:
        family, kind, proto = (n.args[0] & 0xFFFFFFFF, n.args[1] & 0xFFFFFFFF, n.args[2] & 0xFFFFFFFF)
        if family != AF_VSOCK:
            listener.fail(n.id, errno.EAFNOSUPPORT)  # the filter sends only AF_VSOCK here; never CONTINUE
            return
        flags = kind & ~_SOCK_TYPE_MASK
        if flags & ~(_SOCK_NONBLOCK | _SOCK_CLOEXEC):
            listener.fail(n.id, errno.EINVAL)
            return
        if kind & _SOCK_TYPE_MASK != socket.SOCK_STREAM:
            listener.fail(n.id, errno.ESOCKTNOSUPPORT)
            return
        if proto not in (0, AF_VSOCK):  # vsock accepts 0 or PF_VSOCK
            listener.fail(n.id, errno.EPROTONOSUPPORT)
            return
        self._maybe_prune()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | (socket.SOCK_NONBLOCK if flags & _SOCK_NONBLOCK
                                                                    else 0))
        try:
            st = os.fstat(sock.fileno())
            key = (st.st_dev, st.st_ino)
            with self._table_lock:
                self._sockets[key] = _VSocket()
            try:
                listener.add_fd(n.id, sock.fileno(), cloexec=bool(flags & _SOCK_CLOEXEC), send=True)
            except OSError as exc:
                with self._table_lock:
                    self._sockets.pop(key, None)
                if exc.errno != errno.ENOENT:
                    listener.fail(n.id, exc.errno or errno.EMFILE)
        finally:
            sock.close()

    # ---- helpers

    @staticmethod
    def _memory(listener: NotificationListener, n: Notification) -> TargetMemory:
        """The caller's memory, pinned: opened first, then ``ID_VALID`` (§2.1 step 3)."""
        try:
            mem = TargetMemory(n.pid)
        except OSError as exc:
            raise _Errno(errno.ESRCH) from exc
        if not listener.id_valid(n.id):
            mem.close()
            raise _Errno(errno.ESRCH)
        return mem

    def _read_address(self, listener: NotificationListener, n: Notification, address: int,
                      length: int) -> VsockAddress:
        length &= 0xFFFFFFFF
        if length > _SOCKADDR_STORAGE:  # move_addr_to_kernel
            raise _Errno(errno.EINVAL)
        with self._memory(listener, n) as mem:
            try:
                data = mem.read(address, min(length, SOCKADDR_VM.size))
            except OSError as exc:
                raise _Errno(errno.EFAULT) from exc
        try:
            return unpack_sockaddr_vm(data)
        except OSError as exc:
            raise _Errno(exc.errno or errno.EINVAL) from exc

    def _write_address(self, listener: NotificationListener, n: Notification, address: VsockAddress,
                       addr_ptr: int, len_ptr: int, *, optional: bool) -> None:
        """Kernel semantics (``move_addr_to_user``): copy ``min(*len, 16)`` bytes, then ``*len = 16``.

        ``optional`` (accept): a NULL ``addr_ptr`` means no address is wanted and nothing is touched.
        """
        if optional and addr_ptr == 0:
            return
        with self._memory(listener, n) as mem:
            try:
                room = int.from_bytes(mem.read(len_ptr, 4), "little", signed=True)
                if room < 0:
                    raise _Errno(errno.EINVAL)
                # room == 0 copies nothing: getsockname(fd, NULL, &zero) succeeds and reports the length
                mem.write_many([(addr_ptr, pack_sockaddr_vm(address)[:min(room, SOCKADDR_VM.size)]),
                                (len_ptr, SOCKADDR_VM.size.to_bytes(4, "little"))])
            except OSError as exc:
                raise _Errno(errno.EFAULT) from exc

    def _path(self, address: VsockAddress) -> str:
        path = os.fsdecode(socket_path(self.root, address))
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise _Errno(errno.ENAMETOOLONG)
        return path

    # ---- connect

    def _connect(self, server: NotificationServer, n: Notification, sock: socket.socket, vs: _VSocket) -> None:
        listener = server.listener
        try:
            target = self._read_address(listener, n, n.args[1], n.args[2])
            if vs.peer is not None:
                raise _Errno(errno.EISCONN)
            if target.cid != VMADDR_CID_PARENT:
                raise _Errno(errno.ECONNRESET)  # §3.2 step 4: an enclave reaches only the parent
            path = self._path(target)
            if self._workers is None:
                self._workers = ThreadPoolExecutor(max_workers=_CONNECT_WORKERS, thread_name_prefix="vsock-connect")
            # a blocking connect to a parent that never accepts must not freeze the loop (review issue 8.2)
            self._workers.submit(self._connect_worker, listener, n, sock, vs, target=target, path=path)
        except BaseException:
            sock.close()
            raise

    def _connect_worker(self, listener: NotificationListener, n: Notification, sock: socket.socket, vs: _VSocket,
                        *, target: VsockAddress, path: str) -> None:
        try:
            try:
                local_port = self._connect_blocking(listener, n, sock, target, path)
            except _Errno as exc:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # a failed connect leaves no half-open channel
                listener.fail(n.id, exc.number)
                return
            vs.peer = target
            vs.local = VsockAddress(self.local_cid, local_port)
            listener.respond(n.id, 0)
        except Exception:
            _log.exception("vsock connect to %s failed", target)
            with contextlib.suppress(OSError):
                listener.fail(n.id, errno.EIO)
        finally:
            sock.close()

    def _connect_blocking(self, listener: NotificationListener, n: Notification, sock: socket.socket,
                          target: VsockAddress, path: str) -> int:
        """Connect and handshake within ``connect_timeout``; the local port, or _Errno."""
        nonblocking = bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
        # AF_UNIX connect waits for backlog room up to SO_SNDTIMEO (the caller's value is put back after)
        saved = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)
        seconds = int(self.connect_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("@ll", seconds, max(1, int((self.connect_timeout - seconds) * 1e6))))
        try:
            sock.connect(path)
        except BlockingIOError:
            raise _Errno(errno.EAGAIN if nonblocking else errno.ETIMEDOUT) from None
        except OSError as exc:
            _log.debug("vsock connect to %s: %s", target, exc)
            raise _Errno(errno.ECONNRESET) from exc
        finally:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, saved)
        machine = ConnectorHandshake(target.port)
        deadline = time.monotonic() + self.connect_timeout
        try:
            sock.send(machine.request(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            while True:
                part = _line_part(sock, machine.wanted)
                if part is not None:
                    result = machine.receive(part)
                    if result is not None:
                        return result.local_port
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Errno(errno.ETIMEDOUT)
                if not poller.poll(int(min(remaining, PARK_CHECK_INTERVAL) * 1000) + 1) and not listener.id_valid(
                        n.id):
                    raise _Errno(errno.ECONNRESET)  # §3.2: a dead caller's connect goes no further
        except (VsockHandshakeError, VsockConnectionRefused, OSError) as exc:
            raise _Errno(errno.ECONNRESET) from exc

    # ---- bind

    def _bind(self, listener: NotificationListener, n: Notification, sock: socket.socket, vs: _VSocket) -> None:
        try:
            wanted = self._read_address(listener, n, n.args[1], n.args[2])
            if vs.local is not None:
                raise _Errno(errno.EINVAL)
            if wanted.cid not in (VMADDR_CID_ANY, self.local_cid):
                raise _Errno(errno.EADDRNOTAVAIL)
            ports = ((next(self._ephemeral) for _ in range(1000)) if wanted.port == VMADDR_PORT_ANY
                     else iter([wanted.port]))
            for port in ports:
                address = VsockAddress(self.local_cid, port)
                path = self._path(address)
                try:
                    _remove_stale(path)
                    sock.bind(path)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE and wanted.port == VMADDR_PORT_ANY:
                        continue
                    raise _Errno(errno.EADDRINUSE if exc.errno == errno.EADDRINUSE else errno.EACCES) from exc
                st = os.stat(path)
                vs.local, vs.bound_path, vs.bound_identity = address, path, (st.st_dev, st.st_ino)
                listener.respond(n.id, 0)
                return
            raise _Errno(errno.EADDRINUSE)
        finally:
            sock.close()

    # ---- accept

    def _accept(self, server: NotificationServer, n: Notification, lsock: socket.socket, vs: _VSocket, *,
                four: bool) -> None:
        listener = server.listener
        flags = n.args[3] & 0xFFFFFFFF if four else 0
        try:
            if flags & ~(_SOCK_NONBLOCK | _SOCK_CLOEXEC):
                raise _Errno(errno.EINVAL)
            if not lsock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) or vs.local is None:
                raise _Errno(errno.EINVAL)
            nonblocking = bool(fcntl.fcntl(lsock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
        except BaseException:
            lsock.close()
            raise
        local = vs.local

        def done(error: int) -> None:
            lsock.close()
            if error:
                listener.fail(n.id, error)

        def on_cancel(reason: str) -> None:
            done(errno.EAGAIN if reason == "timeout" else errno.EINTR)

        def attempt() -> None:
            if not _readable(lsock.fileno()):
                if nonblocking:
                    done(errno.EAGAIN)
                else:
                    server.park(n, lsock.fileno(), select.POLLIN, attempt, on_cancel=on_cancel)
                return
            if not listener.id_valid(n.id):  # a dead caller never takes a connection (§3.2)
                done(0)
                return
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                server.park(n, lsock.fileno(), select.POLLIN, attempt, on_cancel=on_cancel)
                return
            except OSError as exc:
                done(exc.errno or errno.EINVAL)
                return
            handshake(conn, AcceptorHandshake(local.port))

        def handshake(conn: socket.socket, machine: AcceptorHandshake) -> None:
            def drop() -> None:
                conn.close()
                attempt()  # a broken peer must not fail the accept: wait for the next one

            def on_ready() -> None:
                try:
                    part = _line_part(conn, machine.wanted)
                    if part is None:
                        server.park(n, conn.fileno(), select.POLLIN, on_ready, on_cancel=conn_cancel,
                                    timeout=self.handshake_timeout)
                        return
                    port = machine.receive(part)
                except (VsockHandshakeError, OSError):
                    drop()
                    return
                if port is None:
                    server.park(n, conn.fileno(), select.POLLIN, on_ready, on_cancel=conn_cancel,
                                timeout=self.handshake_timeout)
                    return
                peer = VsockAddress(VMADDR_CID_PARENT, next(vs.peer_ports))
                reply, _ = machine.reply(peer.port)
                try:
                    conn.sendall(reply)
                except OSError:
                    drop()
                    return
                deliver(conn, peer)

            def conn_cancel(reason: str) -> None:
                if reason == "timeout":
                    drop()
                else:
                    conn.close()
                    done(errno.EINTR)

            on_ready()

        def deliver(conn: socket.socket, peer: VsockAddress) -> None:
            try:
                if flags & _SOCK_NONBLOCK:
                    conn.setblocking(False)
                try:
                    self._write_address(listener, n, peer, n.args[1], n.args[2], optional=True)
                except _Errno as exc:
                    done(exc.number)
                    return
                self._maybe_prune()  # accepted sockets count too (review issue 8.8)
                st = os.fstat(conn.fileno())
                ckey = (st.st_dev, st.st_ino)
                with self._table_lock:
                    self._sockets[ckey] = _VSocket(local=local, peer=peer)
                try:
                    listener.add_fd(n.id, conn.fileno(), cloexec=bool(flags & _SOCK_CLOEXEC), send=True)
                except OSError as exc:
                    with self._table_lock:
                        self._sockets.pop(ckey, None)
                    done(0 if exc.errno == errno.ENOENT else (exc.errno or errno.EMFILE))
                    return
                done(0)
            finally:
                conn.close()

        attempt()

    # ---- names

    def _name(self, listener: NotificationListener, n: Notification, vs: _VSocket, *, peer: bool) -> None:
        if peer:
            if vs.peer is None:
                raise _Errno(errno.ENOTCONN)
            address = vs.peer
        else:
            address = vs.local or VsockAddress(VMADDR_CID_ANY, VMADDR_PORT_ANY)
        self._write_address(listener, n, address, n.args[1], n.args[2], optional=False)
        listener.respond(n.id, 0)

    # ---- table pruning (§5: identities repeat only after a 32-bit wrap, but the table must not grow forever)

    def _maybe_prune(self) -> None:
        self._since_prune += 1
        if self._since_prune >= _PRUNE_EVERY:
            self._since_prune = 0
            self.prune(_live_socket_inodes)

    def prune(self, live: Callable[[], set[int]]) -> int:
        """Forget sockets no process holds any more (and unlink their socket files); return how many."""
        alive = live()
        with self._table_lock:
            gone = [(key, self._sockets.pop(key)) for key in list(self._sockets) if key[1] not in alive]
        for _, vs in gone:
            if vs.bound_path and vs.bound_identity:
                with contextlib.suppress(OSError):
                    st = os.lstat(vs.bound_path)
                    if (st.st_dev, st.st_ino) == vs.bound_identity:
                        os.unlink(vs.bound_path)
        return len(gone)


def _readable(fd: int) -> bool:
    """Whether ``fd`` polls readable now (poll, not select: the supervisor's fds may be numbered 1024+)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _live_socket_inodes() -> set[int]:
    inodes: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    return inodes


def _remove_stale(path: str) -> None:
    """A socket file left by a closed listener is removed; a live one is EADDRINUSE; anything else EACCES.

    The directory is the enclave's own, writable by it: the probe connects through an ``O_PATH | O_NOFOLLOW`` fd
    of the socket file itself, so a symlink swapped in after the check cannot point the supervisor elsewhere.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.EACCES, "not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.setblocking(False)
            probe.connect(f"/proc/self/fd/{fd}")
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except BlockingIOError:
            pass  # a backlog that is full: somebody listens
        finally:
            probe.close()
    finally:
        os.close(fd)
    raise OSError(errno.EADDRINUSE, "address in use")
