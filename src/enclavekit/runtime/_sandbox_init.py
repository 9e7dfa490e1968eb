"""The sandbox's launcher and PID 1: forked from the supervisor (:func:`run_forked`, the default) or started as
``python -m enclavekit.runtime._sandbox_init CTL_FD STATUS_FD``.

Started by :meth:`enclavekit.runtime.sandbox.Sandbox.start`, which has already put this process into the enclave's
cgroup.  It talks to its parent over two pipes: the parent sends the spec (one JSON line) and ``go`` lines on
CTL_FD; this process reports each stage as one JSON line on STATUS_FD.

Launcher (host PID namespace):
  1. ``unshare(NEWUSER|NEWNS|NEWNET|NEWIPC|NEWUTS|NEWCGROUP|NEWPID)``; report ``unshared``; the parent writes the
     uid/gid maps (a process cannot map ids other than its own from inside);
  2. make every mount private, mount the size-limited tmpfs root on the stage directory, bring ``lo`` up, set the
     host name; the forked launcher fills the root itself (inside the enclave's cgroup, so its pages are charged
     to the enclave) and reports ``mounted`` with ``populated``; for the exec'd one the parent fills it through
     ``/proc/PID/root``; the parent answers ``go``;
  3. bind the device nodes, sockets and directories into the root; fork PID 1; report ``pid1`` with its host PID;
     wait for it and exit with its status.
PID 1 (new PID namespace): connect to the boot heartbeat listener (when the spec names one; a host path, so
before ``pivot_root``), mount ``/proc``, ``pivot_root`` into the tmpfs and detach the old root, apply the seccomp
filter (last; with device emulation the filter's listener fd goes to the parent on ``notify_fd``, see
docs/unmodified-apps.md), fork the application (``setgroups/setgid/setuid``, ``execvpe``; a close-on-exec pipe
tells PID 1 that the exec succeeded), wait for the application's *boot* to end (below), report ``running`` (or the exec
error, or the exit at boot), send the heartbeat, then reap zombies, forward
SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 and exit with the application's status (128 + signal number when it
was killed).

Boot window (docs/runtime.md "Boot and the heartbeat"): the application has booted when it first *waits* (its
``/proc/PID/stat`` state is ``S``: it blocks in accept, read, poll, pause, a lock...), or after
:data:`BOOT_BUSY_LIMIT` seconds of never waiting; it failed at boot when it exits before that.  This is a
property of the application, not a guessed delay: a program that exits at once is always caught, and a server is
reported up as soon as it waits for its first request.

Heartbeat (spec §3.8, nitro-cli's init): on the connection made before ``pivot_root`` to the enclave's own
(3, 9000) listener, PID 1 does Firecracker's handshake (``CONNECT 9000\n`` / ``OK <port>\n``), writes 0xB7 and
requires 0xB7 back.  The connection is close-on-exec and the listener is not visible inside, so the application
can neither see nor fake it.  When the heartbeat fails PID 1 says so on the console and ends the enclave.

Everything this module needs is imported before ``pivot_root``: after it no host file is reachable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from typing import IO, Any, NoReturn

from enclavekit.runtime.seccomp import install_filter
from enclavekit.vsock.protocol import run_connector

__all__ = ["main", "run_forked", "BOOT_BUSY_LIMIT", "HEARTBEAT_BYTE", "HEARTBEAT_PORT"]

# §3.8: init writes 0xB7 to (3, 9000) and expects it echoed.
HEARTBEAT_BYTE = 0xB7
HEARTBEAT_PORT = 9000
# An application that has not waited once after this many seconds of running counts as booted (a busy start).
BOOT_BUSY_LIMIT = 2.0

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
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "kallsyms", "kmsg", "kpageflags",
               "kpagecount", "kpagecgroup", "sysrq-trigger")
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


_SYMLINK_HOPS = 40  # as the kernel's ELOOP limit


def _inside(stage: str, path: str) -> str:
    """The host path of ``path`` in the root at ``stage``, every symlink on the way resolved *inside* that root.

    The tree comes from the image, and the launcher works on it as root with the host's filesystem still visible:
    a symlink ``/tmp -> /etc`` in an image must not make the launcher chmod the host's ``/etc``.  So each existing
    component is looked at with ``lstat``; a symlink is followed the way the sandbox will see it after
    ``pivot_root`` (an absolute target starts again at ``stage``, ``..`` stops at it).  The result has no symlink
    in any existing component; components that do not exist yet are kept as they are (whoever creates them makes
    real directories and files).  Nothing else writes to the root while the launcher sets it up.
    """
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or any(p in (".", "..") for p in parts):
        raise _StageError(f"path inside the sandbox must be absolute and canonical: {path!r}")
    pending = list(reversed(parts))
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(stage, *resolved, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            # missing: kept as it is; what follows is still resolved here (a '..' from a symlink's target after a
            # missing component must not reach the kernel: it would climb out of the root on the host)
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _SYMLINK_HOPS:
                raise _StageError(f"too many symlinks resolving {path!r} in the image")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending.extend(reversed(target.split("/")))
            continue
        resolved.append(part)
    return os.path.join(stage, *resolved)


def _read_only(target: str) -> None:
    # A bind mount becomes read-only with a second, remounting call.
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _bind_file(source: str, target: str, *, nodev: bool = True) -> None:
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
    _mount(source, target, None, MS_BIND)
    # Read-only: with the identity id map, inside root owns these host inodes and could chmod/chown them.
    # Opening a device node or connecting to a socket works on a read-only mount.
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC | (MS_NODEV if nodev else 0)
    _mount(None, target, None, flags)


def _bind_dir(source: str, target: str, *, writable: bool) -> None:
    # The source must be a real directory, not a symlink (it is looked up with the host's root here).
    st = os.lstat(source)
    if not (st.st_mode & 0o170000 == 0o040000):
        raise _StageError(f"{source} is not a directory")
    os.makedirs(target, mode=0o755, exist_ok=True)
    _mount(source, target, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC | (0 if writable else MS_RDONLY)
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


def _overlay_root(stage: str, lower: str) -> None:
    """The shared image tree (read-only) under the enclave's own tmpfs (every write), mounted over ``stage``.

    The upper and work directories live in the tmpfs just mounted on ``stage``; the overlay then covers them, so
    they are reachable only through the overlay.  ``userxattr`` keeps overlayfs's metadata in ``user.`` xattrs, as
    it must inside a user namespace (kernels before 6.6 cannot put those on tmpfs: then without it).  Without
    overlayfs the tree is copied, which is slower but the same root.
    """
    upper, work = os.path.join(stage, ".upper"), os.path.join(stage, ".work")
    os.mkdir(upper, 0o755)
    os.mkdir(work, 0o700)
    base = f"lowerdir={lower},upperdir={upper},workdir={work}"
    for options in (base + ",userxattr", base):
        try:
            _mount("overlay", stage, "overlay", MS_NOSUID | MS_NODEV, options)
            return
        except _StageError:
            continue
    os.rmdir(upper)
    os.rmdir(work)
    _copy_tree(lower, stage)


def _copy_tree(source: str, target: str) -> None:
    """``source``'s tree into ``target`` with modes and owners: regular files, directories, symlinks and FIFOs."""
    for directory, dirs, files in os.walk(source):
        out = os.path.normpath(os.path.join(target, os.path.relpath(directory, source)))
        if directory != source:
            os.mkdir(out, 0o700)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            src, dst = os.path.join(directory, name), os.path.join(out, name)
            info = os.lstat(src)
            if stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISREG(info.st_mode):
                with open(src, "rb") as fin, open(dst, "xb") as fout:
                    while os.sendfile(fout.fileno(), fin.fileno(), None, 1 << 30):
                        pass
                os.chmod(dst, stat.S_IMODE(info.st_mode))
            elif stat.S_ISFIFO(info.st_mode):
                os.mkfifo(dst, stat.S_IMODE(info.st_mode))
            else:
                continue
            os.lchown(dst, info.st_uid, info.st_gid)
        st = os.lstat(directory)
        os.chmod(out, stat.S_IMODE(st.st_mode))
        os.lchown(out, st.st_uid, st.st_gid)


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


