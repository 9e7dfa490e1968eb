"""The enclave sandbox: an application in new namespaces, on a memory-only root, inside a cgroup, under seccomp.

``Sandbox.start(spec)`` creates the cgroup (memory, pids, cpuset limits), forks the launcher
(:mod:`enclavekit.runtime._sandbox_init`; or execs ``python -m enclavekit.runtime._sandbox_init``) into it, answers
its set-up steps (uid/gid maps; the forked launcher fills the tmpfs root itself, from inside the enclave's cgroup),
and returns a :class:`SandboxProcess` once the application has been exec'd.  The application's stdout and
stderr are one pipe, :attr:`SandboxProcess.console`.

User namespace and ids (a documented choice, see docs/sandbox.md): the sandbox gets a NEW user namespace whose map
is the identity (inside uid/gid N = outside N).  Capabilities held inside are capabilities over the sandbox's own
namespaces only: the application cannot load modules, mount host filesystems, change the host's network or
clock.  But inside root *is* uid 0 for ownership checks on any host object it can reach, and the only host objects
it can reach are the bind-mounted channel sockets and the device nodes null, zero, random, urandom and full.  An
unprivileged map would also make those owner checks fail; it needs the root filesystem to be written by an id
mapped inside, and is left for later.

Termination kills PID 1 from outside, which makes the kernel kill every process of the PID namespace; then the
cgroup is emptied and removed and the stage directory is deleted.  Nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from enclavekit._internal.fds import max_fd
from enclavekit.errors import EnclaveKitError, SandboxBootError, SandboxError
from enclavekit.runtime._sandbox_init import run_forked
from enclavekit.runtime.cgroups import Cgroup, CgroupLayout, create_cgroup
from enclavekit.runtime.seccomp import SeccompFilter, sandbox_filter
from enclavekit.runtime.usernotif import (
    NOTIFYING_FILTER_FLAGS,
    NotificationHandler,
    NotificationListener,
    NotificationServer,
    dispatch_table,
    merged_filter,
    receive_listener,
)

__all__ = ["SandboxSpec", "Sandbox", "SandboxProcess", "DEFAULT_PIDS_MAX"]

DEFAULT_PIDS_MAX = 1024
MIB = 1024 * 1024
_ID_MAP = "0 0 4294967295\n"  # identity map of every id (see the module docstring)
_START_TIMEOUT = 30.0


def _canonical_inside(path: str) -> str:
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or any(p in (".", "..") for p in parts):
        raise ValueError(f"a path inside the sandbox must be absolute and canonical, got {path!r}")
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class SandboxSpec:
    """What to run and with which limits.

    ``rootfs`` fills the tmpfs root: a directory whose contents are copied, or a callable given the root's path
    (as seen from the host).  ``sockets`` maps host socket paths to paths inside (bound read-only);
    ``directories`` and ``writable_directories`` map host directories to paths inside (the vsock channel
    directories: the parent's, read-only, and the enclave's own, writable).  These are the only host paths
    visible.  ``heartbeat`` is the host path of the enclave's (3, 9000) listener: PID 1 sends the boot heartbeat
    there (see ``_sandbox_init``); it is not visible inside.  With ``await_boot``, :meth:`Sandbox.start` returns
    only once the application has booted (it first waited), and raises SandboxBootError (E36) when it exits
    before.  ``tmpfs_size_mib`` defaults to half of
    ``memory_mib``.  ``seccomp`` defaults to :func:`~enclavekit.runtime.seccomp.sandbox_filter`.

    Device emulation for unmodified programs (docs/unmodified-apps.md): ``devices`` maps host character-device
    nodes to paths inside (``/dev/nsm``); ``notification_handlers`` (an :class:`~enclavekit.runtime.nsm_device.
    NSMDevice`, a :class:`~enclavekit.runtime.vsock_translate.VsockTranslator`) add their seccomp user-notification
    rules ahead of the policy's refusals in the sandbox's one filter, and :meth:`Sandbox.start` serves them on a
    thread of the calling process until the sandbox ends.

    CPU pinning: ``cpu_ids`` go to the cgroup's ``cpuset.cpus`` when the cpuset controller is there (always on v1);
    on cgroup v2 without it only ``sched_setaffinity`` remains, which the application can undo.
    :attr:`SandboxProcess.cpu_pinning` says which one holds; ``require_cpuset`` turns the fallback into a
    SandboxError.

    ``inherit_fds``: descriptors the ``rootfs`` callable reads from (the supervisor's open EIF).  A forked launcher
    keeps them open for the callable and closes them as soon as the root is filled, before PID 1 exists.

    ``lower``: a host directory holding the image's tree (:mod:`~enclavekit.runtime.image_store`).  The root is then
    an overlay: that tree read-only below, the sandbox's tmpfs above taking every write; ``rootfs`` still runs, on
    top.  Nobody may change the directory while the sandbox runs.
    """

    argv: tuple[str, ...]
    rootfs: Path | Callable[[Path], None]
    memory_mib: int
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/"
    uid: int = 0
    gid: int = 0
    cpu_ids: tuple[int, ...] | None = None
    pids_max: int = DEFAULT_PIDS_MAX
    tmpfs_size_mib: int | None = None
    sockets: Mapping[str, str] = field(default_factory=dict)
    directories: Mapping[str, str] = field(default_factory=dict)
    writable_directories: Mapping[str, str] = field(default_factory=dict)
    heartbeat: str | None = None
    await_boot: bool = False
    hostname: str = "enclave"
    seccomp: SeccompFilter | None = None
    name: str | None = None
    devices: Mapping[str, str] = field(default_factory=dict)
    notification_handlers: tuple[NotificationHandler, ...] = ()
    require_cpuset: bool = False
    inherit_fds: tuple[int, ...] = ()
    lower: str | None = None

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) and "\0" not in a for a in self.argv):
            raise ValueError("argv must be a non-empty sequence of strings without NUL")
        if type(self.memory_mib) is not int or self.memory_mib <= 0:
            raise ValueError("memory_mib must be a positive int")
        if type(self.pids_max) is not int or self.pids_max < 4:
            raise ValueError("pids_max must be an int >= 4 (launcher, PID 1, the application, one more)")
        if self.tmpfs_size_mib is not None and (type(self.tmpfs_size_mib) is not int or self.tmpfs_size_mib <= 0):
            raise ValueError("tmpfs_size_mib must be a positive int")
        if not all(0 <= v < 65536 for v in (self.uid, self.gid)):
            raise ValueError("uid and gid must be in 0..65535")
        _canonical_inside(self.workdir)
        for host, inside in self.sockets.items():
            if not os.path.isabs(host):
                raise ValueError(f"socket host path must be absolute: {host!r}")
            _canonical_inside(inside)
        for host, inside in (*self.directories.items(), *self.writable_directories.items()):
            if not os.path.isabs(host):
                raise ValueError(f"directory host path must be absolute: {host!r}")
            if _canonical_inside(inside) == "/":
                raise ValueError("a host directory cannot become the sandbox's root")
        if self.heartbeat is not None and not os.path.isabs(self.heartbeat):
            raise ValueError(f"heartbeat must be an absolute host path: {self.heartbeat!r}")
        if self.lower is not None and (not os.path.isabs(self.lower) or "," in self.lower or ":" in self.lower):
            raise ValueError(f"lower must be an absolute host path without ',' or ':': {self.lower!r}")
        if not isinstance(self.rootfs, Path) and not callable(self.rootfs):
            raise TypeError("rootfs must be a Path or a callable(root: Path)")
        for host, inside in self.devices.items():
            if not os.path.isabs(host):
                raise ValueError(f"device host path must be absolute: {host!r}")
            if not _canonical_inside(inside).startswith("/dev/"):
                raise ValueError(f"a device goes under /dev inside the sandbox, got {inside!r}")
        if not self.hostname or len(self.hostname) > 64:
            raise ValueError("hostname must be 1..64 characters")


class SandboxProcess:
    """A running sandbox.  Use as a context manager, or call :meth:`close` when done (it kills what is left)."""

    def __init__(self, name: str, proc: _Launcher, cgroup: Cgroup, stage: Path) -> None:
        self.name = name
        self.cgroup = cgroup
        self.stage = stage
        self.init_pid: int | None = None  # host PID of the sandbox's PID 1
        self._proc = proc
        self._init_fd: int | None = None
        self._closed = False
        self.notifications: NotificationServer | None = None  # serves /dev/nsm and AF_VSOCK (device emulation)
        # how the CPUs are enforced: "cpuset" (the cgroup; the application cannot leave them), "affinity"
        # (sched_setaffinity only: the application may widen it), None (no CPUs asked for)
        self.cpu_pinning: str | None = None
        self._notify_thread: threading.Thread | None = None

    def _serve_notifications(self, listener: NotificationListener,
                             table: dict[int, tuple[str, NotificationHandler]]) -> None:
        server = NotificationServer(listener, table)
        thread = threading.Thread(target=server.run, name=f"{self.name}-notif", daemon=True)
        self.notifications, self._notify_thread = server, thread
        thread.start()

    def _stop_notifications(self) -> None:
        server, thread = self.notifications, self._notify_thread
        if server is None or thread is None:
            return
        server.stop()
        thread.join(timeout=10)
        server.listener.close()
        self._notify_thread = None

    @property
    def pid(self) -> int:
        """Host PID of the launcher (the parent of PID 1)."""
        return self._proc.pid

    @property
    def console(self) -> IO[bytes]:
        """The application's stdout and stderr.  Read it, or a chatty application blocks on a full pipe."""
        assert self._proc.stdout is not None
        return self._proc.stdout

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def _attach_init(self, pid: int) -> None:
        # Hold a pidfd so a signal can never reach a recycled PID; check that it is our launcher's child.
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return  # already gone (an application that exits at once): the launcher's next line says why
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            ppid = -1
        if ppid != self._proc.pid:
            os.close(fd)
            return
        self.init_pid, self._init_fd = pid, fd

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the sandbox to end; the application's exit status (128 + N when killed by signal N)."""
        return self._proc.wait(timeout)

    def send_signal(self, signum: int) -> None:
        """Signal PID 1; it forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the application."""
        if self._init_fd is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._init_fd, signum)

    def kill(self) -> None:
        """SIGKILL PID 1, which kills the whole PID namespace, then the launcher."""
        self.send_signal(signal.SIGKILL)
        if self._proc.poll() is None:
            try:
                self._proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def terminate(self, grace: float = 5.0) -> int:
        """SIGTERM the application (through PID 1), SIGKILL the namespace after ``grace`` seconds."""
        self.send_signal(signal.SIGTERM)
        try:
            return self._proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self._proc.wait()

    def oom_killed(self) -> bool:
        """True when the kernel's OOM killer killed a process of this sandbox (ask before :meth:`close`)."""
        return self.cgroup.oom_kills() > 0

    def close(self) -> None:
        """Kill whatever still runs, remove the cgroup and the stage directory.  Idempotent."""
        if self._closed:
            return
        try:
            self.kill()
            self._stop_notifications()
            self.cgroup.destroy()
        finally:
            if self._init_fd is not None:
                os.close(self._init_fd)
                self._init_fd = None
            with contextlib.suppress(OSError):
                self.stage.rmdir()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._closed = True

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sandbox:
    """Starts sandboxes.  ``cgroup_layout`` and ``stage_parent`` are for tests and unusual hosts."""

    @classmethod
    def start(cls, spec: SandboxSpec, *, cgroup_layout: CgroupLayout | None = None,
              stage_parent: Path | None = None, timeout: float = _START_TIMEOUT,
              launcher: str = "exec") -> SandboxProcess:
        """Start ``spec``; ``launcher`` is ``exec`` (a fresh ``python -m enclavekit.runtime._sandbox_init``, the
        default; the root is then filled from here) or ``fork`` (a child of this process: faster, but the launcher
        and PID 1 inherit this process's heap, and every inherited page they touch is charged to the enclave's
        memory limit; only a small, known caller such as the enclave supervisor should fork)."""
        if launcher not in ("fork", "exec"):
            raise ValueError(f"launcher must be 'fork' or 'exec', got {launcher!r}")
        if os.geteuid() != 0:
            raise SandboxError("the sandbox needs root (namespaces, cgroups, mounts)")
        for host in spec.sockets:
            try:
                mode = os.stat(host).st_mode
            except OSError as exc:
                raise SandboxError(f"channel socket {host}: {exc.strerror}") from exc
            if not stat.S_ISSOCK(mode):
                raise SandboxError(f"channel {host} is not a Unix socket; only sockets may be shared")
        for host in (*spec.directories, *spec.writable_directories):
            try:
                mode = os.lstat(host).st_mode
            except OSError as exc:
                raise SandboxError(f"channel directory {host}: {exc.strerror}") from exc
            if not stat.S_ISDIR(mode):
                raise SandboxError(f"channel directory {host} is not a directory (symlinks are refused)")
        if spec.lower is not None:
            try:
                lower_mode = os.lstat(spec.lower).st_mode
            except OSError as exc:
                raise SandboxError(f"image tree {spec.lower}: {exc.strerror}") from exc
            if not stat.S_ISDIR(lower_mode):
                raise SandboxError(f"image tree {spec.lower} is not a directory (symlinks are refused)")
        for host in spec.devices:
            try:
                mode = os.stat(host).st_mode
            except OSError as exc:
                raise SandboxError(f"device node {host}: {exc.strerror}") from exc
            if not stat.S_ISCHR(mode):
                raise SandboxError(f"device {host} is not a character device node")
        name = spec.name or f"enclavekit-{secrets.token_hex(6)}"
        flt = spec.seccomp or sandbox_filter()
        handlers = spec.notification_handlers
        table: dict[int, tuple[str, NotificationHandler]] = {}
        seccomp_flags = flt.flags
        if handlers:
            # unmodified-apps §5: one notifying filter per sandbox, its USER_NOTIF rules ahead of the refusals
            flt = merged_filter(handlers, flt)
            table = dispatch_table(flt, handlers)
            seccomp_flags = flt.flags | NOTIFYING_FILTER_FLAGS
        program = flt.compile()
        cgroup = create_cgroup(name, layout=cgroup_layout)
        stage: Path | None = None
        proc: _Launcher | None = None
        sandbox: SandboxProcess | None = None
        fds: list[int] = []
        notify: tuple[socket.socket, socket.socket] | None = None
        try:
            limit = spec.memory_mib * MIB
            cgroup.set_memory_limit(limit)
            cgroup.set_pids_max(spec.pids_max)
            pinning: str | None = None
            if spec.cpu_ids:
                # cgroup v2 without a delegated cpuset controller cannot pin the group: PID 1 still calls
                # sched_setaffinity for the application, but the application may undo that (no CAP needed)
                pinning = "cpuset" if cgroup.set_cpus(spec.cpu_ids) else "affinity"
                if pinning == "affinity" and spec.require_cpuset:
                    raise SandboxError(f"cannot pin the sandbox to CPUs {list(spec.cpu_ids)}: the cpuset controller "
                                       "is not available in this cgroup (cgroup v2 without cpuset delegation)")
            stage = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=stage_parent))
            ctl_r, ctl_w = os.pipe()
            status_r, status_w = os.pipe()
            fds = [ctl_r, ctl_w, status_r, status_w]
            env = {"PATH": os.environ.get("PATH", os.defpath)}
            if "PYTHONPATH" in os.environ:
                env["PYTHONPATH"] = os.environ["PYTHONPATH"]
            passed = [ctl_r, status_w]
            if handlers:
                # PID 1 sends the filter's listener fd back on this pair (SCM_RIGHTS)
                notify = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                passed.append(notify[1].fileno())
            if launcher == "fork":
                proc = _fork_launcher(ctl_r, status_w, passed, spec.rootfs, spec.inherit_fds)
            else:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "enclavekit.runtime._sandbox_init", str(ctl_r), str(status_w)],
                    pass_fds=tuple(passed), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True)
            os.close(ctl_r)
            os.close(status_w)
            if notify is not None:
                notify[1].close()
            fds = [ctl_w, status_r]
            sandbox = SandboxProcess(name, proc, cgroup, stage)
            sandbox.cpu_pinning = pinning
            cgroup.add_pid(proc.pid)
            tmpfs = (spec.tmpfs_size_mib or max(1, spec.memory_mib // 2)) * MIB
            doc = {
                "parent_pid": os.getpid(), "stage": str(stage), "tmpfs_size": tmpfs, "hostname": spec.hostname,
                "sockets": [[h, _canonical_inside(i)] for h, i in spec.sockets.items()],
                "directories": [[h, _canonical_inside(i), False] for h, i in spec.directories.items()]
                + [[h, _canonical_inside(i), True] for h, i in spec.writable_directories.items()],
                "heartbeat": spec.heartbeat, "await_boot": spec.await_boot,
                "argv": list(spec.argv), "env": dict(spec.env), "workdir": _canonical_inside(spec.workdir),
                "uid": spec.uid, "gid": spec.gid, "cpu_ids": list(spec.cpu_ids or ()),
                "seccomp": program.hex(), "seccomp_flags": seccomp_flags,
                "devices": [[h, _canonical_inside(i)] for h, i in spec.devices.items()],
                "notify_fd": passed[2] if notify is not None else None, "lower": spec.lower,
            }
            _converse(sandbox, spec, doc, ctl_w, status_r, deadline=time.monotonic() + timeout,
                      notify=(notify[0], table) if notify is not None else None)
            return sandbox
        except BaseException:
            if sandbox is not None:
                sandbox.close()
            else:
                if proc is not None:
                    proc.kill()
                    proc.wait()
                with contextlib.suppress(EnclaveKitError):
                    cgroup.destroy()
                if stage is not None:
                    with contextlib.suppress(OSError):
                        stage.rmdir()
            raise
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if notify is not None:
                notify[0].close()


def _converse(sandbox: SandboxProcess, spec: SandboxSpec, doc: dict[str, Any], ctl_w: int, status_r: int, *,
              deadline: float,
              notify: tuple[socket.socket, dict[int, tuple[str, NotificationHandler]]] | None = None) -> None:
    """Drive the launcher's set-up steps (see ``_sandbox_init``) until the application runs.

    With ``notify``, PID 1 sends the seccomp listener on that socket right after installing the filter (before
    the application is forked); it is served from then on, so the application never waits for it.
    """
    os.write(ctl_w, json.dumps(doc).encode() + b"\n")
    buf = b""
    running = False
    status_open = True
    while not (running and sandbox.init_pid is not None and (notify is None or sandbox.notifications is not None)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SandboxError("the sandbox did not start in time")
        waiting = ([status_r] if status_open else []) + (
            [notify[0]] if notify is not None and sandbox.notifications is None else [])
        ready, _, _ = select.select(waiting, [], [], remaining)
        if not ready:
            continue
        if notify is not None and notify[0] in ready:
            try:
                listener = receive_listener(notify[0], timeout=max(0.1, deadline - time.monotonic()))
            except EnclaveKitError as exc:
                raise SandboxError(f"sandbox set-up failed: {exc.message}", details=_console_tail(sandbox)) from exc
            sandbox._serve_notifications(listener, notify[1])
            continue  # the loop's condition may hold now: the status pipe's EOF after "running" is normal
        chunk = os.read(status_r, 65536)
        if not chunk:
            if running and sandbox.init_pid is not None:
                status_open = False  # PID 1 closed it after "running"; only the listener is still to come
                continue
            status = _exit_status(sandbox)
            who = "PID 1" if running else "launcher"
            raise SandboxBootError(f"the sandbox's {who} exited during set-up{status}", details=_console_tail(sandbox))
        buf += chunk
        if b"\n" not in buf and len(buf) > _STATUS_LINE_MAX:
            raise SandboxError(f"the sandbox launcher sent more than {_STATUS_LINE_MAX} bytes without a newline",
                               details=_console_tail(sandbox))
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = _status_message(line, sandbox)
            stage = msg.get("stage")
            if stage == "unshared":
                for kind in ("uid_map", "gid_map"):
                    Path(f"/proc/{sandbox.pid}/{kind}").write_text(_ID_MAP, encoding="ascii")
                os.write(ctl_w, b"go\n")
            elif stage == "mounted":
                if not msg.get("populated"):  # the exec'd launcher: fill its root from here
                    root = Path(f"/proc/{sandbox.pid}/root") / str(sandbox.stage).lstrip("/")
                    _populate(root, spec.rootfs)
                os.write(ctl_w, b"go\n")
            elif stage == "pid1":
                pid = msg.get("pid")
                if type(pid) is not int or pid <= 0:
                    raise SandboxError(f"the sandbox launcher reported a bad PID 1 ({str(pid)[:20]!r})",
                                       details=_console_tail(sandbox))
                sandbox._attach_init(pid)  # None if PID 1 is gone already: its error line (or EOF) follows
            elif stage == "running":
                running = True
            elif stage == "error":
                code = msg.get("code")
                if isinstance(code, str) and re.fullmatch(r"E\d{2,3}", code) and code not in ("E36", "E80"):
                    # the forked launcher fills the root itself: a bad ramdisk is still the EIF's error (E35)
                    raise EnclaveKitError(str(msg.get("error", "?")), code=code)
                if msg.get("boot"):
                    raise SandboxBootError(str(msg.get("error", "?")), details=_console_tail(sandbox))
                raise SandboxError(f"sandbox set-up failed: {msg.get('error', '?')}", details=_console_tail(sandbox))


_STATUS_LINE_MAX = 64 * 1024


class _Launcher(Protocol):
    """What a :class:`SandboxProcess` needs of its launcher: ``subprocess.Popen`` or :class:`_ForkedLauncher`."""

    pid: int
    stdout: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class _ForkedLauncher:
    """``Popen``'s ``pid``/``stdout``/``poll``/``wait``/``kill`` for a launcher forked from this process."""

    def __init__(self, pid: int, stdout: IO[bytes]) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere: it is gone, its status is lost
                    pid, status = self.pid, 255 << 8
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    if self._pidfd is not None:
                        os.close(self._pidfd)
                        self._pidfd = None
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired(["enclavekit-sandbox-launcher"], timeout or 0.0)
            fd = self._pidfd
            if fd is not None:
                with contextlib.suppress(OSError, ValueError):
                    select.select([fd], [], [], 0.2 if remaining is None else min(remaining, 0.2))

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None and self._pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


def _fork_launcher(ctl_r: int, status_w: int, passed: list[int], rootfs: Path | Callable[[Path], None],
                   inherit: tuple[int, ...] = ()) -> _ForkedLauncher:
    """Fork the launcher from this process (no second interpreter, issue 4's start-up budget).

    The child keeps only stdin (/dev/null), the console pipe on stdout/stderr, ``passed`` and (until the root is
    filled) ``inherit``, starts a session, and runs :func:`~enclavekit.runtime._sandbox_init.run_forked`, which
    fills the root itself (in the enclave's cgroup).
    """

    def fill(stage: str) -> None:
        try:
            _populate(Path(stage), rootfs)
        finally:
            for fd in inherit:
                with contextlib.suppress(OSError):
                    os.close(fd)

    console_r, console_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in (console_r, console_w, devnull):
            os.close(fd)
        raise SandboxError(f"cannot fork the sandbox launcher: {exc.strerror}") from exc
    if pid == 0:  # pragma: no cover - the child; it never returns
        try:
            os.setsid()
            os.dup2(devnull, 0)
            os.dup2(console_w, 1)
            os.dup2(console_w, 2)
            keep = sorted({0, 1, 2, *passed, *inherit})
            for low, high in zip(keep, [*keep[1:], max_fd()], strict=True):
                os.closerange(low + 1, high)
            run_forked(ctl_r, status_w, fill)
        finally:
            os._exit(125)
    os.close(console_w)
    os.close(devnull)
    return _ForkedLauncher(pid, os.fdopen(console_r, "rb"))


def _status_message(line: bytes, sandbox: SandboxProcess) -> dict[str, Any]:
    """One status line of the launcher (see ``_sandbox_init``): a JSON object; anything else is SandboxError.

    The launcher runs the set-up steps in new namespaces, so a line that does not parse means a broken or forged
    launcher, never a reason for a bare JSONDecodeError in the supervisor.
    """
    if len(line) > _STATUS_LINE_MAX:
        raise SandboxError(f"the sandbox launcher sent a status line of {len(line)} bytes; at most "
                           f"{_STATUS_LINE_MAX}", details=_console_tail(sandbox))
    try:
        msg = json.loads(line)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SandboxError(f"the sandbox launcher sent a malformed status line ({line[:40]!r})",
                           details=_console_tail(sandbox)) from exc
    if not isinstance(msg, dict):
        raise SandboxError(f"the sandbox launcher sent a status line that is not an object ({line[:40]!r})",
                           details=_console_tail(sandbox))
    return msg


def _populate(root: Path, source: Path | Callable[[Path], None]) -> None:
    if isinstance(source, Path):
        try:
            shutil.copytree(source, root, symlinks=True, dirs_exist_ok=True)
        except (OSError, shutil.Error) as exc:
            raise SandboxError(f"cannot copy the root filesystem from {source}: {exc}") from exc
    else:
        source(root)


def _console_tail(sandbox: SandboxProcess, limit: int = 4096) -> dict[str, str]:
    """The last console bytes available right now (for boot-failure messages), without blocking."""
    fd = sandbox.console.fileno()
    data = b""
    with contextlib.suppress(OSError):
        while select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data = (data + chunk)[-limit:]
    text = data.decode(errors="replace").strip()
    return {"console": text[-1000:]} if text else {}


def _exit_status(sandbox: SandboxProcess) -> str:
    """`` (status N)`` / `` (killed by SIGX)`` of a launcher that has ended, for messages; empty if it runs."""
    try:
        code = sandbox.wait(0.5)
    except subprocess.TimeoutExpired:
        return ""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f" (killed by {signal.Signals(-code).name})"
    return f" (status {code})"
