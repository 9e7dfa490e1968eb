"""The isolation battery (issue 4, Tests): probes run INSIDE a sandbox and try what an enclave must not do.

The probe is a static C program compiled here with ``gcc -static`` (glibc), copied into the sandbox's tmpfs root:
no host path is visible inside, so no host interpreter can run there.  Every test closes its sandbox in a
``finally`` (the ``run_probe`` fixture) and the module checks that no cgroup, mount or process is left behind.
These tests need root; without it they FAIL with a message (never skip).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from enclavekit.errors import SandboxBootError, SandboxError
from enclavekit.runtime.cgroups import current_layout
from enclavekit.runtime.sandbox import Sandbox, SandboxProcess, SandboxSpec

pytestmark = pytest.mark.integration

EAFNOSUPPORT = 97
EPERM = 1
EAGAIN = 11
ENOENT = 2
ECONNREFUSED = 111
EROFS = 30

PROBE_C = r"""
/* Probe run INSIDE the enclave sandbox by tests/integration/test_sandbox.py (compiled there with gcc -static).
 * Each mode tries one thing the sandbox must refuse (or allow) and prints one result line. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

static int try_socket(int family, int type) {
    int s = socket(family, type, 0);
    if (s < 0) { printf("socket family=%d refused errno=%d\n", family, errno); return 0; }
    /* Got a socket: report what it really is, close it, and never connect with it. */
    int dom = -1; socklen_t len = sizeof dom;
    getsockopt(s, SOL_SOCKET, SO_DOMAIN, &dom, &len);
    printf("socket family=%d CREATED domain=%d\n", family, dom);
    close(s);
    return 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2) return 2;
    const char *m = argv[1];
    if (!strcmp(m, "tcp")) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) { printf("tcp socket refused errno=%d\n", errno); return 0; }
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
            printf("tcp connect failed errno=%d\n", errno);
            return 0;
        }
        printf("tcp CONNECTED\n");
        return 1;
    }
    if (!strcmp(m, "vsock")) return try_socket(40, SOCK_STREAM);
    if (!strcmp(m, "netlink")) return try_socket(16, SOCK_RAW);
    if (!strcmp(m, "packet")) return try_socket(17, SOCK_RAW);
    if (!strcmp(m, "rds")) return try_socket(21, SOCK_SEQPACKET);
    if (!strcmp(m, "tipc")) return try_socket(30, SOCK_RDM);
    if (!strcmp(m, "alg")) return try_socket(38, SOCK_SEQPACKET);
    if (!strcmp(m, "open")) {
        FILE *f = fopen(argv[2], "r");
        if (!f) { printf("open %s failed errno=%d\n", argv[2], errno); return 0; }
        char buf[256] = {0}; fgets(buf, sizeof buf, f);
        printf("open %s OK: %s\n", argv[2], buf);
        return 1;
    }
    if (!strcmp(m, "ls")) {
        DIR *d = opendir(argv[2]);
        if (!d) { printf("ls failed errno=%d\n", errno); return 1; }
        struct dirent *e; printf("entries:");
        while ((e = readdir(d))) if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) printf(" %s", e->d_name);
        printf("\n");
        return 0;
    }
    if (!strcmp(m, "cat")) {
        FILE *f = fopen(argv[2], "r"); char buf[512];
        if (!f) { printf("cat failed errno=%d\n", errno); return 1; }
        while (fgets(buf, sizeof buf, f)) fputs(buf, stdout);
        return 0;
    }
    if (!strcmp(m, "oom")) {
        long mib = atol(argv[2]);
        for (long i = 0; i < mib; i++) {
            char *p = malloc(1 << 20);
            if (!p) { printf("malloc failed at %ld MiB\n", i); return 0; }
            memset(p, 0x5a, 1 << 20);
            if (i % 16 == 0) printf("allocated %ld MiB\n", i);
        }
        printf("allocated everything: NOT LIMITED\n");
        return 1;
    }
    if (!strcmp(m, "forkbomb")) {
        int n = 0;
        for (;;) {
            pid_t p = fork();
            if (p == 0) { pause(); _exit(0); }
            if (p < 0) { printf("fork failed errno=%d after %d children\n", errno, n); return 0; }
            if (++n > 100000) { printf("fork NOT LIMITED\n"); return 1; }
        }
    }
    if (!strcmp(m, "ptrace")) {
        if (ptrace(PTRACE_ATTACH, 1, 0, 0) < 0) { printf("ptrace refused errno=%d\n", errno); return 0; }
        printf("ptrace ALLOWED\n"); return 1;
    }
    if (!strcmp(m, "mount")) {
        if (mount("none", "/tmp", "tmpfs", 0, NULL) < 0) { printf("mount refused errno=%d\n", errno); return 0; }
        printf("mount ALLOWED\n"); return 1;
    }
    if (!strcmp(m, "unshare")) {
        if (unshare(CLONE_NEWNS) < 0) { printf("unshare refused errno=%d\n", errno); return 0; }
        printf("unshare ALLOWED\n"); return 1;
    }
    if (!strcmp(m, "unix")) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
            printf("unix connect failed errno=%d\n", errno);
            return 1;
        }
        write(s, "ping from enclave\n", 18);
        printf("unix sent\n");
        return 0;
    }
    if (!strcmp(m, "openw")) {  /* open for writing, never write */
        int fd = open(argv[2], O_WRONLY);
        if (fd < 0) { printf("openw %s refused errno=%d\n", argv[2], errno); return 0; }
        close(fd);
        printf("openw %s ALLOWED\n", argv[2]);
        return 1;
    }
    if (!strcmp(m, "chmod")) {  /* chmod to the current mode: a no-op if it were allowed */
        struct stat st;
        if (stat(argv[2], &st) < 0) { printf("stat failed errno=%d\n", errno); return 1; }
        if (chmod(argv[2], st.st_mode & 07777) < 0) { printf("chmod refused errno=%d\n", errno); return 0; }
        printf("chmod ALLOWED\n");
        return 1;
    }
    if (!strcmp(m, "devnull")) {
        int fd = open("/dev/null", O_WRONLY);
        if (fd < 0 || write(fd, "x", 1) != 1) { printf("devnull failed errno=%d\n", errno); return 1; }
        printf("devnull ok\n");
        return 0;
    }
    if (!strcmp(m, "mkfile")) {  /* create a file (mode 0644) */
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) { printf("mkfile refused errno=%d\n", errno); return 0; }
        close(fd); printf("mkfile ALLOWED\n"); return 0;
    }
    if (!strcmp(m, "setid")) {  /* try to give a new file set-uid bits, at creation and with chmod */
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_EXCL, 04755);
        printf("create 04755 %s errno=%d\n", fd < 0 ? "refused" : "ALLOWED", fd < 0 ? errno : 0);
        if (fd >= 0) close(fd);
        fd = open(argv[2], O_WRONLY | O_CREAT, 0755);
        if (fd >= 0) close(fd);
        int rc = chmod(argv[2], 04755);
        printf("chmod 04755 %s errno=%d\n", rc < 0 ? "refused" : "ALLOWED", rc < 0 ? errno : 0);
        rc = chmod(argv[2], 0700);
        printf("chmod 0700 %s\n", rc < 0 ? "refused" : "ALLOWED");
        return 0;
    }
    if (!strcmp(m, "xattr")) {  /* a file capability would be root on the host (identity uid map) */
        int fd = open(argv[2], O_CREAT | O_WRONLY, 0755);
        if (fd < 0) { printf("create failed errno=%d\n", errno); return 1; }
        unsigned char cap[20] = {0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff};  /* VFS_CAP_REVISION_2, all permitted */
        int r1 = setxattr(argv[2], "security.capability", cap, sizeof cap, 0);
        int e1 = errno;
        int r2 = fsetxattr(fd, "user.x", "1", 1, 0);
        int e2 = errno;
        printf("setxattr %s errno=%d\n", r1 < 0 ? "refused" : "ALLOWED", r1 < 0 ? e1 : 0);
        printf("fsetxattr %s errno=%d\n", r2 < 0 ? "refused" : "ALLOWED", r2 < 0 ? e2 : 0);
        close(fd);
        return 0;
    }
    if (!strcmp(m, "write")) {  /* write argv[3] into argv[2] (created or truncated) */
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, argv[3], strlen(argv[3])) < 0) { printf("write failed errno=%d\n", errno); return 1; }
        close(fd); printf("write OK\n"); return 0;
    }
    if (!strcmp(m, "rm")) {
        if (unlink(argv[2]) < 0) { printf("rm failed errno=%d\n", errno); return 1; }
        printf("rm OK\n"); return 0;
    }
    if (!strcmp(m, "sleep")) { printf("ready\n"); for (;;) pause(); }
    if (!strcmp(m, "exit")) return atoi(argv[2]);
    return 2;
}
"""


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the sandbox battery needs root (user/PID/mount/net namespaces, cgroups); run it as root")


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_root()
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the static probe program (apt-get install gcc libc6-dev)")
    work = tmp_path_factory.mktemp("probe")
    (work / "probe.c").write_text(PROBE_C)
    subprocess.run([gcc, "-static", "-O1", "-o", str(work / "probe"), str(work / "probe.c")], check=True,
                   capture_output=True)
    return work / "probe"


def _own_cgroup_dirs() -> list[Path]:
    layout = current_layout()
    return sorted(set(layout.own_dirs.values()))


def _leftovers(name: str) -> list[str]:
    found = [str(d / name) for d in _own_cgroup_dirs() if (d / name).exists()]
    mounts = Path("/proc/self/mountinfo").read_text()
    if name in mounts:
        found.append(f"mount containing {name}")
    return found


@pytest.fixture
def run_probe(probe: Path) -> Iterator[Callable[..., tuple[int, str, SandboxProcess]]]:
    started: list[SandboxProcess] = []

    def run(*args: str, memory_mib: int = 128, pids_max: int = 64, timeout: float = 60,
            sockets: dict[str, str] | None = None, wait: bool = True, **options: Any
            ) -> tuple[int, str, SandboxProcess]:
        def fill(root: Path) -> None:
            (root / "bin").mkdir()
            shutil.copy(probe, root / "bin" / "probe")

        sp = Sandbox.start(SandboxSpec(argv=("/bin/probe", *args), rootfs=fill, memory_mib=memory_mib,
                                       pids_max=pids_max, env={"PATH": "/bin"}, sockets=sockets or {}, **options))
        started.append(sp)
        if not wait:
            return -1, "", sp
        out = sp.console.read().decode(errors="replace")  # EOF when every process in the sandbox is gone
        return sp.wait(timeout), out, sp

    try:
        yield run
    finally:
        for sp in started:
            sp.close()
        leaks = [leak for sp in started for leak in _leftovers(sp.name)]
        assert not leaks, f"left behind: {leaks}"


def test_outward_tcp_to_host_loopback_fails(run_probe: Callable[..., tuple[int, str, SandboxProcess]]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        rc, out, _ = run_probe("tcp", str(port))
        assert rc == 0, out
        # the sandbox's own lo has no listener: refused locally, the host's listener is unreachable
        assert f"tcp connect failed errno={ECONNREFUSED}" in out
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()


@pytest.mark.parametrize("family", ["vsock", "netlink", "packet", "rds", "tipc", "alg"])
def test_forbidden_socket_families_are_refused(run_probe: Callable[..., tuple[int, str, SandboxProcess]],
                                               family: str) -> None:
    rc, out, _ = run_probe(family)
    assert rc == 0, out
    assert f"refused errno={EAFNOSUPPORT}" in out


def test_host_files_are_invisible(run_probe: Callable[..., tuple[int, str, SandboxProcess]],
                                  tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host-only-content\n")
    for path in (str(secret), "/etc/hostname", "/work/main/pyproject.toml", "/usr/bin/python3"):
        rc, out, _ = run_probe("open", path)
        assert rc == 0 and f"failed errno={ENOENT}" in out, out
    rc, out, _ = run_probe("ls", "/")
    assert rc == 0
    assert sorted(out.split("entries:")[1].split()) == ["bin", "dev", "proc", "tmp"]
    rc, out, _ = run_probe("ls", "/dev")
    assert sorted(out.split("entries:")[1].split()) == ["full", "null", "random", "urandom", "zero"]


def test_host_processes_are_invisible(run_probe: Callable[..., tuple[int, str, SandboxProcess]]) -> None:
    rc, out, _ = run_probe("ls", "/proc")
    assert rc == 0
    pids = sorted(int(e) for e in out.split("entries:")[1].split() if e.isdigit())
    assert pids == [1, 2], f"only PID 1 and the probe itself may be visible, got {pids}"


def test_only_loopback_exists(run_probe: Callable[..., tuple[int, str, SandboxProcess]]) -> None:
    rc, out, _ = run_probe("cat", "/proc/net/dev")
    assert rc == 0
    names = [line.split(":")[0].strip() for line in out.splitlines() if ":" in line]
    assert names == ["lo"]


def test_memory_limit_kills_only_the_enclave(run_probe: Callable[..., tuple[int, str, SandboxProcess]]) -> None:
    rc, out, sp = run_probe("oom", "1024", memory_mib=64)
    assert "NOT LIMITED" not in out
    assert rc == 128 + signal.SIGKILL, out
    assert sp.oom_killed()
    # this process (the host side) is untouched and the launcher's parent is still us
    assert os.getpid() > 0


def test_fork_bomb_stops_at_the_pids_limit(run_probe: Callable[..., tuple[int, str, SandboxProcess]]) -> None:
    rc, out, _ = run_probe("forkbomb", pids_max=16)
    assert rc == 0, out
    assert f"fork failed errno={EAGAIN}" in out
    children = int(out.split(" after ")[1].split()[0])
    assert children < 16


@pytest.mark.parametrize("what", ["ptrace", "mount", "unshare"])
def test_privileged_calls_are_refused(run_probe: Callable[..., tuple[int, str, SandboxProcess]], what: str) -> None:
    rc, out, _ = run_probe(what)
    assert rc == 0, out
    assert f"{what} refused errno={EPERM}" in out


@pytest.mark.parametrize("path", ["/proc/sysrq-trigger", "/proc/sys/kernel/core_pattern",
                                  "/proc/sys/vm/drop_caches", "/proc/irq/default_smp_affinity"])
def test_host_kernel_knobs_are_read_only(run_probe: Callable[..., tuple[int, str, SandboxProcess]],
                                         path: str) -> None:
    # The probe only opens for writing (never writes): EROFS from the read-only bind over /proc/sys etc.
    rc, out, _ = run_probe("openw", path)
    assert rc == 0, out
    expected = EROFS if Path(path).exists() else ENOENT  # e.g. a kernel without CONFIG_MAGIC_SYSRQ
    assert f"refused errno={expected}" in out


@pytest.mark.parametrize("path", ["/dev/null", "/run/enclave/parent.sock"])
def test_shared_host_inodes_cannot_be_changed(run_probe: Callable[..., tuple[int, str, SandboxProcess]],
                                              tmp_path: Path, path: str) -> None:
    sock_path = tmp_path / "parent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(sock_path))
        rc, out, _ = run_probe("chmod", path, sockets={str(sock_path): "/run/enclave/parent.sock"})
    assert rc == 0, out
    assert f"chmod refused errno={EROFS}" in out


def test_dev_null_is_usable(run_probe: Callable[..., tuple[int, str, SandboxProcess]]) -> None:
    rc, out, _ = run_probe("devnull")
    assert rc == 0 and "devnull ok" in out


def test_exit_status_is_the_applications(run_probe: Callable[..., tuple[int, str, SandboxProcess]]) -> None:
    rc, _, _ = run_probe("exit", "7")
    assert rc == 7


def test_sigterm_is_forwarded_to_the_application(
        run_probe: Callable[..., tuple[int, str, SandboxProcess]]) -> None:
    _, _, sp = run_probe("sleep", wait=False)
    assert sp.console.readline() == b"ready\n"
    assert sp.terminate(grace=10) == 128 + signal.SIGTERM


def test_kill_leaves_nothing_behind(run_probe: Callable[..., tuple[int, str, SandboxProcess]]) -> None:
    _, _, sp = run_probe("forkbomb", pids_max=12, wait=False)
    assert sp.console.readline().startswith(b"fork failed")  # the children are still alive (paused)
    pids = sp.cgroup.pids()
    assert len(pids) >= 4
    sp.close()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert _leftovers(sp.name) == []
    assert not sp.stage.exists()


def test_channel_socket_is_the_only_shared_path(run_probe: Callable[..., tuple[int, str, SandboxProcess]],
                                                tmp_path: Path) -> None:
    path = tmp_path / "parent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(30)
        rc, out, _ = run_probe("unix", "/run/enclave/parent.sock", sockets={str(path): "/run/enclave/parent.sock"})
        assert rc == 0, out
        conn, _ = server.accept()
        with conn:
            assert conn.recv(100) == b"ping from enclave\n"
    rc, out, _ = run_probe("open", str(tmp_path / "other-file"))
    assert f"failed errno={ENOENT}" in out


def test_missing_program_is_a_boot_failure(probe: Path) -> None:
    def fill(root: Path) -> None:
        (root / "bin").mkdir()

    with pytest.raises(SandboxBootError) as info:
        Sandbox.start(SandboxSpec(argv=("/bin/absent",), rootfs=fill, memory_mib=64, name="enclavekit-boot-test"))
    assert info.value.code == "E36"
    assert "/bin/absent" in str(info.value)
    assert _leftovers("enclavekit-boot-test") == []


# ---------------------------------------------------------------- vsock channel directories


def test_channel_directories_parent_read_only_own_writable(
        run_probe: Callable[..., tuple[int, str, SandboxProcess]], tmp_path: Path) -> None:
    parent, own = tmp_path / "vsock3", tmp_path / "vsock16"
    parent.mkdir()
    own.mkdir()
    dirs = {"directories": {str(parent): "/run/enclavekit/vsock/3"},
            "writable_directories": {str(own): "/run/enclavekit/vsock/16"}}
    _, out, _ = run_probe("mkfile", "/run/enclavekit/vsock/3/443.sock", **dirs)
    assert f"mkfile refused errno={EROFS}" in out, out  # an enclave cannot pose as a parent listener
    assert not (parent / "443.sock").exists()
    _, out, _ = run_probe("mkfile", "/run/enclavekit/vsock/16/5000.sock", **dirs)
    assert "mkfile ALLOWED" in out, out
    assert (own / "5000.sock").exists()  # the enclave's own directory is the host's
    _, out, _ = run_probe("ls", "/run/enclavekit/vsock", **dirs)
    assert out.split() == ["entries:", "16", "3"] or out.split() == ["entries:", "3", "16"], out


def test_set_id_bits_are_refused(run_probe: Callable[..., tuple[int, str, SandboxProcess]],
                                 tmp_path: Path) -> None:
    own = tmp_path / "vsock16"
    own.mkdir()
    _, out, _ = run_probe("setid", "/run/enclavekit/vsock/16/x",
                           writable_directories={str(own): "/run/enclavekit/vsock/16"})
    assert f"create 04755 refused errno={EPERM}" in out, out
    assert f"chmod 04755 refused errno={EPERM}" in out, out
    assert "chmod 0700 ALLOWED" in out, out  # only the set-id bits are refused
    assert not (own / "x").stat().st_mode & 0o6000


def test_extended_attributes_are_refused(run_probe: Callable[..., tuple[int, str, SandboxProcess]],
                                        tmp_path: Path) -> None:
    own = tmp_path / "vsock16"
    own.mkdir()
    _, out, _ = run_probe("xattr", "/run/enclavekit/vsock/16/x",
                           writable_directories={str(own): "/run/enclavekit/vsock/16"})
    assert f"setxattr refused errno={EPERM}" in out, out
    assert f"fsetxattr refused errno={EPERM}" in out, out
    assert not os.listxattr(own / "x")


def test_a_symlink_is_not_a_channel_directory(probe: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(SandboxError, match="not a directory"):
        Sandbox.start(SandboxSpec(argv=("/bin/probe",), rootfs=lambda root: None, memory_mib=64,
                                  directories={str(tmp_path / "link"): "/run/x"}, name="enclavekit-link-test"))
    assert _leftovers("enclavekit-link-test") == []


# ---------------------------------------------------------------- boot window and heartbeat


def _heartbeat_listener(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(30)
    return server


def _read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        c = conn.recv(1)
        assert c, f"stream ended after {line!r}"
        line += c
    return line


def test_pid1_sends_the_heartbeat_after_the_boot(run_probe: Callable[..., tuple[int, str, SandboxProcess]],
                                                 tmp_path: Path) -> None:
    path = tmp_path / "hb.sock"
    with _heartbeat_listener(path) as server:
        _, _, sp = run_probe("sleep", wait=False, heartbeat=str(path), await_boot=True)
        assert sp.console.readline() == b"ready\n"  # start() returned: the application runs
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            assert _read_line(conn) == b"CONNECT 9000\n"  # Firecracker's handshake, port 9000 (spec §3.8)
            conn.sendall(b"OK 1073741824\n")
            assert conn.recv(1) == b"\xb7"
            conn.sendall(b"\xb7")
            assert conn.recv(1) == b""  # PID 1 closes the heartbeat connection
    assert sp.returncode is None  # the enclave lives on


def test_a_wrong_heartbeat_echo_ends_the_sandbox(run_probe: Callable[..., tuple[int, str, SandboxProcess]],
                                                 tmp_path: Path) -> None:
    path = tmp_path / "hb.sock"
    with _heartbeat_listener(path) as server:
        _, _, sp = run_probe("sleep", wait=False, heartbeat=str(path), await_boot=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            _read_line(conn)
            conn.sendall(b"OK 1\n")
            assert conn.recv(1) == b"\xb7"
            conn.sendall(b"\x00")
            out = sp.console.read().decode(errors="replace")
    assert "boot heartbeat failed" in out
    assert sp.wait(30) == 128 + signal.SIGKILL


def test_an_application_exiting_during_its_boot_is_e36(probe: Path) -> None:
    def fill(root: Path) -> None:
        (root / "bin").mkdir()
        shutil.copy(probe, root / "bin" / "probe")

    with pytest.raises(SandboxBootError) as info:
        Sandbox.start(SandboxSpec(argv=("/bin/probe", "exit", "7"), rootfs=fill, memory_mib=64, await_boot=True,
                                  name="enclavekit-exit-test"))
    assert info.value.code == "E36"
    assert "exited at boot with status 7" in str(info.value)
    assert _leftovers("enclavekit-exit-test") == []


# ---------------------------------------------------------------- the shared image tree (image_store) as the root


def _image_tree(probe: Path, tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy(probe, tree / "bin" / "probe")
    (tree / "data").mkdir()
    (tree / "data" / "keep.txt").write_text("from the image\n")
    (tree / "data" / "gone.txt").write_text("to delete\n")
    return tree


def _run_on_tree(tree: Path, *args: str) -> tuple[int, str]:
    def nothing(_root: Path) -> None:
        return None

    sp = Sandbox.start(SandboxSpec(argv=("/bin/probe", *args), rootfs=nothing, lower=str(tree), memory_mib=64,
                                   pids_max=16, env={"PATH": "/bin"}))
    try:
        out = sp.console.read().decode(errors="replace")
        return sp.wait(60), out
    finally:
        sp.close()
        assert not _leftovers(sp.name), _leftovers(sp.name)


def test_an_overlay_root_shows_the_tree_and_keeps_writes_private(probe: Path, tmp_path: Path) -> None:
    tree = _image_tree(probe, tmp_path)
    before = {p.relative_to(tree): p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    rc, out = _run_on_tree(tree, "cat", "/data/keep.txt")
    assert rc == 0 and "from the image" in out
    rc, out = _run_on_tree(tree, "ls", "/")
    assert sorted(out.split("entries:")[1].split()) == ["bin", "data", "dev", "proc", "tmp"]  # no upper/work
    rc, out = _run_on_tree(tree, "write", "/data/keep.txt", "changed inside")
    assert rc == 0 and "write OK" in out, out
    rc, out = _run_on_tree(tree, "rm", "/data/gone.txt")
    assert rc == 0 and "rm OK" in out, out
    rc, out = _run_on_tree(tree, "write", "/data/new.txt", "new")
    assert rc == 0, out
    after = {p.relative_to(tree): p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    assert after == before  # the shared tree is untouched: every write went to that sandbox's own tmpfs


def test_a_missing_tree_is_refused(probe: Path, tmp_path: Path) -> None:
    def nothing(_root: Path) -> None:
        return None

    link = tmp_path / "link"
    link.symlink_to(_image_tree(probe, tmp_path))
    for lower, match in ((tmp_path / "absent", "No such file"), (link, "symlinks are refused")):
        with pytest.raises(SandboxError, match=match):
            Sandbox.start(SandboxSpec(argv=("/bin/probe", "ls", "/"), rootfs=nothing, lower=str(lower),
                                      memory_mib=64))


@pytest.mark.parametrize("on_tree", [False, True])
def test_image_symlinks_never_lead_the_launcher_to_the_host(probe: Path, tmp_path: Path, on_tree: bool) -> None:
    # An image whose /tmp, /dev, /proc and /run point at host directories: the launcher makes /tmp 1777, creates
    # the device and socket files and mounts /proc; all of it must happen inside the root, never on the host.
    # not under /tmp: the image's own /tmp symlink would make /tmp/... loop inside the root instead of pointing at
    # the host directory
    outside = Path(tempfile.mkdtemp(prefix="ek-host-", dir="/var/tmp"))
    try:
        _symlinked_image_runs_inside(probe, tmp_path, outside, on_tree)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def _symlinked_image_runs_inside(probe: Path, tmp_path: Path, outside: Path, on_tree: bool) -> None:
    host = {name: outside / f"host-{name}" for name in ("tmp", "dev", "proc", "run")}
    for d in host.values():
        d.mkdir(mode=0o755)
        d.chmod(0o755)
    channel = tmp_path / "parent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(channel))

        def fill(root: Path) -> None:
            (root / "bin").mkdir(exist_ok=True)
            if not (root / "bin" / "probe").exists():
                shutil.copy(probe, root / "bin" / "probe")
            for name, target in host.items():
                (root / name).symlink_to(str(target))

        if on_tree:
            tree = tmp_path / "tree"
            tree.mkdir()
            fill(tree)

            def nothing(_root: Path) -> None:
                return None

            spec = SandboxSpec(argv=("/bin/probe", "ls", "/dev"), rootfs=nothing, lower=str(tree), memory_mib=64,
                               env={"PATH": "/bin"}, sockets={str(channel): "/run/enclave/parent.sock"})
        else:
            spec = SandboxSpec(argv=("/bin/probe", "ls", "/dev"), rootfs=fill, memory_mib=64, env={"PATH": "/bin"},
                               sockets={str(channel): "/run/enclave/parent.sock"})
        sp = Sandbox.start(spec)
        try:
            out = sp.console.read().decode(errors="replace")
            rc = sp.wait(60)
        finally:
            sp.close()
    assert rc == 0, out
    assert sorted(out.split("entries:")[1].split()) == ["full", "null", "random", "urandom", "zero"]
    for d in host.values():
        assert os.listdir(d) == [], d
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