def _trace(label: str) -> None:
    """The launcher's phases in ``$ENCLAVEKIT_LAUNCH_TRACE`` (as the supervisor's; never from PID 1 after
    ``pivot_root``, where the file is out of reach)."""
    path = os.environ.get("ENCLAVEKIT_LAUNCH_TRACE")
    if path:
        with contextlib.suppress(OSError), open(path, "a") as fh:
            fh.write(f"{os.getpid()} {time.monotonic():.6f} launcher: {label}\n")


def _set_oom_score_adj(value: int) -> None:
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(value))


def _launch(spec: dict[str, Any], chan: _Channel, populate: Callable[[str], None] | None = None) -> NoReturn:
    stage: str = spec["stage"]
    # When the enclave exceeds its memory limit the OOM killer must take the application, never this launcher or
    # PID 1 (a Python process that can be the largest in the cgroup while the application's allocation is still being
    # charged): both are exempt, set here while we still hold CAP_SYS_RESOURCE; the application is reset to 0 below.
    _set_oom_score_adj(-1000)
    # 1. new namespaces; the parent writes our uid/gid maps
    _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
             | CLONE_NEWPID)
    chan.report(stage="unshared")
    chan.await_go()
    _trace("namespaces")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # 2. private mounts; the memory-only root; lo; host name
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(spec['tmpfs_size'])},mode=0755")
    if spec.get("lower"):
        _overlay_root(stage, str(spec["lower"]))
    _loopback_up()
    socket.sethostname(spec["hostname"])
    if populate is not None:
        # forked launcher: fill the root from here, inside the enclave's cgroup, so that its tmpfs pages are
        # charged to the enclave's memory limit and not to the supervisor's
        populate(stage)
    _trace("root filled")
    chan.report(stage="mounted", populated=populate is not None)
    chan.await_go()
    # 3. the only host paths the sandbox sees: device nodes and channel sockets (bind mounts must come from
    #    mounts of our own mount namespace, so they are looked up here, after unshare); then PID 1
    for name in DEVICES:
        _bind_file(f"/dev/{name}", _inside(stage, f"/dev/{name}"), nodev=False)
    for host, inside in spec["sockets"]:
        _bind_file(host, _inside(stage, inside))
    for host, inside in spec.get("devices", ()):
        _bind_file(host, _inside(stage, inside), nodev=False)  # /dev/nsm (device emulation)
    for host, inside, writable in spec.get("directories", ()):
        _bind_dir(host, _inside(stage, inside), writable=bool(writable))
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
    if spec.get("notify_fd") is not None:
        os.close(int(spec["notify_fd"]))  # PID 1 holds it; the launcher must not
    _trace("PID 1 started")
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
    heartbeat: socket.socket | None = None
    if spec.get("heartbeat"):
        # §3.8: the enclave's (3, 9000).  Connected now, while the host path is reachable; used after the boot.
        heartbeat = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # blocking: the supervisor owns the boot timeout (§3.8) and ends the sandbox when it passes
        heartbeat.connect(spec["heartbeat"])
    _mount("proc", _inside(stage, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _harden_proc(_inside(stage, "/proc"), _inside(stage, "/dev/null"))
    old = _inside(stage, "/.oldroot")
    os.mkdir(old, 0o700)
    _pivot_root(stage, old)
    os.chdir("/")
    _umount2("/.oldroot", MNT_DETACH)
    os.rmdir("/.oldroot")
    os.chdir(spec["workdir"])
    # device emulation: the socket object is made before the filter (its constructor calls getsockname, which
    # the filter sends to a supervisor that does not have the listener yet)
    notify = socket.socket(fileno=int(spec["notify_fd"])) if spec.get("notify_fd") is not None else None
    # seccomp last: after it no mount, unshare or pivot_root is possible, for PID 1 too.
    listener = install_filter(program, flags=int(spec["seccomp_flags"]))
    if notify is not None:
        # unmodified-apps §2.1: the filter's listener goes to the supervisor before the application exists;
        # neither PID 1 nor the application keeps it
        with notify:
            socket.send_fds(notify, [b"L"], [listener])
        os.close(listener)
    err_r, err_w = os.pipe()  # close-on-exec: EOF means the exec succeeded
    app = os.fork()
    if app == 0:
        try:
            os.close(err_r)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)  # an ignored signal would stay ignored across exec
            _set_oom_score_adj(0)  # the application is the one the OOM killer may take
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
        _close_channel(chan)
        _reap_until(app)
    if spec.get("await_boot") and not _await_boot(app):
        _, status = os.waitpid(app, 0)
        code = _status_code(status)
        chan.report(stage="error", error=f"the application exited at boot with status {code}", boot=True,
                    status=code)
        _close_channel(chan)
        os._exit(code)
    chan.report(stage="running")
    _close_channel(chan)
    if heartbeat is not None:
        try:
            _send_heartbeat(heartbeat)
        except Exception as exc:
            with contextlib.suppress(OSError):
                os.write(1, f"[enclavekit] boot heartbeat failed: {exc}\n".encode())
            with contextlib.suppress(ProcessLookupError):
                os.kill(app, signal.SIGKILL)
            _reap_until(app)
    _reap_until(app)


def _close_channel(chan: _Channel) -> None:
    with contextlib.suppress(OSError):
        chan.status.close()
    with contextlib.suppress(OSError):
        chan.ctl.close()


def _status_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _await_boot(app: int) -> bool:
    """True once the application first waits (state ``S``) or has run :data:`BOOT_BUSY_LIMIT` s; False if it exited.

    See the module docstring ("Boot window").  Polls ``/proc/APP/stat`` with a backoff from 0.5 to 10 ms.
    """
    deadline = time.monotonic() + BOOT_BUSY_LIMIT
    delay = 0.0005
    path = f"/proc/{app}/stat"
    while True:
        try:
            with open(path, "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in (b"Z", b"X"):
            return False
        if state == b"S" or time.monotonic() >= deadline:
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def _send_heartbeat(sock: socket.socket) -> None:
    """§3.8 through the vsock emulation: Firecracker's CONNECT/OK, then 0xB7 out and 0xB7 back."""
    with sock:
        run_connector(sock, HEARTBEAT_PORT)
        sock.sendall(bytes([HEARTBEAT_BYTE]))
        echo = sock.recv(1)
        if echo != bytes([HEARTBEAT_BYTE]):
            raise _StageError(f"the parent answered {echo!r} instead of 0xb7")


def _reap_until(app: int) -> NoReturn:
    while True:  # PID 1 reaps every orphan; it leaves when the application does
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(127)
        if pid == app:
            os._exit(_status_code(status))


def run_forked(ctl_fd: int, status_fd: int, populate: Callable[[str], None]) -> NoReturn:
    """The launcher in a child forked from the supervisor (no second interpreter): steps 1-3 above, with the root
    filled by ``populate(stage)`` in this process (already in the enclave's cgroup) instead of by the parent.

    The supervisor has threads; only this one exists here, so nothing below may import a module or take a lock
    another thread could have held at ``fork``: everything needed is imported by the supervisor beforehand.
    """
    gc.disable()  # a collection would write to every object inherited from the supervisor (and charge it here)
    # Python-level handlers of the supervisor (SIGTERM, SIGINT) end with exec; ignored signals would not
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    chan: _Channel | None = None
    try:
        _set_pdeathsig()
        chan = _Channel(os.fdopen(ctl_fd, "rb"), os.fdopen(status_fd, "wb"))
        spec = json.loads(chan.ctl.readline())
        if os.getppid() != int(spec["parent_pid"]):
            raise _StageError("the parent exited before the sandbox started")
        _launch(spec, chan, populate)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            if chan is not None:
                code = getattr(exc, "code", None)
                chan.report(stage="error", error=f"{type(exc).__name__}: {getattr(exc, 'message', exc)}",
                            **({"code": code} if isinstance(code, str) else {}))
    os._exit(125)


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
