"""``/dev/nsm`` for unmodified programs: the driver's single ioctl, answered by the enclave's NSM.

Mechanism (spec unmodified-apps, verdict table): **seccomp user notification** on ``ioctl(fd, 0xC0200A00, arg)``,
not a FUSE file.  Why:

* CUSE is not built on these kernels (§1), so the choice is between a FUSE regular file and seccomp;
* the sandbox needs a notifying filter anyway for AF_VSOCK (a process can hold only one, §5), so NSM and vsock
  share one filter, one listener and one supervisor loop; FUSE would add a second mechanism, a ``/dev/fuse`` fd in
  the sandbox's mount set-up and a regular file where programs expect a character device;
* with ``SYNC_WAKE_UP`` the seccomp round trip is ~13 µs against 70-99 µs for FUSE on this kind of VM (§2.3, §1b);
* the two FUSE advantages do not apply: ``io_uring_setup`` is refused by the filter (so no ioctl bypasses it), and
  ``WAIT_KILLABLE_RECV`` gives the same exactly-once behaviour under signals as FUSE (§2.4).

``/dev/nsm`` inside the sandbox is a character node of its own (a ``/dev/null`` clone, major 1 minor 3, made by
the supervisor and bind-mounted): ``open`` works like on Nitro, and the handler recognises the node by its
``(st_dev, st_ino)``.  An NSM ioctl on any other fd is ``CONTINUE``d, so the kernel answers it (``ENOTTY``).

The handler follows ``drivers/misc/nsm.c`` (spec nsm-attestation-kms §1.1) step by step:

1. copy the 32-byte ``struct nsm_raw`` from ``arg`` (``EFAULT``);
2. ``request.len > 4096`` → ``EMSGSIZE``; copy the request (``EFAULT``);
3. run the request on the NSM, exactly once (``ID_VALID`` just before: a caller killed meanwhile is skipped);
4. copy ``min(response.len, len(response))`` bytes to ``response.addr`` (``EFAULT``; a short buffer silently gets
   truncated CBOR), copy the whole ``struct nsm_raw`` back with that length in ``response.len`` (``EFAULT``);
   return 0.  Memory is read and written through ``/proc/TID/mem`` opened before the ``ID_VALID`` of step 3.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from pathlib import Path

from enclavekit.formats import nsm_messages as msg
from enclavekit.nsm.server import NSMHandler
from enclavekit.runtime.seccomp import USER_NOTIF, ArgMatch, SyscallRule
from enclavekit.runtime.usernotif import (
    Notification,
    NotificationListener,
    NotificationServer,
    TargetMemory,
    fd_identity,
)

__all__ = ["NSM_IOCTL_RAW", "NSM_RAW_SIZE", "NSMDevice", "make_device_node", "prepare_device_node", "DEVICE_MAJOR",
           "DEVICE_MINOR", "HOST_NULL"]

# §1.1: _IOWR(0x0A, 0, struct nsm_raw): dir read|write, size 32, type 0x0A, nr 0
NSM_IOCTL_RAW = 0xC0200A00
NSM_RAW_SIZE = 32
_RAW = struct.Struct("<QQQQ")
# the node is a /dev/null clone: without the supervisor its ioctl gives ENOTTY, reads give EOF
DEVICE_MAJOR = 1
DEVICE_MINOR = 3
HOST_NULL = "/dev/null"


def make_device_node(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Create the character node that becomes ``/dev/nsm`` (mode 0666, as the driver's); return its identity."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        p.unlink()
    os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(DEVICE_MAJOR, DEVICE_MINOR))
    os.chmod(p, 0o666)  # noqa: S103 - /dev/nsm is 0666 on Nitro (spec §1.1)
    st = os.stat(p)
    return st.st_dev, st.st_ino


def prepare_device_node(path: str | os.PathLike[str]) -> tuple[str, tuple[int, int]]:
    """The host node to bind at ``/dev/nsm`` and its identity.

    A node of its own at ``path`` when that filesystem allows device nodes; on a ``nodev`` filesystem (a bind
    mount keeps, and inside a user namespace cannot drop, ``nodev``) the host's ``/dev/null`` itself, whose NSM
    ioctls are then answered too (documented in docs/unmodified-apps.md).
    """
    if not os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_NODEV:
        return os.fspath(path), make_device_node(path)
    st = os.stat(HOST_NULL)
    return HOST_NULL, (st.st_dev, st.st_ino)


class NSMDevice:
    """The ioctl handler.  ``nsm`` answers request bytes; ``identity`` is the node's ``(st_dev, st_ino)``."""

    def __init__(self, nsm: NSMHandler, identity: tuple[int, int]) -> None:
        self._nsm = nsm
        self.identity = identity
        self._lock = threading.Lock()
        self.executed = 0  # requests run on the NSM (the signal tests count them)

    def rules(self) -> list[SyscallRule]:
        # seccomp compares the low 32 bits of args[1]: ``cmd`` is an unsigned int (§2.1)
        return [SyscallRule("ioctl", USER_NOTIF, (ArgMatch(1, NSM_IOCTL_RAW),))]

    def syscalls(self) -> tuple[str, ...]:
        return ("ioctl",)

    def handle(self, server: NotificationServer, notification: Notification, name: str) -> None:
        listener = server.listener
        fd = notification.args[0] & 0xFFFFFFFF
        if fd_identity(notification.pid, fd) != self.identity:
            listener.continue_call(notification.id)  # not our node: the kernel answers (ENOTTY, EBADF...)
            return
        # §2.1 step 3: the caller's memory is pinned (opened) before the ID_VALID that _serve does before running
        # the request, so every read and write reaches the caller even if its TID is recycled afterwards
        try:
            memory = TargetMemory(notification.pid)
        except OSError:
            listener.fail(notification.id, errno.ESRCH)  # gone already: nobody reads the answer
            return
        with memory:
            error = self._serve(listener, notification, memory)
        if error:
            listener.fail(notification.id, error)
        else:
            listener.respond(notification.id, 0)

    def _serve(self, listener: NotificationListener, notification: Notification, memory: TargetMemory) -> int:
        arg = notification.args[2]
        try:
            raw = memory.read(arg, NSM_RAW_SIZE)  # step 1
        except OSError:
            return errno.EFAULT
        req_addr, req_len, resp_addr, resp_cap = _RAW.unpack(raw)
        if req_len > msg.REQUEST_MAX_SIZE:  # step 2
            return errno.EMSGSIZE
        try:
            request = memory.read(req_addr, req_len) if req_len else b""
        except OSError:
            return errno.EFAULT
        with self._lock:  # §1.1: the driver serialises requests with a mutex
            if not listener.id_valid(notification.id):
                return 0  # step 3: killed meanwhile (or not the caller's memory): do not run it
            response = self._nsm.handle(request)
            self.executed += 1
        length = min(resp_cap, len(response))  # step 4
        try:
            # the driver copies the whole struct nsm_raw back (copy_to_user(argp, &raw, sizeof(raw)))
            memory.write_many([(resp_addr, response[:length]),
                               (arg, _RAW.pack(req_addr, req_len, resp_addr, length))])
        except OSError:
            return errno.EFAULT
        return 0
