"""The launch server (enclavekit.runtime.launch_server): real servers, real enclaves, real CLI runs.

Each test has its own run and state directories and turns the server on (the session turns it off in
tests/conftest.py).  Teardown terminates the test's enclaves, stops every server it started and waits for their
processes to be gone.  These tests need root; without it they FAIL (never skip).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import enclavekit
from enclavekit.runtime.launch_server import (
    LOCK_NAME,
    SOCKET_NAME,
    _identity,
    launch_via_server,
    ping_server,
    start_server,
    stop_server,
)
from enclavekit.runtime.supervisor import RunRequest
from enclavekit.vsock.transport import UnixVsockTransport

pytestmark = pytest.mark.integration

ENCLAVEKIT = str(Path(sys.executable).with_name("enclavekit"))
PORT = 5105

APP_C = r"""
/* Dials the parent's vsock (3, PORT) through enclavekit's emulation (waiting for a listener) and says
   "ready <cid>". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
int main(int argc, char **argv) {
    const char *dir = getenv("ENCLAVEKIT_VSOCK_DIR"), *cid = getenv("ENCLAVEKIT_VSOCK_CID");
    char path[256], line[64];
    if (!dir || !cid || argc < 2) return 2;
    snprintf(path, sizeof path, "%s/3/%s.sock", dir, argv[1]);
    struct sockaddr_un a; memset(&a, 0, sizeof a); a.sun_family = AF_UNIX;
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    while (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) usleep(50000);  /* until the parent listens */
    int n = snprintf(line, sizeof line, "CONNECT %s\n", argv[1]);
    if (write(fd, line, n) != n) return 4;
    for (int i = 0; i < (int)sizeof line - 1; i++) {
        if (read(fd, line + i, 1) != 1) return 5;
        if (line[i] == '\n') break;
    }
    n = snprintf(line, sizeof line, "ready %s\n", cid);
    if (write(fd, line, n) != n) return 6;
    for (;;) pause();
}
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def app_eif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the launch server tests need root (they run enclaves); run them as root")
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the test application")
    base = tmp_path_factory.mktemp("launch-app")
    root = base / "rootfs"
    root.mkdir()
    (base / "app.c").write_text(APP_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(root / "app"), str(base / "app.c")], check=True)
    eif = base / "app.eif"
    subprocess.run([ENCLAVEKIT, "build-enclave", "--docker-uri", f"dir:{root}", "--output-file", str(eif),
                    "--cmd", json.dumps(["/app", str(PORT)])], check=True, capture_output=True)
    return eif


@dataclass
class Site:
    """One test's run directory, state directory and the launch servers it saw."""

    run_dir: Path
    home: Path
    servers: set[int] = field(default_factory=set)
    supervisors: set[int] = field(default_factory=set)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, ENCLAVEKIT_RUN_DIR=str(self.run_dir), ENCLAVEKIT_HOME=str(self.home),
                   ENCLAVEKIT_LAUNCH_SERVER="on")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(extra)
        return env

    def cli(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ENCLAVEKIT, *args], env=self.env(**extra), capture_output=True, text=True,
                              timeout=120, check=False)

    def run(self, eif: Path, **extra: str) -> dict[str, Any]:
        proc = self.cli("run-enclave", "--eif-path", str(eif), "--cpu-count", "1", "--memory", "64", **extra)
        assert proc.returncode == 0, proc.stderr
        info: dict[str, Any] = json.loads(proc.stdout)
        self.supervisors.add(info["ProcessID"])
        return info

    def start(self, *extra: str) -> int:
        """A server started as a user would (``python -m ... --detach``); returns its PID once it serves.

        A server started with ``--stale-fingerprint`` gives way on any request, so it is awaited on its lock file.
        """
        subprocess.run([sys.executable, "-m", "enclavekit.runtime.launch_server", str(self.run_dir), "--detach",
                        *extra], env=self.env(), check=True, timeout=30)
        if "--stale-fingerprint" in extra:
            return self.lock_pid(wait=True)
        pid: int = self.ping()["pid"]
        return pid

    def lock_pid(self, *, wait: bool = False) -> int:
        def read() -> int:
            try:
                text = (self.run_dir / LOCK_NAME).read_text().strip()
            except OSError:
                return 0
            if not text.isdigit() or not (self.run_dir / SOCKET_NAME).exists():
                return 0
            return int(text)

        pid = _wait(read, "a launch server's socket and lock") if wait else read()
        if pid:
            self.servers.add(pid)
        return pid

    def ping(self) -> dict[str, Any]:
        reply = _wait(lambda: ping_server(self.run_dir), "a launch server to answer")
        self.servers.add(reply["pid"])
        result: dict[str, Any] = reply
        return result


