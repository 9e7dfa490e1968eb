"""Enclave lifecycle end to end: run-enclave, describe-enclaves, console, terminate-enclave (issue 4, Tests).

Everything runs for real: the ``enclavekit`` CLI in subprocesses, one detached supervisor per enclave, the
namespace sandbox, the NSM on its per-enclave socket.  The applications inside are a static C probe packed into
EIFs with ``build-enclave --docker-uri dir:``, and a Python program in an image made by
``enclavekit.runtime.pyroot``.

Each test gets its own run directory and state directory.  The pool is ``cpu_pool: 1`` (this machine has two
CPUs and the parent keeps CPU 0) with ``cpu_sharing: true``, so several enclaves at once share CPU 1 from ONE
pool; a second state directory with AWS's exclusive semantics checks the E22 refusals.  After every test
``terminate-enclave --all`` runs and the test fails if any supervisor, sandbox process, cgroup, socket or mount of
its enclaves is left.  These tests need root; without it they FAIL (never skip).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from enclavekit.attestation.pki import LocalPKI
from enclavekit.attestation.policy import AttestationPolicy
from enclavekit.attestation.verifier import TrustRoot, verify
from enclavekit.errors import VsockConnectionRefused
from enclavekit.formats.attestation_doc import parse_document
from enclavekit.formats.nsm_messages import AttestationRequest, AttestationResponse
from enclavekit.sdk import vsock
from enclavekit.vsock.address import VsockAddress
from enclavekit.vsock.transport import UnixVsockTransport

pytestmark = pytest.mark.integration

ENCLAVEKIT = str(Path(sys.executable).with_name("enclavekit"))
ZERO = "00" * 48
# spec §2.3 vectors
ROLE_ARN = "arn:aws:iam::123456789012:role/Webserver"
PCR3 = "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6"
INSTANCE_ID = "i-1234567890abcdef0"
PCR4 = "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0"

PROBE_C = r"""
/* Lifecycle probe, run INSIDE enclavekit enclaves by tests/integration/test_lifecycle.py (gcc -static). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

static int unix_connect(const char *path) {
    struct sockaddr_un a; memset(&a, 0, sizeof a); a.sun_family = AF_UNIX;
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { perror(path); exit(10); }
    return fd;
}
static void put_all(int fd, const unsigned char *p, size_t n) {
    while (n) { ssize_t w = write(fd, p, n); if (w <= 0) { perror("write"); exit(11); } p += w; n -= w; }
}
static void get_all(int fd, unsigned char *p, size_t n) {
    while (n) { ssize_t r = read(fd, p, n); if (r <= 0) { perror("read"); exit(12); } p += r; n -= r; }
}
/* one NSM exchange on $ENCLAVEKIT_NSM_SOCKET (u32 big-endian length + CBOR); the response goes to the console */
static int nsm(const char *hex) {
    const char *path = getenv("ENCLAVEKIT_NSM_SOCKET");
    if (!path) { puts("no ENCLAVEKIT_NSM_SOCKET"); return 13; }
    size_t n = strlen(hex) / 2; unsigned char req[4100], hdr[4];
    if (n > 4096) return 15;
    for (size_t i = 0; i < n; i++) sscanf(hex + 2 * i, "%2hhx", &req[i]);
    int fd = unix_connect(path);
    hdr[0] = n >> 24; hdr[1] = n >> 16; hdr[2] = n >> 8; hdr[3] = n;
    put_all(fd, hdr, 4); put_all(fd, req, n);
    get_all(fd, hdr, 4);
    size_t m = ((size_t)hdr[0] << 24) | (hdr[1] << 16) | (hdr[2] << 8) | hdr[3];
    unsigned char *resp = malloc(m);
    get_all(fd, resp, m);
    printf("NSM ");
    for (size_t i = 0; i < m; i++) printf("%02x", resp[i]);
    printf("\n"); fflush(stdout);
    return 0;
}
static void read_line(int fd, char *line, size_t cap) {
    size_t i = 0;
    while (i + 1 < cap) {
        if (read(fd, line + i, 1) != 1) { perror("handshake"); exit(16); }
        if (line[i++] == '\n') break;
    }
    line[i] = 0;
}
/* an enclave listener on vsock (own cid, port): the acceptor side of Firecracker's handshake, then echo */
static int serve(const char *port) {
    char path[256], line[64], buf[4096];
    snprintf(path, sizeof path, "%s/%s/%s.sock", getenv("ENCLAVEKIT_VSOCK_DIR"), getenv("ENCLAVEKIT_VSOCK_CID"),
             port);
    struct sockaddr_un a; memset(&a, 0, sizeof a); a.sun_family = AF_UNIX;
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 8)) { perror(path); return 17; }
    printf("listening on %s\n", path); fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        read_line(c, line, sizeof line);
        char want[32]; snprintf(want, sizeof want, "CONNECT %s\n", port);
        if (strcmp(line, want)) { close(c); continue; }
        put_all(c, (const unsigned char *)"OK 1073741824\n", 14);
        ssize_t n;
        while ((n = read(c, buf, sizeof buf)) > 0) put_all(c, (unsigned char *)buf, n);
        close(c);
    }
}
/* connect to the parent's (3, port), retrying until a listener exists, then say hello; -1 if none came */
static int hello_parent(const char *port) {
    char path[256], line[64];
    snprintf(path, sizeof path, "%s/3/%s.sock", getenv("ENCLAVEKIT_VSOCK_DIR"), port);
    struct sockaddr_un a; memset(&a, 0, sizeof a); a.sun_family = AF_UNIX;
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    for (int tries = 0; tries < 600; tries++) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
            int n = snprintf(line, sizeof line, "CONNECT %s\n", port);
            put_all(fd, (unsigned char *)line, n);
            read_line(fd, line, sizeof line);
            n = snprintf(line, sizeof line, "hello from %s\n", getenv("ENCLAVEKIT_VSOCK_CID"));
            put_all(fd, (unsigned char *)line, n);
            printf("dialled %s\n", path); fflush(stdout);
            return fd;
        }
        close(fd);
        usleep(50000);
    }
    return -1;
}
static int dial(const char *port) {
    if (hello_parent(port) < 0) return 18;
    for (;;) pause();
}
/* once the parent listens on (3, port), touch MiB megabytes: past the cgroup's limit the kernel kills us */
static int oom(const char *port, const char *mib) {
    if (hello_parent(port) < 0) return 18;
    for (long i = 0; i < atol(mib); i++) {
        char *p = malloc(1 << 20);
        if (!p) return 19;
        memset(p, 0x5a, 1 << 20);
    }
    puts("allocated everything: no memory limit?"); fflush(stdout);
    for (;;) pause();
}
int main(int argc, char **argv) {
    printf("probe up: %s cid=%s\n", argc > 1 ? argv[1] : "idle", getenv("ENCLAVEKIT_VSOCK_CID")); fflush(stdout);
    if (argc > 2 && !strcmp(argv[1], "exit")) { printf("exiting with %s\n", argv[2]); return atoi(argv[2]); }
    if (argc > 2 && !strcmp(argv[1], "listen")) return serve(argv[2]);
    if (argc > 2 && !strcmp(argv[1], "dial")) return dial(argv[2]);
    if (argc > 3 && !strcmp(argv[1], "oom")) return oom(argv[2], argv[3]);
    if (argc > 2 && !strcmp(argv[1], "nsm")) { int rc = nsm(argv[2]); if (rc) return rc; }
    for (;;) pause();
}
"""


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the lifecycle tests need root (namespaces, cgroups, mounts); run them as root")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """EIFs of the probe: ``idle`` (prints, waits), ``exit`` (exits 3 at once), ``nsm`` (fetches a document),
    ``listen``/``dial`` (vsock both ways), ``oom`` (allocates 1 GiB once the parent listens on (3, 7200))."""
    _require_root()
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the static probe")
    base = tmp_path_factory.mktemp("images")
    root = base / "rootfs"
    root.mkdir()
    (base / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(root / "probe"), str(base / "probe.c")], check=True)
    request = AttestationRequest(nonce=b"lifecycle-nonce", user_data=b"hello").to_bytes().hex()
    commands = {"idle": ["/probe"], "exit": ["/probe", "exit", "3"], "nsm": ["/probe", "nsm", request],
                "listen": ["/probe", "listen", "5000"], "dial": ["/probe", "dial", "7000"],
                "oom": ["/probe", "oom", "7200", "1024"]}
    out = {}
    for name, cmd in commands.items():
        eif = base / f"{name}.eif"
        subprocess.run([ENCLAVEKIT, "build-enclave", "--docker-uri", f"dir:{root}", "--output-file", str(eif),
                        "--cmd", json.dumps(cmd)], check=True, capture_output=True)
        out[name] = eif
    return out


@dataclass
class Host:
    """One test's run directory and state directories, and what its enclaves started."""

    run_dir: Path
    homes: list[Path]
    supervisors: set[int] = field(default_factory=set)
    slots: set[str] = field(default_factory=set)

    def home(self, index: int = 0) -> Path:
        """State directory ``index``: 0 shares its CPU between enclaves, the others are exclusive (AWS's)."""
        while len(self.homes) <= index:
            home = self.run_dir.parent / f"home{len(self.homes)}"
            home.mkdir()
            sharing = "cpu_sharing: true\n" if not self.homes else ""
            (home / "allocator.yaml").write_text(f"---\nmemory_mib: 2048\ncpu_pool: 1\n{sharing}")
            self.homes.append(home)
        return self.homes[index]

    def env(self, home: int = 0) -> dict[str, str]:
        env = dict(os.environ)
        env.update(ENCLAVEKIT_RUN_DIR=str(self.run_dir), ENCLAVEKIT_HOME=str(self.home(home)))
        return env

    def cli(self, *args: str, home: int = 0, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([ENCLAVEKIT, *args], env=self.env(home), capture_output=True, text=True,
                              timeout=timeout, check=False)
        if args and args[0] == "run-enclave" and proc.returncode == 0:
            info = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
            self.supervisors.add(info["ProcessID"])
            self.slots.add(info["EnclaveID"].rsplit("-enc", 1)[1])
        return proc

    def run(self, eif: Path, *extra: str, home: int = 0) -> dict[str, Any]:
        proc = self.cli("run-enclave", "--eif-path", str(eif), "--cpu-count", "1", "--memory", "64", *extra,
                        home=home)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def console_log(self, enclave_id: str) -> str:
        return (self.run_dir / enclave_id / "console.log").read_text(errors="replace")


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                children = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in out:
                    out.add(c)
                    todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if _alive(p)}
        if not left:
            return set()
        time.sleep(0.05)
    return {p for p in pids if _alive(p)}


