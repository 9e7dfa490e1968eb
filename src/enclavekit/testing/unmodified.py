"""Run one unmodified program under a notifying seccomp filter, without the rest of the sandbox.

For tests and benchmarks of :mod:`enclavekit.runtime.nsm_device` and :mod:`enclavekit.runtime.vsock_translate`:
the child (forked by :mod:`subprocess`) makes a private mount namespace with a fresh ``/dev`` (``null``, ``zero``,
``full``, ``random``, ``urandom`` and the given extra nodes bind-mounted, e.g. ``/dev/nsm``), installs the
sandbox's base filter merged with the handlers' rules as a notifying filter, hands the listener fd to this process
and execs ``argv``.  This process serves the notifications on a thread.  Must run as root (mounts, mknod).

The enclave runtime does the same inside its sandbox (PID 1 installs the filter); this launcher only exists so the
handlers can be exercised on their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from enclavekit.runtime.seccomp import SeccompFilter
from enclavekit.runtime.usernotif import (
    NotificationHandler,
    NotificationServer,
    dispatch_table,
    install_notifying_filter,
    merged_filter,
    receive_listener,
    send_listener,
)

__all__ = ["NotifiedRun", "notified_process"]

_CLONE_NEWNS = 0x00020000
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_NOSUID = 2
_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}


@dataclass
class NotifiedRun:
    process: subprocess.Popen[bytes]
    server: NotificationServer
    thread: threading.Thread

    def stop_serving(self) -> None:
        """End the supervisor side now (the child's notified calls then fail with ``ENOSYS``)."""
        self.server.stop()
        self.thread.join(timeout=10)
        self.server.listener.close()

    def wait(self, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, err


def _child_setup(flt: SeccompFilter, sock: socket.socket, devices: Mapping[str, str] | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise OSError(ctypes.get_errno(), what)

    if devices is not None:
        check(libc.unshare(ctypes.c_int(_CLONE_NEWNS)), "unshare")
        check(libc.mount(None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None), "mount private")
        # the host nodes are opened (in this namespace) before /dev is replaced: one may itself be in /dev
        sources = {inside: os.open(host, os.O_PATH | os.O_CLOEXEC) for inside, host in devices.items()}
        check(libc.mount(b"tmpfs", b"/dev", b"tmpfs", ctypes.c_ulong(_MS_NOSUID), b"mode=0755"), "mount /dev")
        for name, (major, minor) in _NODES.items():
            os.mknod(f"/dev/{name}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(f"/dev/{name}", 0o666)  # noqa: S103 - the standard modes of these nodes
        for inside, fd in sources.items():
            os.close(os.open(inside, os.O_CREAT | os.O_WRONLY, 0o600))
            check(libc.mount(f"/proc/self/fd/{fd}".encode(), inside.encode(), None, ctypes.c_ulong(_MS_BIND), None),
                  "bind")
            os.close(fd)
    lfd = install_notifying_filter(flt)
    send_listener(sock, lfd)
    os.close(lfd)


@contextlib.contextmanager
def notified_process(argv: Sequence[str], handlers: Sequence[NotificationHandler], *,
                     devices: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
                     base: SeccompFilter | None = None, sync_wakeup: bool = True,
                     **popen: Any) -> Iterator[NotifiedRun]:
    """Start ``argv`` under the merged filter; serve it until the block ends (then kill what is left).

    ``devices`` maps paths inside the child's fresh ``/dev`` to host nodes (``{"/dev/nsm": host_node}``);
    None keeps the host's ``/dev`` (no mount namespace).
    """
    flt = merged_filter(handlers, base)
    table = dispatch_table(flt, handlers)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    try:
        process = subprocess.Popen(
            list(argv), env=None if env is None else dict(env),
            preexec_fn=lambda: _child_setup(flt, child, devices),  # noqa: PLW1509
            **popen)
    finally:
        child.close()
    try:
        listener = receive_listener(parent)
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        parent.close()
    server = NotificationServer(listener, table, sync_wakeup=sync_wakeup)
    thread = threading.Thread(target=server.run, name="seccomp-notif", daemon=True)
    thread.start()
    try:
        yield NotifiedRun(process, server, thread)
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            process.communicate(timeout=10)
        server.stop()
        thread.join(timeout=10)
        listener.close()
