"""The launch server: a resident, pre-loaded process that starts enclave supervisors for ``run-enclave``.

Like the Gradle daemon or the Bazel server, it exists only to make a command fast.  A ``run-enclave`` spends most of
its own time starting an interpreter and importing the runtime (supervisor, sandbox, seccomp, NSM, the X.509
stack).  The server has imported all of it once; per launch it forks, and the forked supervisor imports nothing.

Protocol (one Unix stream connection per request, ``<run_dir>/launch.sock``, mode 0600).  The client uses a
server only in a run directory that is a real directory owned by its effective uid and writable by nobody else,
and only when the server's uid (``SO_PEERCRED``) is its own; otherwise it launches directly.

* the client sends ONE JSON line (at most 64 KiB, within 1 s):
  ``{"op": "launch", "version": V, "package": DIR, "python": EXE, "request": RunRequest.to_json()}``,
  ``{"op": "ping"}`` or ``{"op": "stop"}``;
* a peer whose uid (``SO_PEERCRED``) is not the server's effective uid is disconnected without a reply;
* ``{"stale": reason}``: the server's code (a loaded module changed, or any ``*.py`` of the package is not older
  than the process's first import of ``enclavekit`` minus 1 s), version, package directory or interpreter differ
  from the client's; it has already released its socket and lock, and exits (the client launches directly);
* launch, phase 1: a malformed request (``RunRequest.from_json``, a relative ``eif_path``) is ``{"error": ...}``
  (E17).  ``{"declined": reason}`` (the client launches directly) when the request is for another run directory
  or another ``owner_uid`` than the peer's uid, or when the client process's context differs from the server's:
  gid, the namespaces, root directory, uids, gids, groups, umask, capability sets, NoNewPrivs, seccomp mode,
  cgroup, LSM label and resource limits (``/proc/<peer pid>/...``, read while the client waits), since a forked
  supervisor inherits the server's.  Otherwise ``{"ready": server_pid}``;
* launch, phase 2: the client answers ``{"go": true, "env": {...}}`` (its environment, for the supervisor) within 1
  s, with the EIF as a descriptor it opened itself (``SCM_RIGHTS``: read with the client's rights; the server never
  opens the path; a ``go`` without it is E17); only then does the server fork.  A client that closes or stalls
  instead starts nothing.  After ``go`` the connection carries the supervisor's report lines exactly as on the pipe
  of a direct launch (``{"stderr": ...}`` lines, then ``{"ok": EnclaveRunInfo}`` or ``{"error": {...}}``).  The
  client falls back to a direct launch only before it sends ``go``; after it, a connection that ends without a
  report is E39;
* ping: ``{"pid": ..., "launches": N, "version": ...}``; stop: ``{"stopped": pid}`` (sent once the socket and
  lock are released).

Life: an exclusive ``flock`` on ``<run_dir>/launch.lock`` (which holds its PID) for its whole life, so a second
server exits at once, and a socket left by a killed server is replaced by the next one.  It exits after
``$ENCLAVEKIT_LAUNCH_SERVER_IDLE`` seconds without a request (default 600), when its socket disappears or is
replaced, on SIGTERM/SIGINT and on ``stop``.  ``ENCLAVEKIT_LAUNCH_SERVER=off`` (or ``0``, ``no``, ``false``) turns
it off: no launch uses it, none is started.

This module is imported by the CLI before it knows whether a server will take the request: at the top it imports
only the standard library's light modules; everything heavy is imported inside the server's functions.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import enclavekit
from enclavekit._internal.fds import detach_stdio, double_fork, max_fd
from enclavekit.errors import EnclaveKitError

__all__ = [
    "SOCKET_NAME",
    "LOCK_NAME",
    "SWITCH_ENV",
    "IDLE_ENV",
    "DEFAULT_IDLE",
    "PRELOAD",
    "enabled",
    "read_report",
    "launch_via_server",
    "ping_server",
    "start_server",
    "stop_server",
    "serve",
    "main",
]

SOCKET_NAME = "launch.sock"
LOCK_NAME = "launch.lock"
SWITCH_ENV = "ENCLAVEKIT_LAUNCH_SERVER"
IDLE_ENV = "ENCLAVEKIT_LAUNCH_SERVER_IDLE"
DEFAULT_IDLE = 600.0
_OFF = frozenset({"off", "0", "no", "false"})
_REQUEST_MAX = 64 << 10
# finding 1: a stalled client holds the (one-at-a-time) server for at most these two deadlines
_REQUEST_TIMEOUT = 1.0  # a client has this long to send its request line, and again its go line
_REPLY_TIMEOUT = 3.0  # a client waits this long for the server's first reply line (ready, declined, stale...)
_WATCH_INTERVAL = 1.0  # how often the server checks that its socket is still its own
_PRELOAD_IMPORTS = (
    # everything a launch imports, so that a forked supervisor imports nothing (heavy first: they pull the rest)
    "enclavekit.runtime.supervisor",
    "enclavekit.runtime.sandbox",
    "enclavekit.runtime._sandbox_init",
    "enclavekit.runtime.seccomp",
    "enclavekit.runtime.usernotif",
    "enclavekit.runtime.audit",
    "enclavekit.runtime.nsm_device",
    "enclavekit.runtime.vsock_translate",
    "enclavekit.nsm.server",
    "enclavekit.nsm.module",
    "enclavekit.attestation.issuer",
    "enclavekit.attestation.pki",
    "enclavekit.image.signing",
    "enclavekit.runtime.image_store",
)
PRELOAD: tuple[str, ...] = _PRELOAD_IMPORTS


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """False when ``$ENCLAVEKIT_LAUNCH_SERVER`` is ``off``, ``0``, ``no`` or ``false`` (any case)."""
    env = os.environ if environ is None else environ
    return env.get(SWITCH_ENV, "").strip().lower() not in _OFF


def _idle_from_env(environ: Mapping[str, str]) -> float:
    text = environ.get(IDLE_ENV, "")
    if not text:
        return DEFAULT_IDLE
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_IDLE
    return value if 0 < value < 1e9 else DEFAULT_IDLE


def _identity() -> dict[str, str]:
    """What must match between client and server: the package version, its directory and the interpreter."""
    return {"version": enclavekit.__version__, "package": os.path.dirname(os.path.abspath(enclavekit.__file__)),
            "python": os.path.realpath(sys.executable)}


def _trace(label: str) -> None:
    """Like the supervisor's trace: ``<pid> <monotonic s> <label>`` appended to ``$ENCLAVEKIT_LAUNCH_TRACE``."""
    path = os.environ.get("ENCLAVEKIT_LAUNCH_TRACE")
    if path:
        with contextlib.suppress(OSError), open(path, "a") as fh:
            fh.write(f"{os.getpid()} {time.monotonic():.6f} {label}\n")