def _cgroups_of(slots: set[str]) -> list[str]:
    names = {f"enclavekit-{s}" for s in slots}
    found = []
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        for d in dirnames:
            if d in names:
                found.append(os.path.join(dirpath, d))
    return found


def _assert_nothing_left(host: Host, processes: set[int]) -> None:
    if not host.run_dir.exists():
        return  # the command failed before anything was created
    assert _wait_gone(processes) == set(), "processes of terminated enclaves are still alive"
    assert _cgroups_of(host.slots) == [], "cgroups of terminated enclaves are left"
    sockets = [str(p) for p in host.run_dir.rglob("*") if p.is_socket()]
    assert sockets == [], f"sockets left behind: {sockets}"
    assert str(host.run_dir) not in Path("/proc/self/mountinfo").read_text(), "a mount is left behind"
    for home in host.homes:
        ledger = home / "allocations.json"
        if ledger.exists():
            assert json.loads(ledger.read_text())["allocations"] == [], f"allocation left in {ledger}"
    leftovers = [p.name for p in host.run_dir.iterdir()
                 if p.is_dir() and p.name != "vsock" and (p / "enclave.json").exists()]
    assert leftovers == [], f"enclave records left: {leftovers}"
    assert [p.name for p in (host.run_dir / "vsock").iterdir()] in ([], ["3"])