@pytest.fixture
def site() -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.fail("the launch server tests need root (they run enclaves); run them as root")
    with tempfile.TemporaryDirectory(prefix="ekz", dir="/tmp") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "allocator.yaml").write_text("---\nmemory_mib: 1024\ncpu_pool: 1\ncpu_sharing: true\n")
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        s = Site(run_dir=run_dir, home=home)
        try:
            yield s
        finally:
            if run_dir.is_dir() and any(run_dir.glob("*/enclave.json")):
                s.cli("terminate-enclave", "--all")
            if run_dir.is_dir():
                s.lock_pid()
                stop_server(run_dir)
            left = {p for p in s.servers | s.supervisors if _alive(p)}
            deadline = time.monotonic() + 10
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = {p for p in left if _alive(p)}
            for pid in left & s.servers:  # last resort, by PID: only servers this test saw
                os.kill(pid, signal.SIGKILL)
            assert not left, f"processes left behind: {sorted(left)}"


def _ready(listener: Any) -> str:
    conn, _ = listener.accept(timeout=60)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            break
        data += chunk
    conn.close()
    return data.decode()


def _shape(info: dict[str, Any]) -> dict[str, str]:
    return {key: type(value).__name__ for key, value in info.items()}


def test_launch_through_the_server_matches_a_direct_launch(site: Site, app_eif: Path) -> None:
    (site.run_dir / "vsock" / "3").mkdir(parents=True)
    listener = UnixVsockTransport(site.run_dir / "vsock", local_cid=3).listen(PORT)
    try:
        direct = site.run(app_eif)  # no server yet: a direct launch, which starts one
        assert _ready(listener) == f"ready {direct['EnclaveCID']}\n"
        server = site.ping()
        assert server["launches"] == 0
        assert (site.run_dir / SOCKET_NAME).stat().st_mode & 0o777 == 0o600
        served = site.run(app_eif)
        assert _ready(listener) == f"ready {served['EnclaveCID']}\n"
        after = site.ping()
        assert (after["pid"], after["launches"]) == (server["pid"], 1)
    finally:
        listener.close()
    assert _shape(served) == _shape(direct)
    assert (served["EnclaveName"], served["MemoryMiB"], served["CPUIDs"]) == ("app_1", 64, direct["CPUIDs"])
    assert served["ProcessID"] != server["pid"] and _ppid(served["ProcessID"]) != server["pid"]
    described = json.loads(site.cli("describe-enclaves").stdout)
    assert sorted(d["EnclaveID"] for d in described) == sorted([direct["EnclaveID"], served["EnclaveID"]])
    done = site.cli("terminate-enclave", "--all")
    assert done.returncode == 0, done.stderr
    assert all(r["Terminated"] for r in json.loads(done.stdout))
    _wait(lambda: not _alive(served["ProcessID"]), "the served supervisor to exit")