def _paths(run_dir: str | os.PathLike[str]) -> tuple[str, str]:
    root = os.fspath(run_dir)
    return os.path.join(root, SOCKET_NAME), os.path.join(root, LOCK_NAME)


# ---------------------------------------------------------------- the report stream (shared with a direct launch)

def read_report(fd: int, *, limit: float, on_stderr: Callable[[str], None] | None = None,
                buffered: bytes = b"", via_server: bool = False) -> dict[str, Any]:
    """Read a supervisor's JSON report lines from ``fd`` until ``ok`` (returned) or ``error`` (raised).

    ``{"stderr": line}`` messages go to ``on_stderr``.  No report within ``limit`` seconds, the end of the stream
    before one, or a line that is not a JSON object, is E39.  ``buffered`` holds bytes already read from ``fd``.
    Used by a direct launch (the report pipe) and by a launch through the server (its connection, ``via_server``:
    the messages then say that the launch was handed over and is not retried).
    """
    source = "the launch server" if via_server else "the enclave supervisor"
    after = (" after it took the launch (not retried: an enclave may have started, see describe-enclaves)"
             if via_server else "")
    deadline = time.monotonic() + limit
    buf = buffered
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                msg = None
            if not isinstance(msg, dict):
                raise EnclaveKitError(f"{source} sent a malformed report line{after}", code="E39")
            if "stderr" in msg:
                if on_stderr is not None:
                    on_stderr(str(msg["stderr"]))
            elif "ok" in msg:
                result: dict[str, Any] = msg["ok"]
                return result
            elif "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise EnclaveKitError(str(err.get("message", "?")), code=str(err.get("code", "E36")),
                                      details={str(k): str(v) for k, v in (err.get("details") or {}).items()})
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EnclaveKitError(f"{source} did not answer within {limit:g} s{after}" if via_server else
                                  f"the enclave supervisor did not report within {limit:g} s", code="E39")
        if not select.select([fd], [], [], remaining)[0]:
            continue
        try:
            chunk = os.read(fd, 65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise EnclaveKitError(f"{source} ended without an answer{after}" if via_server else
                                  "the enclave supervisor exited without reporting", code="E39")
        buf += chunk


# ---------------------------------------------------------------- client side

def _unsafe_run_dir(root: str) -> str | None:
    """Why ``root`` cannot hold this user's server socket (None: it can).

    Review finding 3: the run directory is a real directory (not a symbolic link), owned by this effective uid and
    writable by nobody else, so nobody else can have put a socket there.
    """
    try:
        st = os.lstat(root)
    except OSError as exc:
        return f"cannot stat {root}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{root} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{root} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{root} is owned by uid {st.st_uid}, not {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"{root} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the other end (``SO_PEERCRED``: the connecting or listening process)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def _connect(run_dir: str | os.PathLike[str]) -> socket.socket | None:
    """A connection to this user's server of ``run_dir``, or None (no server, refused, someone else's)."""
    root = os.path.abspath(os.fspath(run_dir))
    unsafe = _unsafe_run_dir(root)
    if unsafe is not None:
        _trace(f"cli: run directory not used for a launch server: {unsafe}")
        return None
    sock_path, _ = _paths(root)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(_REPLY_TIMEOUT)
    try:
        sock.connect(sock_path)
        _, uid, _ = _peer_credentials(sock)
    except OSError:  # no server, a stale socket (refused), no permission
        sock.close()
        return None
    if uid != os.geteuid():  # finding 3: only our own user's server ever sees a request (or our environment)
        _trace(f"cli: the launch server runs as uid {uid}")
        sock.close()
        return None
    return sock


def _first_line(sock: socket.socket) -> tuple[dict[str, Any] | None, bytes]:
    """The server's first reply line (None when it closed first or did not answer in time) and what followed it."""
    buf = b""
    deadline = time.monotonic() + _REPLY_TIMEOUT
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or len(buf) > _REQUEST_MAX:
            return None, b""
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(4096)
        except OSError:
            return None, b""
        if not chunk:
            return None, b""
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None, b""
    return (msg if isinstance(msg, dict) else None), rest


def _exchange(run_dir: str | os.PathLike[str], message: dict[str, Any]) -> tuple[socket.socket, dict[str, Any],
                                                                                    bytes] | None:
    sock = _connect(run_dir)
    if sock is None:
        return None
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        sock.close()
        return None
    reply, rest = _first_line(sock)
    if reply is None:
        sock.close()
        return None
    return sock, reply, rest


def launch_via_server(request: Any, *, on_stderr: Callable[[str], None] | None = None,
                      timeout: float | None = None) -> dict[str, Any] | None:
    """Launch ``request`` (a ``RunRequest`` or its ``to_json()`` mapping) through the run directory's server.

    Returns ``EnclaveRunInfo``, raises the launch's error, or returns None when no server took the request (none
    running, turned off, someone else's, refused, stale, declined, no ``ready`` in time): the caller then launches
    directly.  Two phases: the server checks the request and this process's context and answers ``ready``; only
    then is ``go`` (with this process's environment) sent.  After ``go`` the server may have started a supervisor,
    so the outcome is the launch's and never a fallback: a server that ends without an answer is E39.
    """
    if not enabled():
        return None
    obj: dict[str, Any] = dict(request.to_json() if hasattr(request, "to_json") else request)
    run_dir = obj.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise ValueError("the run request has no run_dir")
    go = json.dumps({"go": True, "env": dict(os.environ)}).encode() + b"\n"
    if len(go) > _REQUEST_MAX:
        _trace("cli: environment too large for the launch server")
        return None
    _trace("cli: launch via server")
    # phase 1: the request, without the environment (finding 8: it goes only to a server that said ready)
    got = _exchange(run_dir, {"op": "launch", **_identity(), "request": obj})
    if got is None:
        _trace("cli: no launch server")
        return None
    sock, reply, rest = got
    with sock:
        if "ready" not in reply or rest:
            _trace(f"cli: launch server declined ({next(iter(reply), '?')})")
            return None
        # the EIF goes as a descriptor this process opened: read with the client's rights (never the server's),
        # and no path is looked up again on the server's side
        eif = _open_eif(str(obj.get("eif_path")))
        # phase 2: from the first byte of go on, the server may start a supervisor: never launch directly now
        _trace("cli: launch server ready")
        try:
            sock.settimeout(_REPLY_TIMEOUT)
            sent = socket.send_fds(sock, [go], [eif])
            sock.sendall(go[sent:])
        except OSError as exc:
            raise EnclaveKitError("the launch server ended without an answer after it took the launch (not "
                                  "retried: an enclave may have started, see describe-enclaves)",
                                  code="E39") from exc
        finally:
            os.close(eif)
        boot = obj.get("boot_timeout")
        limit = timeout if timeout is not None else (boot if isinstance(boot, (int, float)) and boot else 180.0) + 60
        sock.setblocking(True)
        return read_report(sock.fileno(), limit=limit, on_stderr=on_stderr, via_server=True)


def _open_eif(path: str) -> int:
    """The EIF opened for reading by this process: ``O_PATH`` and ``fstat`` first (a device or FIFO is not opened
    but left to the supervisor's refusal), then read access checked by the kernel against this process."""
    try:
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise EnclaveKitError(f"cannot read the EIF {path}: {exc.strerror or exc}", code="E19",
                              details={"File": path, "failing operation": "Open"}) from exc
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            return os.dup(handle)  # the supervisor refuses it (not a regular file) without opening it
        try:
            return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise EnclaveKitError(f"cannot read the EIF {path}: {exc.strerror or exc}", code="E19",
                                  details={"File": path, "failing operation": "Open"}) from exc
    finally:
        os.close(handle)


def ping_server(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The server's ``{"pid", "version", ...}``, or None when none answers (a stale one exits on the ping)."""
    got = _exchange(run_dir, {"op": "ping", **_identity()})
    if got is None:
        return None
    sock, reply, _ = got
    sock.close()
    return reply if "pid" in reply else None


def stop_server(run_dir: str | os.PathLike[str]) -> bool:
    """Ask the run directory's server to exit; True if one did (its socket and lock are released on return)."""
    got = _exchange(run_dir, {"op": "stop"})
    if got is None:
        return False
    sock, reply, _ = got
    sock.close()
    return "stopped" in reply


def start_server(run_dir: str | os.PathLike[str]) -> None:
    """Start a server for ``run_dir`` in the background, without waiting for its imports.

    A single-threaded caller that has imported the supervisor already (the CLI after a direct launch) is
    double-forked: the server starts pre-loaded.  Otherwise a fresh interpreter runs
    ``python -m enclavekit.runtime.launch_server RUN_DIR --detach``.  If a server holds the lock already, the new
    one exits at once.  Does nothing when the server is turned off or the run directory is not safe for one
    (a symbolic link, not ours, writable by others).
    """
    if not enabled():
        return
    root = os.path.abspath(os.fspath(run_dir))
    if _unsafe_run_dir(root) is not None:
        return
    _trace("cli: start launch server")
    import threading  # noqa: PLC0415 - the CLI's fast path never gets here

    if threading.active_count() == 1 and "enclavekit.runtime.supervisor" in sys.modules:
        _start_by_fork(root)
    else:
        _start_by_exec(root)


def _start_by_fork(root: str) -> None:
    def run() -> int:
        detach_stdio()
        os.closerange(3, max_fd())
        return serve(root)

    with contextlib.suppress(OSError):  # no server this time; the next launch tries again
        double_fork(run)


def _start_by_exec(root: str) -> None:
    import subprocess  # noqa: PLC0415

    with contextlib.suppress(OSError):
        proc = subprocess.Popen([sys.executable, "-m", "enclavekit.runtime.launch_server", root, "--detach"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True, cwd="/")
        proc.wait()  # the first process forks and exits before importing anything


# ---------------------------------------------------------------- the server

class _Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave the serving loop."""


def _fingerprint() -> dict[str, tuple[int, int]]:
    """``(mtime_ns, size)`` of every loaded enclavekit module's source file."""
    out: dict[str, tuple[int, int]] = {}
    for name, module in list(sys.modules.items()):
        if name != "enclavekit" and not name.startswith("enclavekit."):
            continue
        path = getattr(module, "__file__", None)
        if not path:
            continue
        try:
            st = os.stat(path)
        except OSError:
            out[path] = (-1, -1)
            continue
        out[path] = (st.st_mtime_ns, st.st_size)
    return out


def _changed(recorded: Mapping[str, tuple[int, int]]) -> str | None:
    for path, (mtime, size) in recorded.items():
        try:
            st = os.stat(path)
        except OSError:
            return f"{path} is gone"
        if (st.st_mtime_ns, st.st_size) != (mtime, size):
            return f"{path} changed"
    return None


def _newer_sources(package: str, loaded_at: float) -> str | None:
    """A ``*.py`` file under ``package`` modified at or after ``loaded_at - 1`` s (None: there is none).

    Finding 5: code in memory may be older than the files (a server forked from a CLI that loaded its modules
    before an upgrade); one recursive scandir of the package catches every file, loaded or not.
    """
    pending = [package]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name != "__pycache__":
                            pending.append(entry.path)
                    elif entry.name.endswith(".py"):
                        try:
                            mtime = entry.stat(follow_symlinks=False).st_mtime
                        except OSError:
                            return f"{entry.path} is gone"
                        if mtime >= loaded_at - 1.0:
                            return f"{entry.path} is newer than the server's code"
        except OSError:
            return f"cannot list {directory}"
    return None


# finding 2: what a supervisor inherits from the process that forks it; a server forks for a client only when
# they are the same (otherwise the enclave would run in the server's context, not the client's)
_NAMESPACES = ("mnt", "pid", "pid_for_children", "net", "user", "cgroup", "ipc", "uts", "time",
               "time_for_children")
_STATUS_FIELDS = ("Uid", "Gid", "Groups", "Umask", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                  "NoNewPrivs", "Seccomp", "Seccomp_filters")
_PROC_FILES = ("cgroup", "attr/current", "limits")


def _read_proc(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 16).decode("utf-8", "replace")
    except OSError:  # gone, not permitted, or not provided (attr/current without an LSM)
        return None


def _process_context(pid: int | str) -> dict[str, str | None]:
    """The inheritable context of process ``pid`` (``"self"`` for this one), read from ``/proc``; None: unreadable.

    Namespace inodes, the root directory, uids/gids/groups, umask, capability sets, NoNewPrivs and seccomp mode
    (``status``), the cgroup, the LSM label (``attr/current``) and resource limits.
    """
    base = f"/proc/{pid}"
    out: dict[str, str | None] = {}
    for ns in _NAMESPACES:
        try:
            out[f"ns/{ns}"] = os.readlink(f"{base}/ns/{ns}")
        except OSError:
            out[f"ns/{ns}"] = None
    try:
        st = os.stat(f"{base}/root")
        out["root"] = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        out["root"] = None
    status = _read_proc(f"{base}/status")
    fields: dict[str, str] = {}
    for line in (status or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = " ".join(value.split())
    for key in _STATUS_FIELDS:
        out[key] = fields.get(key)
    for name in _PROC_FILES:
        out[name] = _read_proc(f"{base}/{name}")
    return out


def _context_mismatch(peer_pid: int) -> str | None:
    """What differs between the client process ``peer_pid`` and this server (None: nothing does)."""
    if peer_pid <= 0:
        return "the client's process is not visible in the server's PID namespace"
    mine, theirs = _process_context("self"), _process_context(peer_pid)
    for key, value in mine.items():
        if theirs.get(key) != value:
            return f"the client's {key} differs from the server's"
    return None


def _set_process_name(name: bytes) -> None:
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name, 0, 0, 0)  # PR_SET_NAME: what ps -o comm and top show


class _Server:
    def __init__(self, root: str, *, idle: float, fingerprint: dict[str, tuple[int, int]],
                 lock_fd: int, listener: socket.socket, inode: int) -> None:
        self.root, self.idle, self.fingerprint = root, idle, fingerprint
        self.sock_path, self.lock_path = _paths(root)
        self.lock_fd: int | None = lock_fd
        self.listener: socket.socket | None = listener
        self.inode = inode
        self.identity = _identity()
        self.done = False
        self.launches = 0  # requests handed to a supervisor (ping reports it)

    # ---- release (socket first, then the lock: a successor may bind as soon as it has the lock)

    def release(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.sock_path).st_ino == self.inode:
                    os.unlink(self.sock_path)
            self.listener.close()
            self.listener = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def socket_is_ours(self) -> bool:
        try:
            return os.stat(self.sock_path).st_ino == self.inode
        except OSError:
            return False

    # ---- the loop

    def run(self) -> None:
        last = time.monotonic()
        while not self.done:
            assert self.listener is not None
            ready = select.select([self.listener], [], [], _WATCH_INTERVAL)[0]
            if not self.socket_is_ours():
                return  # the run directory was removed, or another server replaced the socket
            if not ready:
                if time.monotonic() - last >= self.idle:
                    return
                continue
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            last = time.monotonic()
            with conn:
                self.handle(conn)
            last = time.monotonic()

    def handle(self, conn: socket.socket) -> None:
        peer_pid, uid, gid = _peer_credentials(conn)
        if uid != os.geteuid():
            return  # no privilege crossing: only the server's own user may have it start supervisors
        msg = self._read_line(conn)
        if msg is None:
            return
        op = msg.get("op")
        if op == "stop":
            self.done = True
            self.release()
            self._reply(conn, {"stopped": os.getpid()})
            return
        reason = None
        if op in ("launch", "ping"):
            reason = self.stale_reason(msg, launch=op == "launch")
        if reason is not None:
            # a server never runs code older than its client's: give way (release first, so a successor can start)
            self.done = True
            self.release()
            self._reply(conn, {"stale": reason})
            return
        if op == "ping":
            self._reply(conn, {"pid": os.getpid(), "launches": self.launches, **self.identity})
        elif op == "launch":
            self._launch(conn, msg, peer_pid=peer_pid, uid=uid, gid=gid)
        else:
            self._reply(conn, {"error": {"code": "E17", "message": f"unknown launch server operation {op!r}"}})

    def stale_reason(self, msg: Mapping[str, Any], *, launch: bool) -> str | None:
        """Why this server must give way to the client of ``msg`` (None: it need not)."""
        reason = _changed(self.fingerprint) or _newer_sources(self.identity["package"], enclavekit.LOADED_AT)
        if reason is not None:
            return reason
        for key, mine in self.identity.items():
            theirs = msg.get(key)
            if theirs is not None and theirs != mine:
                return f"{key} {theirs!r} differs from the server's {mine!r}"
            if theirs is None and launch:
                return f"the request has no {key}"
        return None

    @staticmethod
    def _reply(conn: socket.socket, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(_REQUEST_TIMEOUT)
            conn.sendall(json.dumps(msg).encode() + b"\n")

    @staticmethod
    def _read_line(conn: socket.socket, *, with_fds: bool = False) -> Any:
        """One JSON object line, at most 64 KiB, within the request deadline, nothing after it; else None.

        ``with_fds``: ``(line or None, descriptors)``, the descriptors that came with it (``SCM_RIGHTS``), which the
        caller closes.
        """
        deadline = time.monotonic() + _REQUEST_TIMEOUT
        buf = b""
        fds: list[int] = []
        msg: Any = None
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(buf) > _REQUEST_MAX:
                break
            conn.settimeout(remaining)
            try:
                if with_fds:
                    chunk, got, _flags, _addr = socket.recv_fds(conn, _REQUEST_MAX + 1 - len(buf), 4)
                    fds.extend(got)
                else:
                    chunk = conn.recv(_REQUEST_MAX + 1 - len(buf))
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        else:
            line, rest = buf.split(b"\n", 1)
            if len(line) <= _REQUEST_MAX and not rest:  # the protocol is one line, then the server's answer
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    msg = json.loads(line)
        msg = msg if isinstance(msg, dict) else None
        return (msg, fds) if with_fds else msg

    @staticmethod
    def _peer_is_waiting(conn: socket.socket) -> bool:
        """The client is still connected (its PID, read from /proc just now, was not freed and reused)."""
        try:
            if not select.select([conn], [], [], 0)[0]:
                return True  # nothing to read: not closed
            conn.settimeout(_REQUEST_TIMEOUT)
            conn.recv(1, socket.MSG_PEEK)
        except OSError:
            return False
        return False  # closed, or sent before the answer (the protocol has it wait)

    def _launch(self, conn: socket.socket, msg: dict[str, Any], *, peer_pid: int, uid: int, gid: int) -> None:
        import dataclasses  # noqa: PLC0415 - not on the client's fast path

        from enclavekit.runtime.supervisor import RunRequest  # noqa: PLC0415 - pre-loaded

        # phase 1 (finding 4): a well-formed request for this server's run directory, on behalf of the peer's uid
        try:
            request = RunRequest.from_json(msg.get("request"))
            if not os.path.isabs(request.eif_path):
                raise ValueError("eif_path must be an absolute path")
        except (ValueError, TypeError) as exc:
            self._reply(conn, {"error": {"code": "E17", "message": f"bad run request: {exc}"}})
            return
        declined = None
        if os.path.realpath(request.run_dir) != os.path.realpath(self.root):
            declined = "the request's run_dir is not the server's run directory"
        elif request.owner_uid != uid:
            declined = f"owner_uid {request.owner_uid} is not the client's uid {uid}"
        elif gid != os.getegid():
            declined = f"the client's gid {gid} is not the server's {os.getegid()}"
        else:
            # finding 2: read while the client waits for this answer, so its PID is still its own
            declined = _context_mismatch(peer_pid)
            if declined is None and not self._peer_is_waiting(conn):
                return
        if declined is not None:
            self._reply(conn, {"declined": declined})  # the client launches directly, in its own context
            return
        request = dataclasses.replace(request, owner_uid=uid)
        self._reply(conn, {"ready": os.getpid()})
        # phase 2 (finding 1): fork only on the client's go; a client that gave up (EOF) or stalls starts nothing
        go, fds = self._read_line(conn, with_fds=True)
        try:
            if go is None or go.get("go") is not True:
                return
            env = go.get("env")
            if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in env.items()):
                self._reply(conn, {"error": {"code": "E17", "message": "bad run request: env must be an object of "
                                                                      "strings"}})
                return
            if len(fds) != 1:
                # the EIF comes only as the client's own descriptor: the server never opens it with its rights
                self._reply(conn, {"error": {"code": "E17", "message": "bad run request: go must carry the EIF's "
                                                                      "descriptor"}})
                return
            conn.setblocking(True)  # the supervisor writes its report to this descriptor
            try:
                # the supervisor is nobody's child: the intermediate process exits at once
                double_fork(lambda: self._supervise(conn, request, env, fds[0]))
            except OSError as exc:
                self._reply(conn, {"error": {"code": "E05",
                                             "message": f"cannot fork the enclave supervisor: {exc.strerror or exc}"}})
                return
            self.launches += 1
        finally:
            for fd in fds:
                os.close(fd)

    def _supervise(self, conn: socket.socket, request: Any, env: dict[str, str],
                   eif_fd: int) -> int:  # pragma: no cover
        """In the supervisor (grandchild): drop the server's resources, take the client's environment, run."""
        from enclavekit.runtime import supervisor  # noqa: PLC0415 - pre-loaded
        from enclavekit.runtime.registry import Registry  # noqa: PLC0415

        _set_process_name(b"enclavekit")  # what a directly launched supervisor shows
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        from enclavekit.runtime import image_store  # noqa: PLC0415 - pre-loaded

        if image_store.ACTIVE is not None:
            image_store.ACTIVE.forget_server_lock()  # the server's own; closed here, before the range below
        report_fd = conn.detach()
        detach_stdio()
        keep = sorted({2, report_fd, eif_fd})  # stdio, the report connection, the client's EIF: nothing else
        for low, high in zip(keep, [*keep[1:], max_fd()], strict=True):
            os.closerange(low + 1, high)
        os.environ.clear()
        os.environ.update(env)
        supervisor._TRACE = env.get("ENCLAVEKIT_LAUNCH_TRACE")
        os.chdir("/")
        from pathlib import Path  # noqa: PLC0415
        reporter = supervisor._Reporter(report_fd)
        supervisor._trace("launch server: supervisor forked")
        try:
            # what the CLI does before a direct launch: the run directory exists, stale records are cleaned
            registry = Registry(Path(request.run_dir))
            registry.ensure()
            supervisor.clean_stale(registry, Path(request.state_home))
        except EnclaveKitError as exc:
            reporter.send(error={"code": exc.code, "message": exc.message, "details": exc.details})
            return 1
        return supervisor._run_detached(request, reporter, eif_fd=eif_fd)


def serve(run_dir: str | os.PathLike[str], *, idle: float | None = None, stale_fingerprint: bool = False) -> int:
    """Run a server for ``run_dir`` in this process until it exits; 0, or 1 when it could not start.

    Returns 0 at once when another server holds the lock.  ``stale_fingerprint`` records a fingerprint no file
    matches, so the first request finds the server stale (tests and debugging of the replacement path).
    """
    import importlib  # noqa: PLC0415

    root = os.path.abspath(os.fspath(run_dir))
    idle = _idle_from_env(os.environ) if idle is None else idle
    _set_process_name(b"launch_server")
    os.chdir("/")
    for name in _PRELOAD_IMPORTS:
        importlib.import_module(name)
    fingerprint = _fingerprint()
    if stale_fingerprint:
        fingerprint = {path: (mtime - 1, size) for path, (mtime, size) in fingerprint.items()}
    # never create the run directory: one removed while this server was loading stays removed; and serve only
    # from a directory its clients accept (a real directory of this user that nobody else can write)
    if _unsafe_run_dir(root) is not None:
        return 1
    sock_path, lock_path = _paths(root)
    try:
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return 1
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return 0  # another server has it
        raise
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    # we hold the lock: a socket at the path is a killed server's
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # created 0600: never reachable by others, not even for an instant
    try:
        listener.bind(sock_path)
    except OSError:
        listener.close()
        os.close(lock_fd)
        return 1
    finally:
        os.umask(old_umask)
    listener.listen(16)
    from enclavekit.runtime import image_store  # noqa: PLC0415 - pre-loaded above

    # images unpacked once and shared read-only by their enclaves, for this server's life (image_store docstring)
    image_store.ACTIVE = image_store.ImageStore.create()
    server = _Server(root, idle=idle, fingerprint=fingerprint, lock_fd=lock_fd, listener=listener,
                     inode=os.stat(sock_path).st_ino)

    def stop(signum: int, frame: Any) -> NoReturn:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        server.run()
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.release()
        if image_store.ACTIVE is not None:
            image_store.ACTIVE.close()
            image_store.ACTIVE = None
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m enclavekit.runtime.launch_server RUN_DIR [--detach] [--idle SECONDS] [--stale-fingerprint]``."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m enclavekit.runtime.launch_server",
                                     description="the run-enclave launch server (foreground unless --detach)")
    parser.add_argument("run_dir")
    parser.add_argument("--detach", action="store_true", help="run in the background (new session, no stdio)")
    parser.add_argument("--idle", type=float, default=None, help=f"exit after this many idle seconds "
                        f"(default ${IDLE_ENV} or {DEFAULT_IDLE:g})")
    parser.add_argument("--stale-fingerprint", action="store_true",
                        help="record a module fingerprint that never matches (the first request finds it stale)")
    args = parser.parse_args(argv)
    if args.idle is not None and not 0 < args.idle < 1e9:
        parser.error("--idle must be a positive number of seconds")
    if args.detach:
        if os.fork() != 0:
            return 0
        os.setsid()
        detach_stdio()
        os.closerange(3, max_fd())  # finding 6: nothing the starter had open (pipes, sockets, locks) stays open
    return serve(args.run_dir, idle=args.idle, stale_fingerprint=args.stale_fingerprint)


if __name__ == "__main__":
    sys.exit(main())