@pytest.fixture
def host() -> Iterator[Host]:
    _require_root()
    with tempfile.TemporaryDirectory(prefix="ekl", dir="/tmp") as tmp:
        run = Path(tmp) / "run"
        h = Host(run_dir=run, homes=[])
        h.home(0)
        try:
            yield h
        finally:
            processes = set(h.supervisors)
            for pid in h.supervisors:
                processes |= _descendants(pid)
            if any(run.glob("*/enclave.json")):
                h.cli("terminate-enclave", "--all")  # reaches every supervisor, whatever its pool
            _assert_nothing_left(h, processes)


# ---------------------------------------------------------------- JSON shapes and the happy path


def test_json_shapes_of_every_command(host: Host, images: dict[str, Path]) -> None:
    proc = host.cli("run-enclave", "--eif-path", str(images["idle"]), "--cpu-count", "1", "--memory", "64",
                    "--debug-mode")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert list(info) == ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs",
                          "MemoryMiB"]
    assert info["EnclaveName"] == "idle" and info["EnclaveCID"] == 16
    assert info["EnclaveID"].startswith("i-") and "-enc" in info["EnclaveID"]
    assert (info["NumberOfCPUs"], info["CPUIDs"], info["MemoryMiB"]) == (1, [1], 64)
    assert proc.stdout.startswith('{\n  "EnclaveName": "idle",\n')  # nitro-cli's pretty print
    assert proc.stderr.splitlines() == ["Start allocating memory...",
                                        "Started enclave with enclave-cid: 16, memory: 64 MiB, cpu-ids: [1]"]

    described = host.cli("describe-enclaves")
    assert described.returncode == 0, described.stderr
    (entry,) = json.loads(described.stdout)
    assert list(entry) == ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs",
                           "MemoryMiB", "State", "Flags", "Measurements"]
    assert (entry["State"], entry["Flags"]) == ("RUNNING", "DEBUG_MODE")
    assert entry["ProcessID"] == info["ProcessID"]
    eif_info = json.loads(host.cli("describe-eif", "--eif-path", str(images["idle"])).stdout)
    assert entry["Measurements"] == eif_info["Measurements"]  # from the EIF actually loaded
    with_meta = json.loads(host.cli("describe-enclaves", "--metadata").stdout)[0]
    assert list(with_meta)[-3:] == ["ImageName", "ImageVersion", "Metadata"]
    assert with_meta["Metadata"] == eif_info["Metadata"]

    console = host.cli("console", "--enclave-id", info["EnclaveID"], "--disconnect-timeout", "1")
    assert console.returncode == 0, console.stderr
    lines = console.stdout.splitlines()
    assert lines[:2] == ["Connecting to the console for enclave 16...", "Successfully connected to the console."]
    assert "probe up: idle cid=16" in lines

    term = host.cli("terminate-enclave", "--enclave-id", info["EnclaveID"])
    assert term.returncode == 0, term.stderr
    assert json.loads(term.stdout) == {"EnclaveName": "idle", "EnclaveID": info["EnclaveID"], "Terminated": True}
    assert term.stderr.strip() == f"Successfully terminated enclave {info['EnclaveID']}."
    assert host.cli("describe-enclaves").stdout.strip() == "[]"
    # the console log survives the enclave
    assert "probe up: idle cid=16" in host.console_log(info["EnclaveID"])


