"""The real AF_VSOCK transport, driven only through an injected fake socket factory.

The fake stands in for AF_VSOCK with AF_UNIX sockets, so bytes really flow; no AF_VSOCK socket is ever created
(the unit-test guard in conftest.py would fail the test, and each test checks the factory saw every request).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclavekit.errors import TransportError, VsockConnectionRefused, VsockTimeout
from enclavekit.vsock.address import VMADDR_CID_ANY, VsockAddress
from enclavekit.vsock.transport import AF_VSOCK, AFVsockTransport

LOCAL_CID = 16


class FakeVsockSocket(socket.socket):
    """An AF_UNIX socket that accepts vsock ``(cid, port)`` addresses and reports them back."""

    def __init__(self, directory: Path, *, fileno: int | None = None) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fileno)
        self.directory = directory
        self.vsock_name: tuple[int, int] = (LOCAL_CID, 0)
        self.connected_to: tuple[int, int] | None = None

    def _path(self, address: tuple[int, int]) -> str:
        return str(self.directory / f"{address[0]}-{address[1]}")

    def connect(self, address: Any) -> None:
        cid, port = address
        try:
            super().connect(self._path((cid, port)))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer") from None
        self.connected_to = (cid, port)
        self.vsock_name = (LOCAL_CID, 49153)

    def connect_ex(self, address: Any) -> int:
        try:
            self.connect(address)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def bind(self, address: Any) -> None:
        cid, port = address
        assert cid == VMADDR_CID_ANY
        super().bind(self._path((3, port)))
        self.vsock_name = (3, port)

    def getsockname(self) -> Any:
        return self.vsock_name

    def accept(self) -> tuple[socket.socket, Any]:
        conn, _ = super().accept()
        return conn, (LOCAL_CID, 49154)


class FakeFactory:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.families: list[int] = []
        self.made: list[FakeVsockSocket] = []

    def __call__(self, family: int, kind: int) -> FakeVsockSocket:
        self.families.append(family)
        assert kind == socket.SOCK_STREAM
        sock = FakeVsockSocket(self.directory)
        self.made.append(sock)
        return sock


@pytest.fixture
def factory() -> Iterator[FakeFactory]:
    with tempfile.TemporaryDirectory(prefix="vf") as d:
        fake = FakeFactory(Path(d))
        yield fake
        # Every socket the transport made was the fake's: AF_VSOCK was asked for, an AF_UNIX socket was given.
        assert set(fake.families) <= {AF_VSOCK}
        assert all(s.family == socket.AF_UNIX for s in fake.made)


def test_connect_and_listen_through_the_factory(factory: FakeFactory) -> None:
    transport = AFVsockTransport(socket_factory=factory)
    listener = transport.listen(5000)
    assert listener.address == VsockAddress(3, 5000)

    def serve() -> None:
        conn, peer = listener.accept(timeout=5)
        assert peer == VsockAddress(LOCAL_CID, 49154)
        with conn:
            conn.sendall(conn.recv(100).upper())

    t = threading.Thread(target=serve)
    t.start()
    with transport.connect(3, 5000, timeout=5) as conn:
        assert conn.peer == VsockAddress(3, 5000)
        assert conn.local == VsockAddress(LOCAL_CID, 49153)
        conn.sendall(b"real path")
        assert conn.recv(100) == b"REAL PATH"
    t.join(5)
    listener.close()
    assert factory.families == [AF_VSOCK, AF_VSOCK]
    assert factory.made[1].connected_to == (3, 5000)


def test_reset_means_refused(factory: FakeFactory) -> None:
    with pytest.raises(VsockConnectionRefused):
        AFVsockTransport(socket_factory=factory).connect(3, 5999, timeout=1)
    assert factory.made[0].fileno() == -1  # closed


def test_timeout_and_other_errors_are_typed(factory: FakeFactory) -> None:
    class Slow(FakeVsockSocket):
        def connect(self, address: Any) -> None:
            raise TimeoutError("timed out")

    class Broken(FakeVsockSocket):
        def connect(self, address: Any) -> None:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")

    with pytest.raises(VsockTimeout):
        AFVsockTransport(socket_factory=lambda f, k: Slow(factory.directory)).connect(3, 1, timeout=0.1)
    with pytest.raises(TransportError, match="unreachable"):
        AFVsockTransport(socket_factory=lambda f, k: Broken(factory.directory)).connect(3, 1, timeout=0.1)


def test_factory_failure_is_a_transport_error() -> None:
    def no_vsock(family: int, kind: int) -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    with pytest.raises(TransportError, match="AF_VSOCK"):
        AFVsockTransport(socket_factory=no_vsock).connect(3, 1)


def test_bind_failure(factory: FakeFactory) -> None:
    transport = AFVsockTransport(socket_factory=factory)
    first = transport.listen(8000)
    try:
        with pytest.raises(TransportError, match="Could not bind"):
            transport.listen(8000)
    finally:
        first.close()


def test_accept_timeout(factory: FakeFactory) -> None:
    listener = AFVsockTransport(socket_factory=factory).listen(8001)
    try:
        with pytest.raises(VsockTimeout):
            listener.accept(timeout=0.05)
    finally:
        listener.close()


def test_asyncio_connect(factory: FakeFactory) -> None:
    transport = AFVsockTransport(socket_factory=factory)
    listener = transport.listen(8002)
    t = threading.Thread(target=lambda: listener.accept(timeout=5)[0].sendall(b"hi"))
    t.start()

    async def client() -> bytes:
        reader, writer, local = await transport.open_connection(3, 8002, timeout=5)
        assert local == VsockAddress(LOCAL_CID, 49153)
        data = await reader.read(2)
        writer.close()
        return data

    assert asyncio.run(client()) == b"hi"
    t.join(5)
    listener.close()

    async def refused() -> None:
        await transport.open_connection(3, 8003, timeout=5)

    with pytest.raises(VsockConnectionRefused):
        asyncio.run(refused())
