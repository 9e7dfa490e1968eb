"""VsockProxy over the emulation, with the "remote" on a Unix socket (unit tests stay off the network).

The TCP side is exercised by tests/integration/test_vsock_proxy.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from enclavekit.vsock.proxy import Destination, VsockProxy
from enclavekit.vsock.transport import UnixVsockTransport

DEST = Destination("remote.example", 443, ipaddress.ip_address("192.0.2.1"))


class UnixServer:
    """A threaded Unix-socket server running ``handler(conn)`` per connection."""

    def __init__(self, path: str, handler: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.handler = handler
        self.connections = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            self.handler(conn)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def count_then_reply(conn: socket.socket) -> None:
    n = 0
    while data := conn.recv(65536):
        n += len(data)
    conn.sendall(b"%d" % n)


def close_at_once(conn: socket.socket) -> None:
    return


@pytest.fixture
def root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vp") as d:
        yield Path(d)


def _proxy(root: Path, handler: Callable[[socket.socket], None] | None, workers: int = 4
           ) -> tuple[VsockProxy, UnixServer | None]:
    remote_path = str(root / "remote.sock")
    server = UnixServer(remote_path, handler) if handler else None

    def connect_remote(destination: Destination, timeout: float) -> socket.socket:
        assert destination == DEST
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(remote_path)
            s.settimeout(None)
        except OSError:
            s.close()
            raise
        return s

    parent = UnixVsockTransport(root, local_cid=3)
    proxy = VsockProxy(parent.listen(8000), DEST, workers=workers, connect_timeout=2,
                       connect_remote=connect_remote)
    proxy.start()
    return proxy, server


def _enclave(root: Path) -> UnixVsockTransport:
    return UnixVsockTransport(root, local_cid=16)


def _round_trip(enclave: UnixVsockTransport, payload: bytes) -> bytes:
    with enclave.connect(3, 8000, timeout=5) as conn:
        conn.settimeout(30)
        sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        sender.join(30)
    return b"".join(chunks)


def test_streams_beyond_the_worker_count_wait_and_all_bytes_arrive(root: Path) -> None:
    proxy, server = _proxy(root, echo, workers=2)
    enclave = _enclave(root)
    payloads = [os.urandom(100_000 + i) for i in range(8)]
    results: dict[int, bytes] = {}

    def run(i: int) -> None:
        results[i] = _round_trip(enclave, payloads[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    proxy.stop()
    assert server is not None
    server.close()
    for i, payload in enumerate(payloads):
        assert hashlib.sha256(results[i]).digest() == hashlib.sha256(payload).digest()
    assert proxy.stats.accepted == 8
    assert proxy.stats.forwarded == 8
    assert proxy.stats.bytes_to_remote == sum(map(len, payloads)) == proxy.stats.bytes_to_enclave


def test_half_close_reaches_the_remote(root: Path) -> None:
    proxy, server = _proxy(root, count_then_reply)
    try:
        assert _round_trip(_enclave(root), b"z" * 300_000) == b"300000"
    finally:
        proxy.stop()
        assert server is not None
        server.close()


def test_absent_remote_closes_the_enclave_side_and_the_proxy_survives(root: Path) -> None:
    proxy, _ = _proxy(root, None)
    enclave = _enclave(root)
    try:
        for _ in range(3):
            with enclave.connect(3, 8000, timeout=5) as conn:
                conn.settimeout(10)
                assert conn.recv(10) == b""  # clean EOF, no hang
        assert proxy.stats.remote_failures == 3
        # The remote comes up: the same proxy now forwards.
        server = UnixServer(str(root / "remote.sock"), echo)
        assert _round_trip(enclave, b"back") == b"back"
        server.close()
    finally:
        proxy.stop()


def test_remote_that_closes_at_once_gives_eof(root: Path) -> None:
    proxy, server = _proxy(root, close_at_once)
    try:
        with _enclave(root).connect(3, 8000, timeout=5) as conn:
            conn.settimeout(10)
            assert conn.recv(10) == b""
    finally:
        proxy.stop()
        assert server is not None
        server.close()


def test_stop_cuts_streams_and_removes_the_listener(root: Path) -> None:
    proxy, server = _proxy(root, echo)
    conn = _enclave(root).connect(3, 8000, timeout=5)
    conn.sendall(b"x")
    conn.settimeout(10)
    assert conn.recv(1) == b"x"
    proxy.stop()
    assert conn.recv(10) == b""
    conn.close()
    assert not (root / "3" / "8000.sock").exists()
    assert server is not None
    server.close()


def test_workers_must_be_positive(root: Path) -> None:
    with pytest.raises(ValueError):
        VsockProxy(UnixVsockTransport(root).listen(8001), DEST, workers=0)