def test_terminate_by_name_and_all(host: Host, images: dict[str, Path]) -> None:
    a = host.run(images["idle"], "--enclave-name", "web")
    b = host.run(images["idle"], "--enclave-name", "web")  # a duplicate name gets "_1", no error
    assert (a["EnclaveName"], b["EnclaveName"]) == ("web", "web_1")
    assert (a["EnclaveCID"], b["EnclaveCID"]) == (16, 17)
    term = host.cli("terminate-enclave", "--enclave-name", "web_1")
    assert json.loads(term.stdout)["EnclaveID"] == b["EnclaveID"]
    everything = host.cli("terminate-enclave", "--all")
    assert [e["EnclaveID"] for e in json.loads(everything.stdout)] == [a["EnclaveID"]]
    assert host.cli("terminate-enclave", "--all").stdout.strip() == "[]"


def test_config_file_and_cid(host: Host, images: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"eif_path": str(images["idle"]), "memory_mib": 64, "cpu_ids": [1],
                                  "enclave_cid": 77, "enclave_name": "cfg", "debug_mode": False}))
    proc = host.cli("run-enclave", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["EnclaveName"], info["EnclaveCID"], info["CPUIDs"]) == ("cfg", 77, [1])
    assert json.loads(host.cli("describe-enclaves").stdout)[0]["Flags"] == "NONE"


def test_eight_enclaves_at_once(host: Host, images: dict[str, Path]) -> None:
    def launch(_: int) -> subprocess.CompletedProcess[str]:  # one state directory, one pool, CPU 1 shared
        return host.cli("run-enclave", "--eif-path", str(images["idle"]), "--cpu-count", "1", "--memory", "64",
                        "--debug-mode")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(launch, range(8)))
    for r in results:
        assert r.returncode == 0, r.stderr
    infos = [json.loads(r.stdout) for r in results]
    assert len({i["EnclaveID"] for i in infos}) == 8
    assert sorted(i["EnclaveCID"] for i in infos) == list(range(16, 24))
    assert sorted(i["EnclaveName"] for i in infos) == sorted(["idle"] + [f"idle_{n}" for n in range(1, 8)])
    described = json.loads(host.cli("describe-enclaves").stdout)
    assert sorted(d["EnclaveID"] for d in described) == sorted(i["EnclaveID"] for i in infos)
    assert {d["State"] for d in described} == {"RUNNING"}
    assert {tuple(d["CPUIDs"]) for d in described} == {(1,)}  # every enclave pinned to the shared CPU
    for i in infos:  # each console saw its own enclave
        assert f"probe up: idle cid={i['EnclaveCID']}" in host.console_log(i["EnclaveID"])
    terminated = json.loads(host.cli("terminate-enclave", "--all").stdout)
    assert len(terminated) == 8 and all(t["Terminated"] for t in terminated)


def test_parallel_launches_on_an_exclusive_pool_fail_cleanly(host: Host, images: dict[str, Path]) -> None:
    host.home(1)  # created before the threads
    def launch(_: int) -> subprocess.CompletedProcess[str]:  # AWS's semantics: one enclave per CPU
        return host.cli("run-enclave", "--eif-path", str(images["idle"]), "--cpu-count", "1", "--memory", "64",
                        home=1)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(launch, range(4)))
    assert sorted(r.returncode for r in results) == [0, 22, 22, 22]  # one CPU in the pool
    assert all("[ E22 ]" in r.stderr for r in results if r.returncode)


# ---------------------------------------------------------------- console and debug mode