def test_launch_errors_come_back_through_the_server(site: Site, app_eif: Path, tmp_path: Path) -> None:
    site.start()
    corrupt = tmp_path / "corrupt.eif"
    data = bytearray(app_eif.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    proc = site.cli("run-enclave", "--eif-path", str(corrupt), "--cpu-count", "1", "--memory", "64")
    assert proc.returncode == 35 and "[ E35 ]" in proc.stderr, proc.stderr
    assert site.ping()["launches"] == 1


def test_stale_server_is_replaced(site: Site, app_eif: Path) -> None:
    old = site.start("--stale-fingerprint")
    info = site.run(app_eif)  # the stale server gives way; the CLI launches directly and starts a fresh one
    _wait(lambda: not _alive(old), "the stale server to exit")
    new = site.ping()
    assert new["pid"] != old and new["launches"] == 0
    assert info["EnclaveName"] == "app"


def test_another_version_makes_the_server_give_way(site: Site) -> None:
    pid = site.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(site.run_dir / SOCKET_NAME))
        sock.sendall(json.dumps({"op": "ping", "version": "0.0.0-other"}).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
    assert "stale" in reply and "version" in reply["stale"]
    _wait(lambda: not _alive(pid), "the server to exit")
    assert not (site.run_dir / SOCKET_NAME).exists()


def test_peer_with_another_uid_is_refused(site: Site) -> None:
    pid = site.start()
    sock_path = site.run_dir / SOCKET_NAME
    # open the path to others (as a mistake would): the SO_PEERCRED check must still refuse them
    for d in (site.run_dir.parent, site.run_dir):
        d.chmod(0o711)
    sock_path.chmod(0o666)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 9
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                try:
                    sock.connect(str(sock_path))
                except OSError:
                    os._exit(2)
                try:
                    sock.sendall(b'{"op": "ping"}\n')  # the server may have closed already: refused too
                    code = 1 if sock.recv(4096) else 0
                except (BrokenPipeError, ConnectionResetError):
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a client under another uid got an answer (or no connection)"
    assert site.ping()["pid"] == pid  # still serving its own user


def test_bad_requests_get_no_launch(site: Site) -> None:
    pid = site.start()
    ident = site.ping()
    for payload in (b"x" * (70 << 10), b"[1, 2]\n", b"not json\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(site.run_dir / SOCKET_NAME))
            try:
                sock.sendall(payload)
                answer = sock.recv(4096)
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
            assert answer == b"", payload[:20]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(site.run_dir / SOCKET_NAME))
        request = {"op": "launch", "version": ident["version"], "package": ident["package"],
                   "python": ident["python"], "request": {"eif_path": "/x.eif"}, "env": {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["error"]["code"] == "E17"
    assert site.ping() == ident and ident["pid"] == pid


def test_off_switch(site: Site, app_eif: Path) -> None:
    off = {"ENCLAVEKIT_LAUNCH_SERVER": "off"}
    site.run(app_eif, **off)  # no server: none is started either
    assert site.cli("terminate-enclave", "--all").returncode == 0
    assert not (site.run_dir / SOCKET_NAME).exists() and not (site.run_dir / LOCK_NAME).exists()
    site.start()
    site.run(app_eif, **off)  # a server runs, but is not used
    assert site.ping()["launches"] == 0


def test_server_exits_when_its_run_directory_is_removed(site: Site) -> None:
    pid = site.start()
    shutil.rmtree(site.run_dir)
    _wait(lambda: not _alive(pid), "the server to notice its socket is gone")


def test_stop_and_sigterm(site: Site) -> None:
    pid = site.start()
    assert stop_server(site.run_dir)
    _wait(lambda: not _alive(pid), "the stopped server to exit")
    assert not (site.run_dir / SOCKET_NAME).exists()
    assert not stop_server(site.run_dir) and ping_server(site.run_dir) is None
    pid = site.start()
    os.kill(pid, signal.SIGTERM)
    _wait(lambda: not _alive(pid), "the server to exit on SIGTERM")
    assert not (site.run_dir / SOCKET_NAME).exists()


def test_socket_of_a_killed_server_is_replaced(site: Site) -> None:
    pid = site.start()
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not _alive(pid), "the killed server to die")
    assert (site.run_dir / SOCKET_NAME).exists() and ping_server(site.run_dir) is None
    assert site.start() != pid
    assert site.ping()["pid"] != pid


def test_concurrent_starts_leave_one_server(site: Site) -> None:
    env_before = os.environ.get("ENCLAVEKIT_LAUNCH_SERVER")
    os.environ["ENCLAVEKIT_LAUNCH_SERVER"] = "on"
    try:
        threads = [threading.Thread(target=start_server, args=(site.run_dir,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.environ["ENCLAVEKIT_LAUNCH_SERVER"] = env_before or "off"
    winner = site.ping()["pid"]

    def servers() -> set[int]:
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"enclavekit.runtime.launch_server" in argv and str(site.run_dir).encode() in argv:
                pid = int(entry.name)
                site.servers.add(pid)
                if _alive(pid):
                    found.add(pid)
        return found

    assert _wait(lambda: servers() == {winner}, "exactly one server to remain") is True
    assert site.lock_pid() == winner


def _store_entries(server_pid: int) -> list[Path]:
    """The image trees in the store of the server ``server_pid`` (found by the store's lock, held by that server)."""
    base = Path("/dev/shm") / f"enclavekit-images-{os.geteuid()}"
    if not base.is_dir():
        return []
    held = set()
    for fd in Path(f"/proc/{server_pid}/fd").iterdir():
        try:
            held.add(os.readlink(fd))
        except OSError:
            continue
    ours = []
    for store in base.iterdir():
        if str(store / ".server") in held:
            ours.extend(p for p in store.iterdir() if len(p.name) == 96 and p.is_dir())
    return sorted(ours)


def test_served_enclaves_of_one_image_share_its_tree(site: Site, app_eif: Path) -> None:
    server = site.start()
    (site.run_dir / "vsock" / "3").mkdir(parents=True)
    listener = UnixVsockTransport(site.run_dir / "vsock", local_cid=3).listen(PORT)
    try:
        first = site.run(app_eif)
        assert _ready(listener) == f"ready {first['EnclaveCID']}\n"
        second = site.run(app_eif)
        assert _ready(listener) == f"ready {second['EnclaveCID']}\n"
    finally:
        listener.close()
    entries = _store_entries(server)
    assert len(entries) == 1 and (entries[0] / "app").is_file()
    # each enclave's root is an overlay over that one tree (its writes go to its own tmpfs)
    roots = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().split(b"\0")[0] == b"/app":
                    roots.append(next(line for line in (proc / "mountinfo").read_text().splitlines()
                                      if line.split()[4] == "/"))
            except (OSError, StopIteration):
                continue
    assert len(roots) == 2 and all(" overlay " in r and f"lowerdir={entries[0]}," in r for r in roots), roots
    for info in (first, second):
        done = site.cli("terminate-enclave", "--enclave-id", info["EnclaveID"])
        assert done.returncode == 0, done.stderr
    assert entries[0].exists()  # kept for the next enclave of this image while the server lives
    assert stop_server(site.run_dir)
    _wait(lambda: not entries[0].parent.exists(), "the server's image store to be removed")


def test_the_image_store_can_be_turned_off(site: Site, app_eif: Path) -> None:
    server = site.start()
    (site.run_dir / "vsock" / "3").mkdir(parents=True)
    listener = UnixVsockTransport(site.run_dir / "vsock", local_cid=3).listen(PORT)
    try:
        info = site.run(app_eif, ENCLAVEKIT_IMAGE_STORE="off")
        assert _ready(listener) == f"ready {info['EnclaveCID']}\n"
    finally:
        listener.close()
    assert site.ping()["launches"] == 1 and _store_entries(server) == []


# ---------------------------------------------------------------- the security review's findings

_LIBC = ctypes.CDLL(None, use_errno=True)
_NO_EIF = "/nonexistent/enclavekit-launch-server-test.eif"  # never opened: every request below stops before


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _launch_message(site: Site, **overrides: Any) -> dict[str, Any]:
    request = {"eif_path": _NO_EIF, "memory_mib": 64, "cpu_count": 1, "run_dir": str(site.run_dir),
               "state_home": str(site.home), "owner_uid": os.geteuid(), **overrides}
    return {"op": "launch", **_identity(), "request": request}


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _line(sock: socket.socket) -> dict[str, Any] | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def _connected(site: Site) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(site.run_dir / SOCKET_NAME))
    return sock


def test_a_launch_starts_nothing_until_the_client_says_go(site: Site) -> None:
    pid = site.start()
    with _connected(site) as sock:
        _send(sock, _launch_message(site))
        assert _line(sock) == {"ready": pid}
    # the client went away before go (as one that timed out and launched directly): no supervisor
    with _connected(site) as sock:
        _send(sock, _launch_message(site))
        assert _line(sock) == {"ready": pid}
        _send(sock, {"go": "yes", "env": {}})  # anything but go: true is no go
        assert _line(sock) is None
    assert site.ping()["launches"] == 0
    assert not any(site.run_dir.glob("*/enclave.json"))


def test_a_stalled_client_does_not_hold_the_server(site: Site) -> None:
    pid = site.start()
    with _connected(site), _connected(site) as waiting:  # one sends nothing, one never says go
        _send(waiting, _launch_message(site))
        assert _line(waiting) == {"ready": pid}
        reply = ping_server(site.run_dir)  # once: the server dropped both stalled connections in time
    assert reply is not None and reply["pid"] == pid and reply["launches"] == 0


class _FakeServer:
    """A socket at ``<run>/launch.sock`` that answers a launch with ``first`` and records what the client sent."""

    def __init__(self, site: Site, first: dict[str, Any]) -> None:
        self.lines: list[dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(site.run_dir / SOCKET_NAME))
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.first = first
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn, conn.makefile("rb") as reader:
                conn.settimeout(10)
                self.lines.append(json.loads(reader.readline()))
                conn.sendall(json.dumps(self.first).encode() + b"\n")
                if "ready" in self.first:
                    line = reader.readline()
                    if line:
                        self.lines.append(json.loads(line))

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=30)


def test_after_go_the_client_never_launches_directly(site: Site, app_eif: Path) -> None:
    fake = _FakeServer(site, {"ready": os.getpid()})  # says ready, takes go, then ends without a report
    try:
        proc = site.cli("run-enclave", "--eif-path", str(app_eif), "--cpu-count", "1", "--memory", "64")
    finally:
        fake.close()
    assert proc.returncode == 39 and "[ E39 ]" in proc.stderr, proc.stderr
    assert "launch server ended without an answer" in proc.stderr
    assert not any(site.run_dir.glob("*/enclave.json"))  # no second, direct launch
    request, go = fake.lines
    assert request["op"] == "launch" and "env" not in request  # the environment only with go
    assert go["go"] is True and go["env"]["ENCLAVEKIT_RUN_DIR"] == str(site.run_dir)


def test_a_declined_launch_is_launched_directly_without_sending_the_environment(site: Site, app_eif: Path) -> None:
    fake = _FakeServer(site, {"declined": "test"})
    try:
        info = site.run(app_eif)
    finally:
        fake.close()
    assert info["EnclaveName"] == "app"
    assert len(fake.lines) == 1 and "env" not in fake.lines[0]
    site.lock_pid(wait=True)  # the CLI started a real server afterwards (stopped by the teardown)


def _unshare(flag: int) -> Any:
    return lambda: _check(_LIBC.unshare(flag))


def _drop_effective_cap() -> None:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}
    _check(_LIBC.capget(header, data))
    data[0] &= ~(1 << 22)  # CAP_SYS_BOOT leaves the effective set
    _check(_LIBC.capset(header, data))


def _allow_all_seccomp() -> None:
    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    ret_allow = (Filter * 1)(Filter(0x06, 0, 0, 0x7FFF0000))  # BPF_RET|BPF_K SECCOMP_RET_ALLOW
    prog = Program(1, ret_allow)
    _check(_LIBC.prctl(22, 2, ctypes.byref(prog), 0, 0))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _own_cgroup_dir() -> Path:
    """A new cgroup beside this process's (v1 ``pids`` hierarchy, else the unified one)."""
    lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    for _, controllers, path in lines:
        if controllers == "pids":
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/") / f"ekz-ctx-{os.getpid()}"
    path = next(p for _, c, p in lines if c == "")
    return Path("/sys/fs/cgroup") / path.lstrip("/") / f"ekz-ctx-{os.getpid()}"


def _into_cgroup(directory: Path) -> None:
    (directory / "cgroup.procs").write_text(f"{os.getpid()}\n")


def _limit_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512) - 1, hard))


