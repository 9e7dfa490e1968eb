"""The sandbox's launcher and PID 1 (``python -m enclavekit.runtime._sandbox_init CTL_FD STATUS_FD``).

Started by :meth:`enclavekit.runtime.sandbox.Sandbox.start`, which has already put this process into the enclave's
cgroup.  It talks to its parent over two pipes: the parent sends the spec (one JSON line) and ``go`` lines on
CTL_FD; this process reports each stage as one JSON line on STATUS_FD.

Launcher (host PID namespace):
  1. ``unshare(NEWUSER|NEWNS|NEWNET|NEWIPC|NEWUTS|NEWCGROUP|NEWPID)``; report ``unshared``; the parent writes the
     uid/gid maps (a process cannot map ids other than its own from inside);
  2. make every mount private, mount the size-limited tmpfs root on the stage directory, bring ``lo`` up, set the
     host name; report ``mounted``; the parent fills the root through ``/proc/PID/root`` and answers ``go``;
  3. bind the device nodes and sockets into the root; fork PID 1; report ``pid1`` with its host PID; wait for it
     and exit with its status.
PID 1 (new PID namespace): mount ``/proc``, ``pivot_root`` into the tmpfs and detach the old root, apply the
seccomp filter (last), fork the application (``setgroups/setgid/setuid``, ``execvpe``), report ``running`` (or
the exec error), then reap zombies, forward SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 and exit with the
application's status (128 + signal number when it was killed).

Everything this module needs is imported before ``pivot_root``: after it no host file is reachable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
from typing import IO, Any, NoReturn

from enclavekit.runtime.seccomp import install_filter

__all__ = ["main"]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_RDONLY = 1
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
DEVICES = ("null", "zero", "random", "urandom", "full")
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs", "acpi", "asound", "scsi")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "kallsyms", "kmsg")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

_libc = ctypes.CDLL(None, use_errno=True)


class _StageError(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise _StageError(f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or ''} on {target}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _pivot_root(new_root: str, put_old: str) -> None:
    nr = _PIVOT_ROOT[os.uname().machine]
    _check(_libc.syscall(ctypes.c_long(nr), new_root.encode(), put_old.encode()), "pivot_root")


def _umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def _set_pdeathsig() -> None:
    _check(_libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl(PR_SET_PDEATHSIG)")


def _loopback_up() -> None:
    # The new network namespace holds only `lo`, down.  `ip` is not available here, so use SIOCSIFFLAGS.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _inside(stage: str, path: str) -> str:
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or any(p in (".", "..") for p in parts):
        raise _StageError(f"path inside the sandbox must be absolute and canonical: {path!r}")
    return os.path.join(stage, *parts)


def _read_only(target: str) -> None:
    # A bind mount becomes read-only with a second, remounting call.
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _bind_file(source: str, target: str, *, nodev: bool = True) -> None:
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    _mount(source, target, None, MS_BIND)
    # Read-only: with the identity id map, inside root owns these host inodes and could chmod/chown them.
    # Opening a device node or connecting to a socket works on a read-only mount.
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC | (MS_NODEV if nodev else 0)
    _mount(None, target, None, flags)


def _harden_proc(proc: str, dev_null: str) -> None:
    """Make the host-wide kernel knobs of /proc read-only and mask the leaky files (as container runtimes do).

    Needed because inside root is the kernel's global uid 0 (identity map): /proc/sys and /proc/sysrq-trigger
    check the uid, not a capability.  seccomp then forbids undoing these mounts.
    """
    for name in PROC_READ_ONLY:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _read_only(path)
    for name in PROC_MASKED:
        path = os.path.join(proc, name)
        if os.path.isfile(path):
            _mount(dev_null, path, None, MS_BIND)
            _read_only(path)


class _Channel:
    def __init__(self, ctl: IO[bytes], status: IO[bytes]) -> None:
        self.ctl = ctl
        self.status = status

    def report(self, **fields: Any) -> None:
        self.status.write(json.dumps(fields).encode() + b"\n")
        self.status.flush()

    def await_go(self) -> None:
        line = self.ctl.readline()
        if line.strip() != b"go":
            raise _StageError(f"the parent stopped the set-up ({line[:40]!r})")


def _launch(spec: dict[str, Any], chan: _Channel) -> NoReturn:
    stage: str = spec["stage"]
    # 1. new namespaces; the parent writes our uid/gid maps
    _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
             | CLONE_NEWPID)
    chan.report(stage="unshared")
    chan.await_go()
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # 2. private mounts; the memory-only root; lo; host name
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(spec['tmpfs_size'])},mode=0755")
    _loopback_up()
    socket.sethostname(spec["hostname"])
    chan.report(stage="mounted")
    chan.await_go()
    # 3. the only host paths the sandbox sees: device nodes and channel sockets (bind mounts must come from
    #    mounts of our own mount namespace, so they are looked up here, after unshare); then PID 1
    for name in DEVICES:
        _bind_file(f"/dev/{name}", _inside(stage, f"/dev/{name}"), nodev=False)
    for host, inside in spec["sockets"]:
        _bind_file(host, _inside(stage, inside))
    os.makedirs(_inside(stage, "/proc"), mode=0o755, exist_ok=True)
    scratch = _inside(stage, "/tmp")  # noqa: S108 - the sandbox's own /tmp, inside its tmpfs
    os.makedirs(scratch, exist_ok=True)
    os.chmod(scratch, 0o1777)  # noqa: S103 - a /tmp is world-writable and sticky
    program = bytes.fromhex(spec["seccomp"])
    pid = os.fork()
    if pid == 0:
        try:
            _pid1(spec, chan, program)
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                chan.report(stage="error", error=f"PID 1: {exc}")
            os._exit(125)
    chan.report(stage="pid1", pid=pid)
    chan.status.close()
    chan.ctl.close()
    while True:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)


def _pid1(spec: dict[str, Any], chan: _Channel, program: bytes) -> NoReturn:
    _set_pdeathsig()  # the launcher's death ends the namespace
    stage: str = spec["stage"]
    _mount("proc", _inside(stage, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _harden_proc(_inside(stage, "/proc"), _inside(stage, "/dev/null"))
    old = _inside(stage, "/.oldroot")
    os.mkdir(old, 0o700)
    _pivot_root(stage, old)
    os.chdir("/")
    _umount2("/.oldroot", MNT_DETACH)
    os.rmdir("/.oldroot")
    os.chdir(spec["workdir"])
    # seccomp last: after it no mount, unshare or pivot_root is possible, for PID 1 too.
    install_filter(program, flags=int(spec["seccomp_flags"]))
    err_r, err_w = os.pipe()  # close-on-exec: EOF means the exec succeeded
    app = os.fork()
    if app == 0:
        try:
            os.close(err_r)
            os.setgroups([])
            os.setgid(int(spec["gid"]))
            os.setuid(int(spec["uid"]))
            if spec["cpu_ids"]:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, spec["cpu_ids"])
            os.execvpe(spec["argv"][0], spec["argv"], spec["env"])  # noqa: S606 - no shell, by design
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                os.write(err_w, f"cannot start {spec['argv'][0]!r}: {exc}".encode()[:4000])
        os._exit(127)
    os.close(err_w)
    failure = os.read(err_r, 4096)
    os.close(err_r)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(app, signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    if failure:
        chan.report(stage="error", error=failure.decode(errors="replace"), boot=True)
    else:
        chan.report(stage="running")
    chan.status.close()
    chan.ctl.close()
    while True:  # PID 1 reaps every orphan; it leaves when the application does
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(127)
        if pid == app:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def main(argv: list[str]) -> NoReturn:
    if len(argv) != 3:
        sys.stderr.write("usage: python -m enclavekit.runtime._sandbox_init CTL_FD STATUS_FD\n")
        os._exit(2)
    _set_pdeathsig()
    chan = _Channel(os.fdopen(int(argv[1]), "rb"), os.fdopen(int(argv[2]), "wb"))
    try:
        spec = json.loads(chan.ctl.readline())
        if os.getppid() != int(spec["parent_pid"]):
            raise _StageError("the parent exited before the sandbox started")
        _launch(spec, chan)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            chan.report(stage="error", error=f"{type(exc).__name__}: {exc}")
        os._exit(125)


if __name__ == "__main__":
    main(sys.argv)
