"""The isolation battery with device emulation on (review issue 8.5): the merged filter keeps every refusal.

A sandbox started through :mod:`enclavekit.runtime.sandbox`'s public API with ``notification_handlers`` (the NSM
device and the vsock translator) and ``/dev/nsm`` runs one static probe (compiled here with ``gcc -static``) that
tries, in order, what an enclave must not do, then what the emulation must allow, then a fork bomb; each test
below checks one line of its report.  With emulation on, ``socket(AF_VSOCK)`` must give a translated ``AF_UNIX``
socket (``SO_DOMAIN == AF_UNIX``), never a real vsock socket: the probe checks that before it connects anything.
These tests need root; without it they FAIL with a message (never skip).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from vsock_support import EchoParent

from enclavekit.runtime.nsm_device import NSMDevice, prepare_device_node
from enclavekit.runtime.sandbox import Sandbox, SandboxSpec
from enclavekit.runtime.vsock_translate import VsockTranslator
from enclavekit.testing.nsm import FakeNSM

pytestmark = pytest.mark.integration

EPERM, ENOENT, EAGAIN, EAFNOSUPPORT, ECONNREFUSED = 1, 2, 11, 97, 111
ENCLAVE_CID = 16
PARENT_PORT = 5000
PIDS_MAX = 16

PROBE_C = r"""/* Run INSIDE a sandbox with device emulation: one result line per check. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void family(const char *name, int fam, int type) {
    int s = socket(fam, type, 0);
    if (s < 0) { printf("%s refused errno=%d\n", name, errno); return; }
    int dom = -1; socklen_t len = sizeof dom;
    getsockopt(s, SOL_SOCKET, SO_DOMAIN, &dom, &len);
    printf("%s CREATED domain=%d\n", name, dom);
    close(s);
}

struct nsm_raw { uint64_t req, req_len, resp, resp_len; };

/* one line: "<what> refused errno=N" or "<what> ALLOWED" (errno read after the call, not in printf's arguments) */
#define TRY(what, no, yes, call) do { errno = 0; long rc_ = (long)(call); int e_ = errno; \
    printf("%s %s errno=%d\n", what, rc_ < 0 ? no : yes, rc_ < 0 ? e_ : 0); } while (0)

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    (void)argc;
    /* outward TCP to the host's loopback listener */
    int t = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &in.sin_addr);
    TRY("tcp", "failed", "CONNECTED", connect(t, (struct sockaddr *)&in, sizeof in));
    family("netlink", 16, SOCK_RAW);
    family("packet", 17, SOCK_RAW);
    family("rds", 21, SOCK_SEQPACKET);
    family("tipc", 30, SOCK_RDM);
    family("alg", 38, SOCK_SEQPACKET);
    int sv[2];
    TRY("vsock-socketpair", "refused", "CREATED", socketpair(AF_VSOCK, SOCK_STREAM, 0, sv));
    for (int i = 2; i < 5; i++) {
        FILE *f = fopen(argv[i], "r");
        printf("open %s errno=%d\n", f ? "VISIBLE" : "failed", f ? 0 : errno);
        if (f) fclose(f);
    }
    TRY("ptrace", "refused", "ALLOWED", ptrace(PTRACE_ATTACH, 1, 0, 0));
    TRY("mount", "refused", "ALLOWED", mount("none", "/tmp", "tmpfs", 0, NULL));
    TRY("unshare", "refused", "ALLOWED", unshare(CLONE_NEWNS));
    int fd = open("/tmp/x", O_CREAT | O_WRONLY, 0644);
    TRY("fsetxattr", "refused", "ALLOWED", fsetxattr(fd, "user.x", "1", 1, 0));
    close(fd);

    /* what the emulation allows: /dev/nsm, and AF_VSOCK as a translated AF_UNIX socket */
    static unsigned char resp[0x3000];
    static const unsigned char req[] = "\x6b" "DescribeNSM";
    int nsm = open("/dev/nsm", O_RDWR);
    struct nsm_raw raw = {(uintptr_t)req, 12, (uintptr_t)resp, sizeof resp};
    TRY("nsm", "failed", "ok", nsm < 0 ? -1 : ioctl(nsm, _IOWR(0x0A, 0, struct nsm_raw), &raw));
    int v = socket(AF_VSOCK, SOCK_STREAM, 0);
    int dom = -1; socklen_t dl = sizeof dom;
    getsockopt(v, SOL_SOCKET, SO_DOMAIN, &dom, &dl);
    printf("vsock domain=%d\n", dom);
    if (v >= 0 && dom == AF_UNIX) {  /* TEST GUARD: this machine has real vsock; connect only an emulated one */
        struct sockaddr_vm a = {0}; a.svm_family = AF_VSOCK; a.svm_cid = 3; a.svm_port = atoi(argv[5]);
        if (connect(v, (struct sockaddr *)&a, sizeof a) == 0) {
            write(v, "battery", 7); shutdown(v, SHUT_WR);
            char buf[64] = {0}; read(v, buf, sizeof buf - 1);
            printf("vsock reply=%s\n", buf);
        } else {
            printf("vsock connect errno=%d\n", errno);
        }
    }
    int n = 0;
    for (;;) {  /* last: the fork bomb */
        pid_t p = fork();
        if (p == 0) { pause(); _exit(0); }
        if (p < 0) { printf("fork failed errno=%d after %d children\n", errno, n); return 0; }
        if (++n > 100000) { printf("fork NOT LIMITED\n"); return 1; }
    }
}
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    if os.geteuid() != 0:
        pytest.fail("the sandbox battery needs root (namespaces, cgroups, device nodes); run it as root")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the static probe program (apt-get install gcc libc6-dev)")
    work = tmp_path_factory.mktemp("battery")
    (work / "probe.c").write_text(PROBE_C)
    subprocess.run([gcc, "-static", "-O1", "-o", str(work / "probe"), str(work / "probe.c")], check=True,
                   capture_output=True)
    secret = work / "host-secret.txt"
    secret.write_text("host-only\n")
    root = work / "vsock"
    (root / "3").mkdir(parents=True)
    (root / str(ENCLAVE_CID)).mkdir()
    echo = EchoParent(root, PARENT_PORT)
    node, identity = prepare_device_node(work / "nsm.dev")
    device = NSMDevice(FakeNSM(), identity)

    def fill(inside: Path) -> None:
        (inside / "bin").mkdir()
        shutil.copy(work / "probe", inside / "bin" / "probe")

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        argv = ("/bin/probe", str(tcp.getsockname()[1]), str(secret), "/etc/hostname", "/work/main/pyproject.toml",
                str(PARENT_PORT))
        spec = SandboxSpec(argv=argv, rootfs=fill, memory_mib=128, pids_max=PIDS_MAX, env={"PATH": "/bin"},
                           devices={node: "/dev/nsm"},
                           notification_handlers=(device, VsockTranslator(root, ENCLAVE_CID)))
        with Sandbox.start(spec) as sp:
            out = sp.console.read().decode(errors="replace")  # EOF when the sandbox is gone
            rc = sp.wait(60)
        tcp.settimeout(0.2)
        with pytest.raises(TimeoutError):
            tcp.accept()  # the host's listener was never reached
    echo.close()
    assert rc == 0, out
    assert device.executed == 1
    yield out.splitlines()