# (expected reason fragment, change made before connecting, change made after connecting)
_CONTEXTS: dict[str, tuple[str, Any, Any]] = {
    "gid": ("gid", lambda: os.setegid(65534), None),
    "mnt namespace": ("ns/mnt", _unshare(0x00020000), None),
    "net namespace": ("ns/net", _unshare(0x40000000), None),
    "ipc namespace": ("ns/ipc", _unshare(0x08000000), None),
    "uts namespace": ("ns/uts", _unshare(0x04000000), None),
    "cgroup namespace": ("ns/cgroup", _unshare(0x02000000), None),
    "pid namespace of children": ("ns/pid_for_children", _unshare(0x20000000), None),
    "user namespace": ("ns/user", None, _unshare(0x10000000)),
    "root directory": ("root", None, lambda: os.chroot("/tmp")),
    "CapEff": ("CapEff", _drop_effective_cap, None),
    "CapBnd": ("CapBnd", lambda: _check(_LIBC.prctl(24, 22, 0, 0, 0)), None),  # PR_CAPBSET_DROP CAP_SYS_BOOT
    "NoNewPrivs": ("NoNewPrivs", lambda: _check(_LIBC.prctl(38, 1, 0, 0, 0)), None),  # PR_SET_NO_NEW_PRIVS
    "seccomp": ("Seccomp", _allow_all_seccomp, None),
    "umask": ("Umask", lambda: os.umask(0o077), None),
    "resource limits": ("limits", _limit_files, None),
    "cgroup": ("cgroup", "cgroup", None),
}


