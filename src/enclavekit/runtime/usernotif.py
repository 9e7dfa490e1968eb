"""seccomp user notification: the plumbing that lets the supervisor answer system calls of a sandboxed program.

The sandboxed child installs the sandbox's one filter with ``SECCOMP_FILTER_FLAG_NEW_LISTENER |
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`` (:func:`install_notifying_filter`) and passes the listener fd to the
supervisor with ``SCM_RIGHTS`` (:func:`send_listener` / :func:`receive_listener`), then execs the unmodified
program.  Every system call the filter answers with ``SECCOMP_RET_USER_NOTIF`` blocks in the kernel until the
supervisor replies on the listener (spec unmodified-apps §2.1, §3.1):

* :class:`NotificationListener` wraps the listener fd: ``NOTIF_RECV`` (zeroed 80-byte buffer, §2.1 step 1),
  ``NOTIF_SEND`` (a result, an errno or ``FLAG_CONTINUE``), ``NOTIF_ID_VALID``, ``NOTIF_ADDFD`` (with
  ``ADDFD_FLAG_SEND``: install an fd and complete the call with its number, atomically), and
  ``NOTIF_SET_FLAGS(SYNC_WAKE_UP)`` (§2.3: cuts a round trip from ~90 to ~13 µs on this kind of VM);
* :class:`TargetMemory` reads and writes the caller's memory through ``/proc/TID/mem`` opened (read-write)
  *before* the ``ID_VALID`` check (§2.1 step 3: the fd is then pinned to the caller's address space even if the
  TID is recycled, so nothing is ever read from or written into another process); a write first checks that
  every target page is writable (``PROCMAP_QUERY`` on ``/proc/TID/maps``, or the maps text on older kernels), so
  a read-only page gives ``EFAULT`` as the kernel's ``copy_to_user`` does (``/proc/TID/mem`` itself writes
  through read-only pages, §5);
* :func:`pidfd_open` / :func:`pidfd_getfd` fetch a copy of one of the caller's fds (the same open file
  description), so the supervisor can connect or bind the caller's own socket (:func:`caller_fd` takes it once,
  with the ``ID_VALID`` check in between);
* :class:`NotificationServer` is a single-threaded event loop: it receives notifications, dispatches them by
  system-call number to handlers, and lets a handler park a notification on an fd (an ``accept`` waiting for a
  connection and its ``CONNECT`` line) with a deadline; a handler may also answer from a worker thread (the
  listener's methods are thread-safe).  When the loop ends, however it ends, it closes the listener.  Parked
  notifications are re-checked with ``ID_VALID`` every :data:`PARK_CHECK_INTERVAL` seconds so a dead caller
  never consumes anything.

``WAIT_KILLABLE_RECV`` is mandatory (§2.4): without it a non-fatal signal aborts the wait after the supervisor
received the request, the call is restarted, and a non-idempotent request (a PCR extend) runs twice.  With it,
only a fatal signal interrupts the caller once its notification was received: each call is served exactly once.

Every ctypes system-call argument is a ``c_long`` or a pointer (§4, trap: a bare Python int is passed as a 32-bit
int with garbage in the upper half).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import platform
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from enclavekit.errors import SeccompError
from enclavekit.runtime.seccomp import SeccompFilter, SyscallRule, install_filter, sandbox_filter

__all__ = [
    "SECCOMP_FILTER_FLAG_NEW_LISTENER",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
    "NOTIFYING_FILTER_FLAGS",
    "PARK_CHECK_INTERVAL",
    "Notification",
    "NotificationListener",
    "NotificationHandler",
    "NotificationServer",
    "TargetMemory",
    "install_notifying_filter",
    "send_listener",
    "receive_listener",
    "pidfd_open",
    "pidfd_getfd",
    "caller_fd",
    "fd_identity",
    "syscall_numbers",
    "merged_filter",
    "dispatch_table",
]

_log = logging.getLogger(__name__)

# linux/seccomp.h
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
NOTIFYING_FILTER_FLAGS = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
# unmodified-apps §4: ioctl numbers measured on this kernel (SECCOMP_IOWR/IOW with type '!')
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2
PIDFD_THREAD = os.O_EXCL  # linux/pidfd.h (6.9+): a pidfd for one thread, not only a thread-group leader

_NOTIF = struct.Struct("<QIIiIQ6Q")  # struct seccomp_notif: id, pid, flags, seccomp_data{nr, arch, ip, args[6]}
_RESP = struct.Struct("<QqiI")  # struct seccomp_notif_resp: id, val, error, flags
_ADDFD = struct.Struct("<QIIII")  # struct seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags
_U64 = struct.Struct("<Q")
# linux/fs.h (6.11+): PROCMAP_QUERY = _IOWR('f', 17, struct procmap_query), a 104-byte struct
_PROCMAP_QUERY_STRUCT = struct.Struct("<QQQQQQQQQIIIIQQ")
PROCMAP_QUERY = 0xC0000000 | (_PROCMAP_QUERY_STRUCT.size << 16) | (ord("f") << 8) | 17
PROCMAP_QUERY_VMA_WRITABLE = 0x02

_SYSCALL_NR = {
    "x86_64": {"pidfd_open": 434, "pidfd_getfd": 438},
    "aarch64": {"pidfd_open": 434, "pidfd_getfd": 438},
}
# A parked notification is checked with ID_VALID this often (unmodified-apps §3.2: a dead caller must not steal a
# connection); the loop never sleeps longer than this.
PARK_CHECK_INTERVAL = 0.2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int


def _nr(name: str) -> int:
    try:
        return _SYSCALL_NR[platform.machine()][name]
    except KeyError:
        raise SeccompError(f"no system-call number for {name} on {platform.machine()}") from None


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def syscall_numbers(flt: SeccompFilter, names: Iterable[str]) -> dict[int, str]:
    """``{number: name}`` of ``names`` on the filter's architecture (what a notification's ``nr`` is)."""
    return {flt.number(name): name for name in names}


@dataclass(frozen=True)
class Notification:
    """One received ``struct seccomp_notif``: the call of thread ``pid`` (in the supervisor's pid namespace)."""

    id: int
    pid: int
    flags: int
    nr: int
    arch: int
    instruction_pointer: int
    args: tuple[int, int, int, int, int, int]

    @classmethod
    def from_bytes(cls, data: bytes) -> Notification:
        if len(data) != _NOTIF.size:
            raise ValueError(f"struct seccomp_notif is {_NOTIF.size} bytes, got {len(data)}")
        nid, pid, flags, nr, arch, ip, *args = _NOTIF.unpack(data)
        a0, a1, a2, a3, a4, a5 = args
        return cls(nid, pid, flags, nr, arch, ip, (a0, a1, a2, a3, a4, a5))


class NotificationListener:
    """The listener fd of a notifying filter.  Methods are safe to call from several threads (own buffers)."""

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError("listener fd must be >= 0")
        self._fd = fd
        # answers also come from worker threads (a vsock connect): closing must not race an ioctl on a
        # recycled fd number
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Close the listener (idempotent): the kernel then answers every pending and later call ``ENOSYS``."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # fcntl.ioctl (C) rather than ctypes: a notification costs 4 of these, and fcntl's are several us cheaper

    def set_sync_wakeup(self) -> bool:
        """Ask for synchronous wake-ups (unmodified-apps §2.3; kernel 6.6+).  False when the kernel lacks it."""
        try:
            # the flag is passed by value, not through a pointer (§4)
            fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        except OSError:
            return False
        return True

    def recv(self) -> Notification:
        """The next notification (blocks); OSError(ENOENT) when its caller died before it could be read."""
        buf = bytearray(_NOTIF.size)  # §2.1 step 1: the buffer must be zeroed
        fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        return Notification.from_bytes(bytes(buf))

    def id_valid(self, notification_id: int) -> bool:
        """Whether the caller of ``notification_id`` still waits for the answer (§2.1 step 3)."""
        with self._lock:
            if self._fd < 0:
                return False
            try:
                fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_ID_VALID, _U64.pack(notification_id))
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return False
                raise
        return True

    def _send(self, notification_id: int, value: int, error: int, flags: int) -> bool:
        with self._lock:
            if self._fd < 0:
                return False  # closed: the kernel answered ENOSYS
            try:
                fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_SEND, _RESP.pack(notification_id, value, error, flags))
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return False  # the caller was killed meanwhile: nothing to answer
                raise
        return True

    def respond(self, notification_id: int, value: int = 0) -> bool:
        """Complete the call with return value ``value``.  False when the caller is gone."""
        return self._send(notification_id, value, 0, 0)

    def fail(self, notification_id: int, error: int) -> bool:
        """Complete the call with ``-1`` and ``errno = error`` (a positive errno number)."""
        if not 0 < error < 4096:
            raise ValueError("error must be an errno number 1..4095")
        return self._send(notification_id, 0, -error, 0)

    def continue_call(self, notification_id: int) -> bool:
        """Let the kernel run the call as if unfiltered (``FLAG_CONTINUE``: not a security decision, §5)."""
        return self._send(notification_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def add_fd(self, notification_id: int, fd: int, *, cloexec: bool = False, send: bool = True) -> int:
        """Install a copy of our ``fd`` in the caller; with ``send`` the call returns that fd number, atomically."""
        flags = SECCOMP_ADDFD_FLAG_SEND if send else 0
        # fcntl.ioctl with an immutable buffer returns the ioctl's result only through the copied buffer, so
        # the new fd number (the ioctl's return value) needs ctypes
        buf = ctypes.create_string_buffer(
            _ADDFD.pack(notification_id, flags, fd, 0, os.O_CLOEXEC if cloexec else 0), _ADDFD.size)
        with self._lock:
            if self._fd < 0:
                raise OSError(errno.ENOENT, "NOTIF_ADDFD: the listener is closed")
            rc = _libc.ioctl(ctypes.c_int(self._fd), ctypes.c_ulong(SECCOMP_IOCTL_NOTIF_ADDFD), buf)
            if rc < 0:
                _raise_errno("NOTIF_ADDFD")
        return int(rc)


class TargetMemory:
    """The address space of a notified caller, pinned when this object is made.

    ``/proc/TID/mem`` is opened read-write here: create the object *before* the ``ID_VALID`` check (§2.1 step 3)
    and every later read or write reaches the caller's address space, whatever happens to the TID (a caller
    SIGKILLed meanwhile only makes them fail: its memory is gone).  A write first checks that each target page is
    writable by the caller, because ``/proc/TID/mem`` writes through read-only pages (§5) where the kernel's
    ``copy_to_user`` gives ``EFAULT``.  The check uses ``/proc/TID/maps`` opened at the first write (it only
    decides the errno: the write itself goes through the pinned fd).  Every failure is ``OSError(EFAULT)``.
    """

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self._fd = os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)
        self._maps = -1

    def close(self) -> None:
        for fd in (self._fd, self._maps):
            if fd >= 0:
                os.close(fd)
        self._fd = self._maps = -1

    def __enter__(self) -> TargetMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, address: int, size: int) -> bytes:
        if size < 0:
            raise ValueError("size must be >= 0")
        if size == 0:
            return b""
        if address == 0 or address + size > 1 << 64:
            raise OSError(errno.EFAULT, "bad address")
        try:
            data = os.pread(self._fd, size, address)
        except (OSError, OverflowError) as exc:
            raise OSError(errno.EFAULT, "bad address") from exc
        if len(data) != size:
            raise OSError(errno.EFAULT, "bad address")
        return data

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def write(self, address: int, data: bytes) -> None:
        self.write_many([(address, data)])

    def write_many(self, pieces: Sequence[tuple[int, bytes]]) -> None:
        """Write each ``(address, data)`` in order; EFAULT (and nothing written) if any byte is not writable."""
        pieces = [(a, bytes(d)) for a, d in pieces if d]
        if not pieces:
            return
        for address, data in pieces:
            if address == 0 or address + len(data) > 1 << 64:
                raise OSError(errno.EFAULT, "bad address")
        for address, data in pieces:
            self._check_writable(address, address + len(data))
        for address, data in pieces:
            try:
                written = os.pwrite(self._fd, data, address)
            except (OSError, OverflowError) as exc:
                raise OSError(errno.EFAULT, "bad address") from exc
            if written != len(data):
                raise OSError(errno.EFAULT, "bad address")

    def _check_writable(self, start: int, end: int) -> None:
        if self._maps < 0:
            try:
                self._maps = os.open(f"/proc/{self.tid}/maps", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise OSError(errno.EFAULT, "bad address") from exc
        address = start
        while address < end:
            vma_end = self._writable_vma_end(address)
            if vma_end is None:
                raise OSError(errno.EFAULT, "bad address")
            address = vma_end

    def _writable_vma_end(self, address: int) -> int | None:
        """End of the writable mapping that covers ``address``; None when no writable mapping covers it."""
        query = bytearray(_PROCMAP_QUERY_STRUCT.pack(_PROCMAP_QUERY_STRUCT.size, PROCMAP_QUERY_VMA_WRITABLE,
                                                     address, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        try:
            fcntl.ioctl(self._maps, PROCMAP_QUERY, query, True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None  # nothing writable covers it
            if exc.errno not in (errno.ENOTTY, errno.EINVAL):
                raise OSError(errno.EFAULT, "bad address") from exc
            return _writable_vma_end_from_text(self._maps, address)  # kernels before 6.11
        vma_start, vma_end = _PROCMAP_QUERY_STRUCT.unpack(query)[3:5]
        return int(vma_end) if vma_start <= address < vma_end else None


def _writable_vma_end_from_text(maps_fd: int, address: int) -> int | None:
    """The maps text's answer for :meth:`TargetMemory._writable_vma_end` (``start-end perms ...`` lines)."""
    chunks = []
    offset = 0
    while chunk := os.pread(maps_fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    for line in b"".join(chunks).splitlines():
        span, _, rest = line.partition(b" ")
        low, _, high = span.partition(b"-")
        try:
            vma_start, vma_end = int(low, 16), int(high, 16)
        except ValueError:
            continue
        if vma_start <= address < vma_end:
            return vma_end if rest[1:2] == b"w" else None
    return None


def pidfd_open(pid: int) -> int:
    """A pidfd of thread ``pid`` (``PIDFD_THREAD``).

    Kernels before 6.9 lack ``PIDFD_THREAD`` and give pidfds of thread-group leaders only: there the pidfd is the
    one of the thread's group (``Tgid`` in ``/proc/TID/status``), which shares the fd table ``pidfd_getfd``
    reads.  Check ``ID_VALID`` after this call: it proves the TID still named the caller when the pidfd was made.
    """
    rc = _libc.syscall(ctypes.c_long(_nr("pidfd_open")), ctypes.c_long(pid), ctypes.c_long(PIDFD_THREAD))
    if rc < 0 and ctypes.get_errno() == errno.EINVAL:
        rc = _libc.syscall(ctypes.c_long(_nr("pidfd_open")), ctypes.c_long(pid), ctypes.c_long(0))
        # not a thread-group leader: EINVAL before 6.9 (ENOENT on recent kernels)
        if rc < 0 and ctypes.get_errno() in (errno.EINVAL, errno.ENOENT):
            tgid = _thread_group(pid)
            if tgid is not None and tgid != pid:
                rc = _libc.syscall(ctypes.c_long(_nr("pidfd_open")), ctypes.c_long(tgid), ctypes.c_long(0))
    if rc < 0:
        _raise_errno("pidfd_open")
    return int(rc)


def _thread_group(tid: int) -> int | None:
    """``Tgid`` of ``/proc/TID/status``; None when the thread is gone."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A new fd here for the caller's ``target_fd``: the same open file description (close-on-exec)."""
    rc = _libc.syscall(ctypes.c_long(_nr("pidfd_getfd")), ctypes.c_long(pidfd), ctypes.c_long(target_fd),
                       ctypes.c_long(0))
    if rc < 0:
        _raise_errno("pidfd_getfd")
    return int(rc)


def caller_fd(listener: NotificationListener, notification: Notification, fd: int) -> int:
    """A copy of the caller's ``fd``, taken once: ``pidfd_open`` → ``ID_VALID`` → ``pidfd_getfd`` (§2.1 step 2).

    The copy is the open file description the caller's fd named at that moment; decide from ``fstat`` of the
    copy, never from an earlier look at ``/proc/PID/fd`` (the caller may ``dup2`` something else over it
    meanwhile).  The caller of this function owns (and must close) the result.  ``OSError(ESRCH)`` when the
    caller is gone, ``OSError(EBADF)`` when the fd is not open.
    """
    if fd < 0 or fd > 0x7FFFFFFF:
        raise OSError(errno.EBADF, "bad file descriptor")
    try:
        pidfd = pidfd_open(notification.pid)
    except OSError as exc:
        raise OSError(errno.ESRCH, "the caller is gone") from exc
    try:
        if not listener.id_valid(notification.id):
            raise OSError(errno.ESRCH, "the caller is gone")
        try:
            return pidfd_getfd(pidfd, fd)
        except OSError as exc:
            raise OSError(errno.EBADF, "bad file descriptor") from exc
    finally:
        os.close(pidfd)


def fd_identity(pid: int, fd: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the caller's ``fd`` (§2.1 step 2), None if it is not open."""
    if fd < 0 or fd > 0x7FFFFFFF:
        return None
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------------------------------------- installation


def install_notifying_filter(flt: SeccompFilter) -> int:
    """In the child, last before ``exec``: install ``flt`` as a notifying filter; return the listener fd."""
    return install_filter(flt.compile(), arch=flt.arch, flags=flt.flags | NOTIFYING_FILTER_FLAGS)


def send_listener(sock: socket.socket, fd: int) -> None:
    """Child side: hand the listener fd to the supervisor (``SCM_RIGHTS``)."""
    socket.send_fds(sock, [b"L"], [fd])


def receive_listener(sock: socket.socket, timeout: float | None = 10.0) -> NotificationListener:
    """Supervisor side: the listener fd sent with :func:`send_listener`."""
    sock.settimeout(timeout)
    try:
        msg, fds, _, _ = socket.recv_fds(sock, 1, 1)
    except TimeoutError as exc:
        raise SeccompError("the sandboxed child did not send its seccomp listener") from exc
    if msg != b"L" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise SeccompError("the sandboxed child did not send its seccomp listener")
    return NotificationListener(fds[0])


# ---------------------------------------------------------------------------------------------- the loop


def merged_filter(handlers: Sequence[NotificationHandler], base: SeccompFilter | None = None) -> SeccompFilter:
    """The sandbox's one filter: the handlers' rules ahead of the base policy's refusals (unmodified-apps §5)."""
    flt = sandbox_filter() if base is None else base
    rules = [rule for handler in handlers for rule in handler.rules()]
    return flt.with_rules(rules, first=True)


def dispatch_table(flt: SeccompFilter, handlers: Sequence[NotificationHandler]
                   ) -> dict[int, tuple[str, NotificationHandler]]:
    table: dict[int, tuple[str, NotificationHandler]] = {}
    for handler in handlers:
        for name in handler.syscalls():
            nr = flt.number(name)
            if nr in table:
                raise ValueError(f"two handlers serve {name}")
            table[nr] = (name, handler)
    return table



class NotificationHandler(Protocol):
    """Serves some system calls: the rules it adds to the filter and what it does with each notification."""

    def rules(self) -> list[SyscallRule]: ...

    def syscalls(self) -> tuple[str, ...]: ...

    def handle(self, server: NotificationServer, notification: Notification, name: str) -> None: ...


@dataclass
class _Parked:
    notification: Notification
    fd: int
    events: int
    on_ready: Callable[[], None]
    on_cancel: Callable[[str], None]
    deadline: float | None


class NotificationServer:
    """One sandbox's notification loop (one thread).  Handlers are looked up by system-call number.

    A notification whose number has no handler is answered ``ENOSYS`` (fail safe: never ``CONTINUE`` by
    default).  :meth:`run` returns when every filtered task has exited (the listener hangs up) or :meth:`stop`.
    """

    def __init__(self, listener: NotificationListener, handlers: Mapping[int, tuple[str, NotificationHandler]],
                 *, sync_wakeup: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.listener = listener
        self._handlers = dict(handlers)
        self._clock = clock
        self._parked: dict[int, _Parked] = {}  # by fd
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poller = select.poll()
        self._poller.register(listener.fileno(), select.POLLIN)
        self._poller.register(self._stop_r, select.POLLIN)
        self._stopped = threading.Event()
        self.sync_wakeup = listener.set_sync_wakeup() if sync_wakeup else False
        self.served = 0

    def stop(self) -> None:
        """Ask :meth:`run` to return (from any thread)."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def close(self) -> None:
        for parked in list(self._parked.values()):
            self.unpark(parked.fd)
            self._cancel(parked, "the supervisor stopped")
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ---- parking: a notification that waits for an fd of ours

    def park(self, notification: Notification, fd: int, events: int, on_ready: Callable[[], None], *,
             on_cancel: Callable[[str], None], timeout: float | None = None) -> None:
        """Call ``on_ready`` when ``fd`` polls ``events``; ``on_cancel(reason)`` on timeout or a dead caller."""
        if fd in self._parked:
            raise RuntimeError(f"fd {fd} is already parked")
        deadline = None if timeout is None else self._clock() + timeout
        self._parked[fd] = _Parked(notification, fd, events, on_ready, on_cancel, deadline)
        self._poller.register(fd, events)

    def unpark(self, fd: int) -> None:
        if fd in self._parked:
            del self._parked[fd]
            self._poller.unregister(fd)

    # ---- the loop

    def run(self) -> None:
        lfd = self.listener.fileno()
        last_check = self._clock()
        try:
            while not self._stopped.is_set():
                timeout_ms = int(PARK_CHECK_INTERVAL * 1000) if self._parked else -1
                try:
                    events = self._poller.poll(timeout_ms)
                except InterruptedError:
                    continue
                for fd, mask in events:
                    if fd == self._stop_r:
                        return
                    if fd == lfd:
                        if mask & select.POLLIN:
                            self._receive_one()
                        elif mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                            return  # every filtered task has exited
                        continue
                    ready = self._parked.get(fd)
                    if ready is not None:
                        self.unpark(fd)
                        self._run_parked(ready)
                if self._parked:
                    now = self._clock()
                    if now - last_check >= PARK_CHECK_INTERVAL or any(
                            p.deadline is not None and p.deadline <= now for p in self._parked.values()):
                        last_check = now
                        self._check_parked(now)
        finally:
            # fail safe however the loop ends (§3.4): with the listener closed the kernel answers every pending
            # and later notified call ENOSYS instead of leaving the caller blocked for ever
            try:
                self.close()
            finally:
                self.listener.close()

    def _receive_one(self) -> None:
        try:
            notification = self.listener.recv()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return  # the caller was killed between poll and recv
            raise
        self.served += 1
        entry = self._handlers.get(notification.nr)
        if entry is None:
            self.listener.fail(notification.id, errno.ENOSYS)
            return
        name, handler = entry
        try:
            handler.handle(self, notification, name)
        except Exception:
            # a handler bug must fail the call, not leave the caller blocked forever
            _log.exception("seccomp handler for %s failed", name)
            with contextlib.suppress(OSError):
                self.listener.fail(notification.id, errno.EIO)

    def _run_parked(self, parked: _Parked) -> None:
        try:
            parked.on_ready()
        except Exception:
            _log.exception("parked seccomp notification failed")
            with contextlib.suppress(OSError):
                self.listener.fail(parked.notification.id, errno.EIO)

    def _check_parked(self, now: float) -> None:
        for parked in list(self._parked.values()):
            if not self.listener.id_valid(parked.notification.id):
                self.unpark(parked.fd)
                self._cancel(parked, "the caller is gone")
            elif parked.deadline is not None and parked.deadline <= now:
                self.unpark(parked.fd)
                self._cancel(parked, "timeout")

    def _cancel(self, parked: _Parked, reason: str) -> None:
        try:
            parked.on_cancel(reason)
        except Exception:
            _log.exception("cancelling a parked seccomp notification failed")
            with contextlib.suppress(OSError):
                self.listener.fail(parked.notification.id, errno.EIO)