def test_console_refused_for_production_enclave(host: Host, images: dict[str, Path]) -> None:
    info = host.run(images["idle"])
    proc = host.cli("console", "--enclave-name", info["EnclaveName"])
    assert proc.returncode == 44
    assert "[ E44 ]" in proc.stderr and "--debug-mode" in proc.stderr
    # the log is written for production enclaves too
    assert "probe up: idle" in host.console_log(info["EnclaveID"])


def test_attach_console_streams_until_the_enclave_ends(host: Host, images: dict[str, Path]) -> None:
    proc = subprocess.Popen([ENCLAVEKIT, "run-enclave", "--eif-path", str(images["idle"]), "--cpu-count", "1",
                             "--memory", "64", "--attach-console"], env=host.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        text = ""
        while "probe up: idle" not in text:
            line = proc.stdout.readline()
            assert line, "run-enclave --attach-console ended early"
            text += line
        info = json.loads(text[:text.index("}") + 1])
        host.supervisors.add(info["ProcessID"])
        host.slots.add(info["EnclaveID"].rsplit("-enc", 1)[1])
        assert "Successfully connected to the console." in text
        assert host.cli("terminate-enclave", "--enclave-id", info["EnclaveID"]).returncode == 0
        assert proc.wait(30) == 0  # the console ends with the enclave
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _document_from_console(host: Host, enclave_id: str) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in host.console_log(enclave_id).splitlines():
            if line.startswith("NSM "):
                response = AttestationResponse.from_bytes(bytes.fromhex(line[4:]))
                return parse_document(response.document)[1]
        time.sleep(0.05)
    raise AssertionError("the enclave printed no NSM response:\n" + host.console_log(enclave_id))


@pytest.mark.parametrize("debug", [False, True])
def test_pcrs_in_documents_fetched_from_inside(host: Host, images: dict[str, Path], debug: bool) -> None:
    extra = ["--parent-role-arn", ROLE_ARN, "--parent-instance-id", INSTANCE_ID]
    info = host.run(images["nsm"], *extra, *(["--debug-mode"] if debug else []))
    doc = _document_from_console(host, info["EnclaveID"])
    measured = json.loads(host.cli("describe-eif", "--eif-path", str(images["nsm"])).stdout)["Measurements"]
    pcrs = {i: v.hex() for i, v in doc.pcrs.items()}
    assert doc.module_id == info["EnclaveID"]
    assert (doc.nonce, doc.user_data) == (b"lifecycle-nonce", b"hello")
    if debug:  # §2.5: the image PCRs read as zeros in debug mode
        assert (pcrs[0], pcrs[1], pcrs[2]) == (ZERO, ZERO, ZERO)
    else:
        assert (pcrs[0], pcrs[1], pcrs[2]) == (measured["PCR0"], measured["PCR1"], measured["PCR2"])
    assert (pcrs[3], pcrs[4]) == (PCR3, PCR4)  # the parent's identity, in both modes


def test_parent_identity_from_state_directory(host: Host, images: dict[str, Path]) -> None:
    (host.home(0) / "parent.json").write_text(json.dumps({"role_arn": ROLE_ARN, "instance_id": INSTANCE_ID}))
    info = host.run(images["nsm"])
    pcrs = {i: v.hex() for i, v in _document_from_console(host, info["EnclaveID"]).pcrs.items()}
    assert (pcrs[3], pcrs[4]) == (PCR3, PCR4)


# ---------------------------------------------------------------- bad input


def _fails(proc: subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert f"[ E{code:02d} ]" in proc.stderr
    assert proc.stdout.strip() == ""


def test_app_that_exits_at_once_is_e36_with_console_lines(host: Host, images: dict[str, Path]) -> None:
    proc = host.cli("run-enclave", "--eif-path", str(images["exit"]), "--cpu-count", "1", "--memory", "64")
    _fails(proc, 36)
    assert "exited at boot with status 3" in proc.stderr
    assert "exiting with 3" in proc.stderr  # the last console lines are in the message
    logs = list(host.run_dir.glob("*/console.log"))
    assert len(logs) == 1 and "exiting with 3" in logs[0].read_text()
    host.slots.add(logs[0].parent.name.rsplit("-enc", 1)[1])


def test_missing_and_corrupt_eif(host: Host, images: dict[str, Path], tmp_path: Path) -> None:
    _fails(host.cli("run-enclave", "--eif-path", str(tmp_path / "none.eif"), "--cpu-count", "1",
                    "--memory", "64"), 19)
    corrupt = tmp_path / "corrupt.eif"
    data = bytearray(images["idle"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    proc = host.cli("run-enclave", "--eif-path", str(corrupt), "--cpu-count", "1", "--memory", "64")
    _fails(proc, 35)
    assert "CRC32" in proc.stderr
    truncated = tmp_path / "truncated.eif"
    truncated.write_bytes(images["idle"].read_bytes()[:600])
    _fails(host.cli("run-enclave", "--eif-path", str(truncated), "--cpu-count", "1", "--memory", "64"), 35)


@pytest.mark.parametrize("args,code", [
    (["--memory", "32"], 26),              # below the 64 MiB minimum
    (["--memory", "0"], 26),
    (["--memory", "256_mb"], 3),           # §3.2: anything but M/G/T is E03
    (["--cpu-ids", "0"], 21),              # CPU 0 stays with the parent: not in the pool
    (["--cpu-ids", "1", "1"], 20),
    (["--cpu-count", "2"], 22),            # more CPUs than the (shared) pool holds
    (["--enclave-cid", "3"], 3),           # the parent's CID
    (["--enclave-cid", "4294967295"], 3),
    (["--enclave-cid", "x"], 3),
])
def test_bad_resources(host: Host, images: dict[str, Path], args: list[str], code: int) -> None:
    base = {"--memory": "64", "--cpu-count": "1"}
    if "--cpu-ids" in args:
        base.pop("--cpu-count")
    for flag in list(base):
        if flag in args:
            base.pop(flag)
    flat = [x for kv in base.items() for x in kv]
    _fails(host.cli("run-enclave", "--eif-path", str(images["idle"]), *flat, *args), code)


def test_cid_in_use(host: Host, images: dict[str, Path]) -> None:
    host.run(images["idle"], "--enclave-cid", "40")
    proc = host.cli("run-enclave", "--eif-path", str(images["idle"]), "--cpu-count", "1", "--memory", "64",
                    "--enclave-cid", "40")
    _fails(proc, 3)
    assert "already used" in proc.stderr


@pytest.mark.parametrize("config,code", [
    ("{not json", 17),
    ("[1]", 17),
    ('{"memory_mib": 64, "cpu_count": 1}', 1),
    ('{"eif_path": "x.eif", "memory_mib": 64}', 1),
    ('{"eif_path": "x.eif", "memory_mib": 64, "cpu_count": 1, "cpu_ids": [1]}', 2),
    ('{"eif_path": "x.eif", "memory_mib": "64", "cpu_count": 1}', 3),
    ('{"eif_path": "x.eif", "memory_mib": 64, "cpu_count": 1, "colour": "red"}', 3),
])
def test_malformed_config(host: Host, tmp_path: Path, config: str, code: int) -> None:
    path = tmp_path / "c.json"
    path.write_text(config)
    _fails(host.cli("run-enclave", "--config", str(path)), code)


def test_config_conflicts_with_flags(host: Host, images: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"eif_path": str(images["idle"]), "memory_mib": 64, "cpu_count": 1}))
    _fails(host.cli("run-enclave", "--config", str(path), "--memory", "64"), 2)


def test_lookups_of_unknown_enclaves(host: Host) -> None:
    _fails(host.cli("terminate-enclave", "--enclave-name", "nobody"), 58)
    _fails(host.cli("terminate-enclave", "--enclave-id", "i-0000000000000000-enc1234"), 40)
    _fails(host.cli("console", "--enclave-name", "nobody"), 58)
    _fails(host.cli("terminate-enclave"), 1)
    _fails(host.cli("terminate-enclave", "--all", "--enclave-name", "x"), 2)


def test_supervisor_killed_with_sigkill(host: Host, images: dict[str, Path]) -> None:
    info = host.run(images["idle"])
    sandbox = _descendants(info["ProcessID"])
    assert sandbox, "the supervisor has no sandbox processes"
    os.kill(info["ProcessID"], signal.SIGKILL)
    # the enclave must not survive its supervisor (PDEATHSIG / the PID namespace dies with it)
    assert _wait_gone({info["ProcessID"], *sandbox}) == set()
    described = host.cli("describe-enclaves")
    assert described.returncode == 0
    assert json.loads(described.stdout) == []  # the stale entry is skipped and cleaned
    assert "Failed connections" not in described.stderr
    # its CPU and CID are free again
    again = host.run(images["idle"])
    assert again["EnclaveCID"] == info["EnclaveCID"]


# ---------------------------------------------------------------- audit records (issue 6)


def _events(host: Host, trail: Path) -> list[dict[str, Any]]:
    proc = host.cli("audit", "events", "--trail", str(trail), "--json")
    assert proc.returncode == 0, proc.stderr
    events: list[dict[str, Any]] = json.loads(proc.stdout)
    return events


def test_lifecycle_events_reach_the_state_directorys_trail(host: Host, images: dict[str, Path]) -> None:
    ran = host.run(images["idle"], "--debug-mode")
    assert host.cli("terminate-enclave", "--enclave-id", ran["EnclaveID"]).returncode == 0
    _fails(host.cli("run-enclave", "--eif-path", str(images["exit"]), "--cpu-count", "1", "--memory", "64"), 36)
    failed_logs = [p for p in host.run_dir.glob("*/console.log") if "exiting with 3" in p.read_text()]
    host.slots.update(p.parent.name.rsplit("-enc", 1)[1] for p in failed_logs)
    (host.run_dir / "vsock" / "3").mkdir(parents=True, exist_ok=True)
    transport = UnixVsockTransport(host.run_dir / "vsock", local_cid=3)
    with vsock.listen(7200, transport=transport) as listener:
        oom = host.run(images["oom"])
        conn, _ = listener.accept(timeout=30)
        with conn:
            conn.settimeout(30)
            hello = b""
            while not hello.endswith(b"\n"):  # read it all: the probe exits on a broken pipe
                chunk = conn.recv(64)
                assert chunk, host.console_log(oom["EnclaveID"])
                hello += chunk
        # the probe allocates past its 64 MiB from now on
    assert _wait_gone({oom["ProcessID"]}, timeout=60) == set(), "the enclave survived allocating 1 GiB"

    # every supervisor delivers its records as it leaves; the boot failure's leaves on its own time: wait for it
    trail = host.home(0) / "audit"
    wanted = {"RunEnclave", "TerminateEnclave", "EnclaveBootFailure", "EnclaveOutOfMemory"}
    deadline = time.monotonic() + 30
    events = _events(host, trail)
    while not wanted <= {e["eventName"] for e in events} and time.monotonic() < deadline:
        time.sleep(0.1)
        events = _events(host, trail)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        assert e["eventSource"] == "enclaves.enclavekit.local"
        by_name.setdefault(e["eventName"], []).append(e)
    assert set(by_name) == wanted, sorted(by_name)

    runs = {e["responseElements"]["EnclaveID"]: e for e in by_name["RunEnclave"]}
    assert set(runs) == {ran["EnclaveID"], oom["EnclaveID"]}
    first = runs[ran["EnclaveID"]]
    measured = json.loads(host.cli("describe-eif", "--eif-path", str(images["idle"])).stdout)["Measurements"]
    assert first["responseElements"]["EnclaveCID"] == ran["EnclaveCID"]
    assert first["responseElements"]["Measurements"] == measured
    assert first["responseElements"]["DebugMode"] is True and runs[oom["EnclaveID"]]["responseElements"][
        "DebugMode"] is False
    assert first["requestParameters"]["memoryMiB"] == 64
    assert first["eventType"] == "AwsApiCall" and first["userIdentity"]["type"] == "Root"

    (terminated,) = by_name["TerminateEnclave"]
    assert terminated["requestParameters"]["enclaveId"] == ran["EnclaveID"]
    assert terminated["requestParameters"]["via"] == "control"

    (boot,) = by_name["EnclaveBootFailure"]
    assert boot["errorCode"] == "E36" and "exited at boot with status 3" in boot["errorMessage"]
    assert boot["eventType"] == "AwsServiceEvent"
    assert any("exiting with 3" in line for line in boot["serviceEventDetails"]["consoleTail"])

    (killed,) = by_name["EnclaveOutOfMemory"]
    assert killed["requestParameters"]["enclaveId"] == oom["EnclaveID"]
    assert killed["serviceEventDetails"]["oomKills"] >= 1 and killed["serviceEventDetails"]["memoryMiB"] == 64

    # the runtime never seals (one digest per supervisor would be noise): seal now, then the trail validates
    from enclavekit.runtime.audit import seal_runtime_trail

    assert seal_runtime_trail(host.home(0))
    exported = host.cli("audit", "public-key", "--trail", str(trail))
    assert exported.returncode == 0, exported.stderr
    key = host.run_dir.parent / "trail-key.pem"  # the key, pinned outside the trail
    key.write_text(exported.stdout)
    validated = host.cli("audit", "validate", "--trail", str(trail), "--public-key", str(key))
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert len(_events(host, trail)) == len(events)  # sealing delivered nothing new: all were in log files


def test_runtime_records_can_be_turned_off(host: Host, images: dict[str, Path]) -> None:
    (host.home(0) / "audit.json").write_text(json.dumps({"trail": None}))
    info = host.run(images["idle"])
    assert host.cli("terminate-enclave", "--enclave-id", info["EnclaveID"]).returncode == 0
    assert not (host.home(0) / "audit").exists()


# ---------------------------------------------------------------- vsock both ways


def test_parent_connects_to_an_enclave_listener(host: Host, images: dict[str, Path]) -> None:
    info = host.run(images["listen"], "--debug-mode")
    transport = UnixVsockTransport(host.run_dir / "vsock", local_cid=3)
    deadline = time.monotonic() + 30
    while "listening on" not in host.console_log(info["EnclaveID"]):
        assert time.monotonic() < deadline, host.console_log(info["EnclaveID"])
        time.sleep(0.02)
    payload = os.urandom(100_000)
    with vsock.connect(info["EnclaveCID"], 5000, timeout=10, transport=transport) as conn:
        assert conn.peer == VsockAddress(info["EnclaveCID"], 5000)
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := conn.recv(65536):
            echoed += chunk
    assert echoed == payload
    with pytest.raises(VsockConnectionRefused):  # nobody listens on another port of the enclave
        vsock.connect(info["EnclaveCID"], 5001, timeout=5, transport=transport)


def test_enclave_reaches_a_parent_listener_created_after_it_started(host: Host, images: dict[str, Path]) -> None:
    info = host.run(images["dial"])
    transport = UnixVsockTransport(host.run_dir / "vsock", local_cid=3)
    with vsock.listen(7000, transport=transport) as listener:  # created after run-enclave returned
        conn, _ = listener.accept(timeout=30)
        with conn:
            conn.settimeout(30)
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(64)
                assert chunk
                line += chunk
    assert line == f"hello from {info['EnclaveCID']}\n".encode()


def test_enclave_cannot_plant_a_symlink_for_the_parent(host: Host, images: dict[str, Path]) -> None:
    info = host.run(images["idle"])
    own = host.run_dir / "vsock" / str(info["EnclaveCID"])
    decoy = host.run_dir.parent / "decoy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(decoy))
        server.listen(1)
        (own / "6000.sock").symlink_to(decoy)  # what an enclave's root could write in its own directory
        transport = UnixVsockTransport(host.run_dir / "vsock", local_cid=3)
        with pytest.raises(VsockConnectionRefused, match="symlink"):
            vsock.connect(info["EnclaveCID"], 6000, timeout=5, transport=transport)
    decoy.unlink()


# ---------------------------------------------------------------- a Python application inside


PYTHON_APP = '''
"""Runs INSIDE an enclave: fetch an attestation document with the SDK and send it to the parent over vsock."""
import sys
import time

from enclavekit.sdk import nsm, vsock

with nsm.NSMClient.open() as client:
    document = client.attestation(nonce=b"python-nonce", user_data=b"from python")
with vsock.connect(vsock.VMADDR_CID_PARENT, 7100) as conn:
    conn.sendall(len(document).to_bytes(4, "big") + document)
    conn.recv(1)  # until the parent has read it
print("document sent", len(document), file=sys.stderr, flush=True)
while True:
    time.sleep(3600)
'''


@pytest.fixture(scope="module")
def python_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EIF whose rootfs is made by ``enclavekit.runtime.pyroot`` from this host's Python."""
    _require_root()
    base = tmp_path_factory.mktemp("pyimage")
    (base / "main.py").write_text(PYTHON_APP)
    root = base / "rootfs"
    subprocess.run([sys.executable, "-m", "enclavekit.runtime.pyroot", str(root), "--app", str(base / "main.py")],
                   check=True, capture_output=True)
    eif = base / "python.eif"
    subprocess.run([ENCLAVEKIT, "build-enclave", "--docker-uri", f"dir:{root}", "--output-file", str(eif),
                    "--cmd", json.dumps(["/usr/bin/python3", "/app/main.py"])], check=True, capture_output=True)
    return eif


@pytest.mark.parametrize("debug", [False, True])
def test_python_enclave_attests_to_the_parent(host: Host, python_image: Path, debug: bool) -> None:
    transport = UnixVsockTransport(host.run_dir / "vsock", local_cid=3)
    (host.run_dir / "vsock" / "3").mkdir(parents=True, exist_ok=True)
    with vsock.listen(7100, transport=transport) as listener:
        info = host.run(python_image, "--memory", "256", *(["--debug-mode"] if debug else []))
        conn, _ = listener.accept(timeout=60)
        with conn:
            conn.settimeout(30)
            data = b""
            while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                chunk = conn.recv(65536)
                assert chunk, host.console_log(info["EnclaveID"])
                data += chunk
            conn.sendall(b"k")
    document = data[4:]
    pki = LocalPKI.open(host.home(0), now=datetime.now(UTC))
    policy = AttestationPolicy(nonce=b"python-nonce", user_data=b"from python", unsafe_allow_debug=debug)
    verified = verify(document, [TrustRoot.from_pem(pki.root_pem)], datetime.now(UTC), policy, cache=None)
    measured = json.loads(host.cli("describe-eif", "--eif-path", str(python_image)).stdout)["Measurements"]
    assert verified.module_id == info["EnclaveID"]
    expected = ZERO if debug else measured["PCR0"]  # §2.5: zeros in debug mode
    assert verified.pcrs[0].hex() == expected