def _ask_from_child(site: Site, before: Any, after: Any) -> dict[str, Any] | None:
    """A forked client changes its context (``before`` / ``after`` connecting) and sends a launch request."""
    message = _launch_message(site)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_end)
            if before is not None:
                before()
            with _connected(site) as sock:
                if after is not None:
                    after()
                _send(sock, message)
                os.write(write_end, json.dumps(_line(sock)).encode())
            code = 0
        except BaseException as exc:  # reported to the parent
            os.write(write_end, json.dumps({"child failed": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        out = fh.read()
    os.waitpid(child, 0)
    reply: dict[str, Any] | None = json.loads(out)
    return reply


def test_a_client_in_the_servers_context_gets_ready(site: Site) -> None:
    pid = site.start()
    assert _ask_from_child(site, None, None) == {"ready": pid}


@pytest.mark.parametrize("case", sorted(_CONTEXTS))
def test_a_client_in_another_context_is_declined(site: Site, case: str) -> None:
    pid = site.start()
    fragment, before, after = _CONTEXTS[case]
    cgroup = None
    if before == "cgroup":
        cgroup = _own_cgroup_dir()
        cgroup.mkdir()
        before = lambda: _into_cgroup(cgroup)  # noqa: E731
    try:
        reply = _ask_from_child(site, before, after)
    finally:
        if cgroup is not None:
            cgroup.rmdir()
    assert reply is not None and "declined" in reply, reply
    assert fragment in reply["declined"], reply
    after = site.ping()
    assert (after["pid"], after["launches"]) == (pid, 0)


def test_a_cli_in_another_context_launches_directly(site: Site, app_eif: Path) -> None:
    site.start()
    proc = subprocess.run(["setpriv", "--no-new-privs", ENCLAVEKIT, "run-enclave", "--eif-path", str(app_eif),
                           "--cpu-count", "1", "--memory", "64"], env=site.env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    site.supervisors.add(json.loads(proc.stdout)["ProcessID"])
    assert site.ping()["launches"] == 0


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"run_dir": "/tmp"}, "run_dir"),
    ({"owner_uid": 4242}, "owner_uid 4242"),
])
def test_a_request_for_another_run_dir_or_owner_is_declined(site: Site, overrides: dict[str, Any],
                                                            expected: str) -> None:
    site.start()
    with _connected(site) as sock:
        _send(sock, _launch_message(site, **overrides))
        reply = _line(sock)
    assert reply is not None and expected in reply["declined"]
    assert site.ping()["launches"] == 0