def test_outward_tcp_fails(report: list[str]) -> None:
    assert f"tcp failed errno={ECONNREFUSED}" in report


@pytest.mark.parametrize("family", ["netlink", "packet", "rds", "tipc", "alg"])
def test_forbidden_families_are_refused(report: list[str], family: str) -> None:
    assert f"{family} refused errno={EAFNOSUPPORT}" in report


def test_vsock_socketpair_is_refused(report: list[str]) -> None:
    assert f"vsock-socketpair refused errno={EAFNOSUPPORT}" in report


def test_host_files_are_invisible(report: list[str]) -> None:
    # a host temp file, /etc/hostname, the repository
    assert [line for line in report if line.startswith("open ")] == [f"open failed errno={ENOENT}"] * 3


@pytest.mark.parametrize("what", ["ptrace", "mount", "unshare", "fsetxattr"])
def test_privileged_calls_are_refused(report: list[str], what: str) -> None:
    assert f"{what} refused errno={EPERM}" in report


def test_dev_nsm_is_served(report: list[str]) -> None:
    assert "nsm ok errno=0" in report


def test_af_vsock_is_a_translated_unix_socket(report: list[str]) -> None:
    assert f"vsock domain={socket.AF_UNIX}" in report  # never a real vsock socket
    assert "vsock reply=echo:battery" in report


def test_fork_bomb_stops(report: list[str]) -> None:
    [line] = [line for line in report if line.startswith("fork ")]
    assert line.startswith(f"fork failed errno={EAGAIN} after ")
    assert int(line.split(" after ")[1].split()[0]) < PIDS_MAX
