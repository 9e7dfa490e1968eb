"""run-enclave start-up against starting the same application as a plain child process, in one run.

The application is a static C program: it connects to the parent at vsock (3, PORT) through the emulation
(``$ENCLAVEKIT_VSOCK_DIR``), does the CONNECT/OK handshake and writes ``ready``.  One launch is timed from the
start of the command to the moment the parent has read ``ready``:

* enclave: ``enclavekit run-enclave`` as a user runs it, with the defaults: the first launch finds no launch server,
  launches directly (CLI imports, supervisor fork, sealed copy of the EIF, CRC + measurement, tmpfs root unpacked)
  and starts one; the next ones go through the server (a light CLI, a pre-loaded supervisor forked by the server,
  the image's tree shared from the server's image store under an overlay root, nothing read from the unchanged EIF).
  Every launch also does the registry, allocator, NSM, cgroups, namespaces, seccomp and the boot heartbeat, until
  the application inside answers on vsock.  The first (cold) launch is printed apart;
* plain: the same binary started with ``subprocess.Popen`` on the host, until it answers on the same listener.

The same comparison is then made for a Python application (``PY_APP``: ``enclavekit.sdk.vsock.connect(3, PORT)``
and ``ready``), in an image whose rootfs is made by ``enclavekit.runtime.pyroot`` from this host's Python; its
plain start is the host's ``python3`` running the same script.

p50 and p95 over ``--launches`` (default 20) of each; target: enclave p50 <= 3 x plain p50.  Needs root (the
sandbox) and gcc.  Run: ``.venv/bin/python benchmarks/run_enclave.py [--launches 20]``.

The package's bytecode is compiled first (``compileall``, as ``pip install`` does) and ``PYTHONDONTWRITEBYTECODE``
is dropped from the measured commands' environment: with it set and no ``__pycache__``, every ``enclavekit`` run
compiles its modules from source (about 90 ms here), which no installed package does.  Set
``ENCLAVEKIT_LAUNCH_TRACE=FILE`` to have the CLI and the supervisor append their phase timings to FILE.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from enclavekit.runtime.launch_server import stop_server
from enclavekit.vsock.transport import UnixVsockTransport

ENCLAVEKIT = str(Path(sys.executable).with_name("enclavekit"))
PORT = 5005

APP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
int main(int argc, char **argv) {
    const char *dir = getenv("ENCLAVEKIT_VSOCK_DIR");
    char path[256], line[64];
    if (!dir || argc < 2) return 2;
    snprintf(path, sizeof path, "%s/3/%s.sock", dir, argv[1]);
    struct sockaddr_un a; memset(&a, 0, sizeof a); a.sun_family = AF_UNIX;
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { perror(path); return 3; }
    int n = snprintf(line, sizeof line, "CONNECT %s\n", argv[1]);
    if (write(fd, line, n) != n) return 4;
    for (int i = 0; i < (int)sizeof line - 1; i++) {
        if (read(fd, line + i, 1) != 1) return 5;
        if (line[i] == '\n') break;
    }
    if (write(fd, "ready\n", 6) != 6) return 6;
    char buf[16]; if (read(fd, buf, sizeof buf) < 0) return 7;  /* until the parent closes */
    for (;;) pause();
}
"""