def test_a_relative_eif_path_is_refused(site: Site) -> None:
    site.start()
    with _connected(site) as sock:
        _send(sock, _launch_message(site, eif_path="app.eif"))
        reply = _line(sock)
    assert reply is not None and reply["error"]["code"] == "E17" and "absolute" in reply["error"]["message"]


@pytest.mark.parametrize("change", [
    {"memory_mib": True}, {"memory_mib": "64"}, {"memory_mib": 64.0}, {"cpu_count": False},
    {"cpu_count": None, "cpu_ids": [True]}, {"cpu_count": None, "cpu_ids": "1"}, {"enclave_cid": "16"},
    {"debug_mode": 1}, {"device_emulation": None}, {"enclave_name": 7}, {"parent_role_arn": []},
    {"parent_instance_id": 1}, {"run_dir": None}, {"state_home": 1}, {"owner_uid": False},
    {"boot_timeout": "10"}, {"boot_timeout": True}, {"eif_path": None},
])
def test_run_request_fields_have_exactly_their_types(change: dict[str, Any]) -> None:
    good = {"eif_path": "/x.eif", "memory_mib": 64, "cpu_count": 1, "boot_timeout": 1.5}
    assert RunRequest.from_json(good).boot_timeout == 1.5
    with pytest.raises(ValueError, match="run request field"):
        RunRequest.from_json({**good, **change})


