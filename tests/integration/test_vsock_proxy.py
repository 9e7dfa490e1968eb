"""vsock-proxy as a real process: the ``enclavekit vsock-proxy`` CLI, a TCP server on 127.0.0.1, and "enclave"
clients on the vsock emulation."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavekit.errors import VsockConnectionRefused
from enclavekit.vsock.transport import UnixVsockTransport

pytestmark = pytest.mark.integration

_SCRIPT = Path(sys.executable).with_name("enclavekit")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "enclavekit.cli.main"]
STREAMS = 32
STREAM_BYTES = 1 << 20
LOCAL_PORT = 8000


class TCPServer:
    """Threaded TCP server on 127.0.0.1: echo, recording the SHA-256 of what each connection sent."""

    def __init__(self, port: int = 0, mode: str = "echo") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.mode = mode
        self.received: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if self.mode == "close":
                return
            digest = hashlib.sha256()
            while data := conn.recv(65536):
                digest.update(data)
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            with self._lock:
                self.received.append(digest.hexdigest())

    def close(self) -> None:
        # shutdown wakes the thread blocked in accept(); close alone would leave the port listening.
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vi") as d:
        yield Path(d)


def _config(root: Path, entries: list[tuple[str, int]]) -> Path:
    path = root / "vsock-proxy.yaml"
    lines = ["allowlist:"] + [f"- {{address: {a}, port: {p}}}" for a, p in entries]
    path.write_text("\n".join(lines) + "\n")
    return path


class Proxy:
    def __init__(self, root: Path, config: Path, remote_port: int, workers: int = 4) -> None:
        self.socket = root / "3" / f"{LOCAL_PORT}.sock"
        self.proc = subprocess.Popen(
            [*CLI, "vsock-proxy", "-w", str(workers), "--config", str(config), "--vsock-dir", str(root),
             str(LOCAL_PORT), "127.0.0.1", str(remote_port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"vsock-proxy did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            time.sleep(0.02)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def _stream(enclave: UnixVsockTransport, payload: bytes) -> bytes:
    with enclave.connect(3, LOCAL_PORT, timeout=10) as conn:
        conn.settimeout(60)

        def send() -> None:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        sender.join(60)
    return b"".join(chunks)


def test_many_concurrent_streams_keep_every_byte(root: Path) -> None:
    server = TCPServer()
    proxy = Proxy(root, _config(root, [("kms.us-east-1.amazonaws.com", 443), ("127.0.0.1", server.port)]),
                  server.port, workers=4)
    enclave = UnixVsockTransport(root, local_cid=16)
    payloads = [os.urandom(STREAM_BYTES) for _ in range(STREAMS)]
    back: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            back[i] = _stream(enclave, payloads[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    status, err = proxy.stop()
    server.close()
    assert not errors, errors
    sent = sorted(hashlib.sha256(p).hexdigest() for p in payloads)
    # enclave -> remote: what the server received; remote -> enclave: what came back.
    assert sorted(server.received) == sent
    assert sorted(hashlib.sha256(back[i]).hexdigest() for i in range(STREAMS)) == sent
    assert status == 0, err
    assert "with 4 workers" in err
    assert not proxy.socket.exists()


def test_allowlist_refusal_at_start(root: Path) -> None:
    config = _config(root, [("127.0.0.1", 9000), ("kms.us-east-1.amazonaws.com", 443)])
    result = subprocess.run([*CLI, "vsock-proxy", "--config", str(config), "--vsock-dir", str(root),
                             str(LOCAL_PORT), "127.0.0.1", "9001"],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert "[ E78 ] Error at checking the allowlist: The given address and port are not allowed" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "3").exists()  # nothing listened


@pytest.mark.parametrize(("args", "status", "text"), [
    (["--config", "/nonexistent/vsock-proxy.yaml", "8000", "127.0.0.1", "9000"], 19, "[ E19 ]"),
    (["-w", "0", "8000", "127.0.0.1", "9000"], 3, "num_workers"),
    (["8000", "127.0.0.1", "70000"], 3, "REMOTE_PORT"),
    (["4294967296", "127.0.0.1", "9000"], 3, "LOCAL_PORT"),
    (["-4", "-6", "8000", "127.0.0.1", "9000"], 2, "not allowed with"),
])
def test_bad_arguments(root: Path, args: list[str], status: int, text: str) -> None:
    config = _config(root, [("127.0.0.1", 9000)])
    full = args if "--config" in args else ["--config", str(config), *args]
    result = subprocess.run([*CLI, "vsock-proxy", "--vsock-dir", str(root), *full],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == status, result.stderr
    assert text in result.stderr


def test_malformed_allowlist(root: Path) -> None:
    config = root / "bad.yaml"
    config.write_text("allowlist: [{address: 127.0.0.1}]\n")
    result = subprocess.run([*CLI, "vsock-proxy", "--config", str(config), "--vsock-dir", str(root),
                             "8000", "127.0.0.1", "9000"], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert "has no 'port'" in result.stderr


def test_remote_failure_is_clean_and_the_proxy_survives(root: Path) -> None:
    port = _free_port()
    proxy = Proxy(root, _config(root, [("127.0.0.1", port)]), port)
    enclave = UnixVsockTransport(root, local_cid=16)
    try:
        # Remote absent: the enclave's connection ends with EOF, no hang.
        with enclave.connect(3, LOCAL_PORT, timeout=10) as conn:
            conn.settimeout(20)
            assert conn.recv(10) == b""
        # Remote accepts and closes at once: EOF again.
        closer = TCPServer(port, mode="close")
        with enclave.connect(3, LOCAL_PORT, timeout=10) as conn:
            conn.settimeout(20)
            assert conn.recv(10) == b""
        closer.close()
        # A working remote on the same port: the same proxy forwards.
        server = TCPServer(port)
        assert _stream(enclave, b"after the outage") == b"after the outage"
        server.close()
        assert proxy.proc.poll() is None
    finally:
        status, err = proxy.stop()
    assert status == 0, err
    assert "could not connect" in err
    with pytest.raises(VsockConnectionRefused):
        enclave.connect(3, LOCAL_PORT, timeout=5)