PY_APP = """
import sys
from enclavekit.sdk import vsock
conn = vsock.connect(3, int(sys.argv[1]))
conn.sendall(b"ready\\n")
conn.recv(16)
import time
while True:
    time.sleep(3600)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def wait_ready(listener: object) -> None:
    conn, _ = listener.accept(timeout=60)  # type: ignore[attr-defined]
    data = b""
    while not data.endswith(b"ready\n"):
        chunk = conn.recv(64)
        if not chunk:
            raise RuntimeError("the application closed before answering")
        data += chunk
    conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run-enclave needs root (namespaces, cgroups, mounts)", file=sys.stderr)
        return 1
    import enclavekit

    compileall.compile_dir(str(Path(enclavekit.__file__).parent), quiet=1)
    with tempfile.TemporaryDirectory(prefix="ekb", dir="/tmp") as tmp:
        base = Path(tmp)
        root = base / "rootfs"
        root.mkdir()
        (base / "app.c").write_text(APP_C)
        subprocess.run(["gcc", "-static", "-O2", "-o", str(root / "app"), str(base / "app.c")], check=True)
        eif = base / "app.eif"
        subprocess.run([ENCLAVEKIT, "build-enclave", "--docker-uri", f"dir:{root}", "--output-file", str(eif),
                        "--cmd", json.dumps(["/app", str(PORT)])], check=True, capture_output=True)
        (base / "app.py").write_text(PY_APP)
        subprocess.run([sys.executable, "-m", "enclavekit.runtime.pyroot", str(base / "pyroot"), "--app",
                        str(base / "app.py")], check=True, capture_output=True)
        py_eif = base / "py.eif"
        subprocess.run([ENCLAVEKIT, "build-enclave", "--docker-uri", f"dir:{base / 'pyroot'}", "--output-file",
                        str(py_eif), "--cmd", json.dumps(["/usr/bin/python3", "/app/app.py", str(PORT)])],
                       check=True, capture_output=True)
        home = base / "home"
        home.mkdir()
        (home / "allocator.yaml").write_text("---\nmemory_mib: 1024\ncpu_pool: 1\n")
        run_dir = base / "run"
        env = dict(os.environ, ENCLAVEKIT_HOME=str(home), ENCLAVEKIT_RUN_DIR=str(run_dir))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        vsock_root = run_dir / "vsock"
        (vsock_root / "3").mkdir(parents=True)
        listener = UnixVsockTransport(vsock_root, local_cid=3).listen(PORT)
        plain_env = {"ENCLAVEKIT_VSOCK_DIR": str(vsock_root), "PYTHONPATH": os.pathsep.join(sys.path)}
        results = {}
        try:
            for label, image, plain_argv, memory in (
                    ("static C", eif, [str(root / "app"), str(PORT)], "64"),
                    ("Python", py_eif, [sys.executable, str(base / "app.py"), str(PORT)], "256")):
                results[label] = measure(label, args.launches, image, plain_argv, plain_env, memory=memory,
                                         env=env, listener=listener)
        finally:
            listener.close()
            subprocess.run([ENCLAVEKIT, "terminate-enclave", "--all"], env=env, capture_output=True, check=False)
            stop_server(run_dir)
    for label, (enclave, plain) in results.items():
        e50, e95 = percentile(enclave, 0.5), percentile(enclave, 0.95)
        p50, p95 = percentile(plain, 0.5), percentile(plain, 0.95)
        print(f"[{label}] run-enclave until the app answers on vsock: p50 {e50 * 1000:.0f} ms, p95 {e95 * 1000:.0f} ms "
              f"(mean {statistics.mean(enclave) * 1000:.0f} ms)")
        print(f"[{label}] plain child process until it answers:       p50 {p50 * 1000:.1f} ms, "
              f"p95 {p95 * 1000:.1f} ms")
        print(f"[{label}] ratio p50 {e50 / p50:.1f}x (target <= 3x), ratio p95 {e95 / p95:.1f}x; "
              f"first (cold) launch {enclave[0] * 1000:.0f} ms")
    return 0


def measure(label: str, launches: int, eif: Path, plain_argv: list[str], plain_env: dict[str, str], *,
            memory: str, env: dict[str, str], listener: object) -> tuple[list[float], list[float]]:
    enclave: list[float] = []
    plain: list[float] = []
    for i in range(launches):
        start = time.perf_counter()
        child = subprocess.Popen(plain_argv, env=plain_env)
        wait_ready(listener)
        plain.append(time.perf_counter() - start)
        child.kill()
        child.wait()
        start = time.perf_counter()
        proc = subprocess.run([ENCLAVEKIT, "run-enclave", "--eif-path", str(eif), "--cpu-count", "1",
                               "--memory", memory], env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        wait_ready(listener)
        enclave.append(time.perf_counter() - start)
        # by id: --all would also stop the launch server (it ends everything of the run directory)
        subprocess.run([ENCLAVEKIT, "terminate-enclave", "--enclave-id", json.loads(proc.stdout)["EnclaveID"]],
                       env=env, capture_output=True, check=True)
        print(f"[{label}] launch {i + 1}/{launches}: enclave {enclave[-1] * 1000:.0f} ms, "
              f"plain {plain[-1] * 1000:.1f} ms", file=sys.stderr)
    return enclave, plain


if __name__ == "__main__":
    sys.exit(main())