def test_run_request_needs_its_required_fields() -> None:
    with pytest.raises(ValueError, match="missing run request fields"):
        RunRequest.from_json({"eif_path": "/x.eif", "cpu_count": 1})


def _library_request(site: Site, run_dir: Path) -> dict[str, Any]:
    return {**_launch_message(site)["request"], "run_dir": str(run_dir)}


@pytest.mark.parametrize("layout", ["group-writable", "other-writable", "symlink"])
def test_the_client_uses_no_server_in_an_unsafe_run_directory(site: Site, layout: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    site.start()
    run_dir = site.run_dir
    if layout == "symlink":
        run_dir = site.run_dir.parent / "run-link"
        run_dir.symlink_to(site.run_dir)
    else:
        site.run_dir.chmod(0o775 if layout == "group-writable" else 0o757)
    monkeypatch.setenv("ENCLAVEKIT_LAUNCH_SERVER", "on")
    try:
        assert launch_via_server(_library_request(site, run_dir)) is None
    finally:
        site.run_dir.chmod(0o755)
    assert site.ping()["launches"] == 0


def test_the_client_talks_only_to_its_own_users_server(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket listening under another uid (bound by root, then listen() as nobody) gets nothing at all."""
    read_end, write_end = os.pipe()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_end)
            os.close(ready_r)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(site.run_dir / SOCKET_NAME))
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            listener.listen(1)  # SO_PEERCRED of its connections: nobody
            os.write(ready_w, b"1")
            listener.settimeout(20)
            conn, _ = listener.accept()
            conn.settimeout(5)
            got = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    got += chunk
            os.write(write_end, str(len(got)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        monkeypatch.setenv("ENCLAVEKIT_LAUNCH_SERVER", "on")
        assert launch_via_server(_library_request(site, site.run_dir)) is None
    finally:
        with os.fdopen(read_end, "rb") as fh:
            received = fh.read()
        os.close(ready_r)
        os.waitpid(child, 0)
    assert received == b"0"  # connected, then closed without sending a byte (no request, no environment)


def test_a_server_gives_way_when_any_package_file_is_newer(site: Site, tmp_path: Path) -> None:
    """Even a module the server never imported: its code may be older than the files beside it."""
    package = Path(enclavekit.__file__).parent
    copy = tmp_path / "lib"
    shutil.copytree(package, copy / "enclavekit", ignore=shutil.ignore_patterns("__pycache__"))
    env = site.env(PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([sys.executable, "-m", "enclavekit.runtime.launch_server", str(site.run_dir), "--detach"],
                   env=env, check=True, timeout=30)
    pid = site.lock_pid(wait=True)

    def ping() -> dict[str, Any] | None:
        with _connected(site) as sock:
            _send(sock, {"op": "ping"})
            return _line(sock)

    first = _wait(ping, "the copied server to answer")
    assert first["pid"] == pid and first["package"] == str(copy / "enclavekit")
    unloaded = copy / "enclavekit" / "kms" / "__init__.py"
    assert unloaded.is_file()
    os.utime(unloaded)  # now: not older than the server's first import
    reply = ping()
    assert reply is not None and "stale" in reply and str(unloaded) in reply["stale"]
    _wait(lambda: not _alive(pid), "the stale server to exit")


def test_a_detached_server_keeps_no_inherited_descriptor(site: Site) -> None:
    read_end, write_end = os.pipe()
    try:
        subprocess.run([sys.executable, "-m", "enclavekit.runtime.launch_server", str(site.run_dir), "--detach"],
                       env=site.env(), check=True, timeout=30, pass_fds=(write_end,))
        os.close(write_end)
        write_end = -1
        site.ping()  # it serves: its start-up, closing included, is over
        os.set_blocking(read_end, False)
        try:
            data = os.read(read_end, 1)
        except BlockingIOError:
            data = None  # a writer is still open: the server kept the descriptor
        assert data == b""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


_LIBRARY_LAUNCH = """
import json, sys
from pathlib import Path
from enclavekit.runtime.registry import Registry
from enclavekit.runtime.supervisor import RunRequest, launch
request = RunRequest.from_json(json.loads(sys.argv[1]))
Registry(Path(request.run_dir)).ensure()
for kwargs in json.loads(sys.argv[2]):
    print(json.dumps(launch(request, **kwargs)), flush=True)
"""


def test_the_library_launch_uses_and_starts_no_server_unless_asked(site: Site, app_eif: Path,
                                                                   tmp_path: Path) -> None:
    site.start()
    trace = tmp_path / "trace"
    request = {**_launch_message(site)["request"], "eif_path": str(app_eif)}
    proc = subprocess.run([sys.executable, "-c", _LIBRARY_LAUNCH, json.dumps(request),
                           json.dumps([{}, {"start_server_after": True}])],
                          env=site.env(ENCLAVEKIT_LAUNCH_TRACE=str(trace)), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    infos = [json.loads(line) for line in proc.stdout.splitlines()]
    site.supervisors.update(info["ProcessID"] for info in infos)
    assert len(infos) == 2 and site.ping()["launches"] == 0  # both launched directly
    labels = [line.split(" ", 2)[2] for line in trace.read_text().splitlines()]
    assert labels.count("cli: start launch server") == 1  # only the launch that asked for it
    assert "cli: launch via server" not in labels


def test_terminate_all_leaves_no_server_socket_or_store(site: Site, app_eif: Path) -> None:
    # issue 4: nothing is left behind after terminate-enclave --all (no process, socket, mount; here, no tree)
    server = site.start()
    (site.run_dir / "vsock" / "3").mkdir(parents=True)
    listener = UnixVsockTransport(site.run_dir / "vsock", local_cid=3).listen(PORT)
    try:
        info = site.run(app_eif)
        assert _ready(listener) == f"ready {info['EnclaveCID']}\n"
    finally:
        listener.close()
    stores = {p.parent for p in _store_entries(server)}
    assert len(stores) == 1
    done = site.cli("terminate-enclave", "--all")
    assert done.returncode == 0, done.stderr
    _wait(lambda: not _alive(server), "the launch server to exit")
    assert not (site.run_dir / SOCKET_NAME).exists()
    _wait(lambda: not any(s.exists() for s in stores), "the server's image store to be removed")


def test_the_eif_travels_as_the_clients_descriptor_never_as_a_path_the_server_opens(site: Site,
                                                                                  app_eif: Path) -> None:
    # A go without a descriptor is refused: the server never opens the EIF with its own rights.
    pid = site.start()
    with _connected(site) as sock:
        _send(sock, _launch_message(site))
        assert _line(sock) == {"ready": pid}
        _send(sock, {"go": True, "env": dict(os.environ)})
        reply = _line(sock)
        assert reply is not None and reply["error"]["code"] == "E17" and "descriptor" in reply["error"]["message"]
    assert site.ping()["launches"] == 0
    # With one, the supervisor reads what the client opened, whatever the request's path says (_NO_EIF does not
    # exist): the path is only the enclave's label.
    (site.run_dir / "vsock" / "3").mkdir(parents=True)
    listener = UnixVsockTransport(site.run_dir / "vsock", local_cid=3).listen(PORT)
    try:
        with _connected(site) as sock, open(app_eif, "rb") as eif:
            _send(sock, _launch_message(site))
            assert _line(sock) == {"ready": pid}
            go = json.dumps({"go": True, "env": site.env()}).encode() + b"\n"
            assert socket.send_fds(sock, [go], [eif.fileno()]) == len(go)
            sock.settimeout(120)
            lines: list[dict[str, Any]] = []
            with sock.makefile("rb") as report:
                while not lines or not ({"ok", "error"} & set(lines[-1])):
                    raw = report.readline()
                    assert raw, lines
                    lines.append(json.loads(raw))
        assert "ok" in lines[-1], lines
        info = lines[-1]["ok"]
        site.supervisors.add(info["ProcessID"])
        assert _ready(listener) == f"ready {info['EnclaveCID']}\n"
    finally:
        listener.close()
    described = json.loads(site.cli("describe-enclaves").stdout)
    expected = json.loads(site.cli("describe-eif", "--eif-path", str(app_eif)).stdout)["Measurements"]
    assert [d["Measurements"] for d in described] == [expected]
