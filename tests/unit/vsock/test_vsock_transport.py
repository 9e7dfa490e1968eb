"""The Unix-socket emulation between a "parent" and an "enclave" endpoint in a temporary vsock root."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from enclavekit.errors import TransportError, VsockConnectionRefused, VsockHandshakeError, VsockTimeout
from enclavekit.vsock.address import VMADDR_CID_ANY, VMADDR_PORT_ANY, VsockAddress
from enclavekit.vsock.transport import UnixVsockTransport, VsockConnection, socket_path

ENCLAVE_CID = 16


@pytest.fixture
def root() -> Iterator[Path]:
    # Short path: sun_path holds 107 bytes, and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="vs") as d:
        yield Path(d)


@pytest.fixture
def parent(root: Path) -> UnixVsockTransport:
    return UnixVsockTransport(root, local_cid=3, handshake_timeout=1.0)


@pytest.fixture
def enclave(root: Path) -> UnixVsockTransport:
    return UnixVsockTransport(root, local_cid=ENCLAVE_CID, handshake_timeout=1.0)


def _serve_once(listener: object, handler: Callable[[VsockConnection], None]) -> threading.Thread:
    def run() -> None:
        conn, _ = listener.accept(timeout=5)  # type: ignore[attr-defined]
        with conn:
            handler(conn)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _echo_reversed(conn: VsockConnection) -> None:
    conn.sendall(conn.recv(1024)[::-1])


def test_layout_one_path_per_address(root: Path) -> None:
    assert socket_path(root, VsockAddress(3, 8000)) == root / "3" / "8000.sock"
    assert socket_path(root, VsockAddress(16, 5005)) == root / "16" / "5005.sock"


def test_enclave_connects_to_parent(parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    with parent.listen(5000) as listener:
        assert listener.address == VsockAddress(3, 5000)
        t = _serve_once(listener, _echo_reversed)
        with enclave.connect(3, 5000, timeout=5) as conn:
            assert conn.peer == VsockAddress(3, 5000)
            assert conn.local.cid == ENCLAVE_CID
            conn.sendall(b"hello over emulated vsock")
            assert conn.recv(1024) == b"kcosv detalume revo olleh"
        t.join(5)


def test_parent_connects_to_enclave_and_peers_agree_on_ports(parent: UnixVsockTransport,
                                                            enclave: UnixVsockTransport) -> None:
    seen: list[VsockAddress] = []
    with enclave.listen(5005) as listener:
        def run() -> None:
            conn, peer = listener.accept(timeout=5)
            seen.append(peer)
            with conn:
                _echo_reversed(conn)

        t = threading.Thread(target=run)
        t.start()
        with parent.connect(ENCLAVE_CID, 5005, timeout=5) as conn:
            conn.sendall(b"ping-0")
            assert conn.recv(100) == b"0-gnip"
        t.join(5)
    # The enclave sees the parent (CID 3) with the port the OK line gave the parent.
    assert seen == [VsockAddress(3, conn.local.port)]


def test_parent_does_not_learn_the_enclave_cid(parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    with parent.listen(5006) as listener:
        out: list[VsockAddress] = []
        t = threading.Thread(target=lambda: out.append(listener.accept(timeout=5)[1]))
        t.start()
        conn = enclave.connect(3, 5006, timeout=5)
        t.join(5)
        conn.close()
    assert out[0].cid == VMADDR_CID_ANY


def test_no_byte_is_consumed_by_the_handshake(parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    # The acceptor writes right after OK and the connector pipelines right after CONNECT's reply: nothing lost.
    with parent.listen(5001) as listener:
        def greet(conn: VsockConnection) -> None:
            conn.sendall(b"greeting\n")
            assert conn.recv(100) == b"answer"

        t = _serve_once(listener, greet)
        with enclave.connect(3, 5001, timeout=5) as conn:
            assert conn.recv(100) == b"greeting\n"
            conn.sendall(b"answer")
        t.join(5)


def test_half_close(parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    with parent.listen(5002) as listener:
        def sink(conn: VsockConnection) -> None:
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            conn.sendall(b"got %d" % len(data))

        t = _serve_once(listener, sink)
        with enclave.connect(3, 5002, timeout=5) as conn:
            conn.sendall(b"x" * 100_000)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b"got 100000"
        t.join(5)


def test_refused_when_nobody_listens(enclave: UnixVsockTransport) -> None:
    with pytest.raises(VsockConnectionRefused) as info:
        enclave.connect(3, 5999, timeout=5)
    assert info.value.code == "E76"


def test_refused_on_a_stale_socket_file(parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    listener = parent.listen(5998)
    os.link(listener.path, listener.path + ".keep")  # keep the file after close, as a crashed listener would
    listener.close()
    os.rename(listener.path + ".keep", listener.path)
    with pytest.raises(VsockConnectionRefused):
        enclave.connect(3, 5998, timeout=5)
    # A new listener replaces the stale file.
    with parent.listen(5998) as again:
        assert again.address.port == 5998


def test_enclave_reaches_only_the_parent(enclave: UnixVsockTransport) -> None:
    for cid in (2, 17, VMADDR_CID_ANY):
        with pytest.raises(VsockConnectionRefused, match="only the"):
            enclave.connect(cid, 5000, timeout=1)


def test_connect_timeout_when_the_listener_never_answers(root: Path, enclave: UnixVsockTransport) -> None:
    # A bare Unix listener that never accepts: connect() succeeds into its backlog, OK never comes.
    (root / "3").mkdir()
    bare = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bare.bind(str(root / "3" / "6000.sock"))
    bare.listen(4)
    try:
        with pytest.raises(VsockTimeout) as info:
            enclave.connect(3, 6000, timeout=0.2)
        assert info.value.code == "E10"
    finally:
        bare.close()


def test_accept_timeout(parent: UnixVsockTransport) -> None:
    with parent.listen(6001) as listener, pytest.raises(VsockTimeout):
        listener.accept(timeout=0.05)


def test_listener_drops_broken_peers_and_keeps_serving(root: Path, parent: UnixVsockTransport,
                                                       enclave: UnixVsockTransport) -> None:
    with parent.listen(6002) as listener:
        for junk in (b"HELLO\n", b"CONNECT 6003\n", b"X" * 40):
            bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bad.connect(listener.path)
            bad.sendall(junk)
            bad.close()
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(listener.path)  # never sends: dropped after the handshake timeout
        t = _serve_once(listener, _echo_reversed)
        with enclave.connect(3, 6002, timeout=5) as conn:
            conn.sendall(b"ab")
            assert conn.recv(10) == b"ba"
        t.join(5)
        silent.close()


def test_connector_sees_handshake_error_on_garbage_reply(root: Path, enclave: UnixVsockTransport) -> None:
    (root / "3").mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(root / "3" / "6004.sock"))
    server.listen(1)

    def reply() -> None:
        c, _ = server.accept()
        c.recv(100)
        c.sendall(b"NOPE\n")
        c.close()

    t = threading.Thread(target=reply)
    t.start()
    try:
        with pytest.raises(VsockHandshakeError):
            enclave.connect(3, 6004, timeout=5)
    finally:
        t.join(5)
        server.close()


def test_port_in_use(parent: UnixVsockTransport) -> None:
    with parent.listen(7000), pytest.raises(TransportError, match="Could not bind to cid: 3 port: 7000"):
        parent.listen(7000)


def test_refuses_to_replace_a_non_socket(root: Path, parent: UnixVsockTransport) -> None:
    (root / "3").mkdir()
    (root / "3" / "7001.sock").write_text("not a socket")
    with pytest.raises(TransportError, match="not a socket"):
        parent.listen(7001)


def test_ephemeral_port(parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    with parent.listen(VMADDR_PORT_ANY) as listener:
        assert 49152 <= listener.address.port < VMADDR_PORT_ANY
        t = _serve_once(listener, _echo_reversed)
        with enclave.connect(3, listener.address.port, timeout=5) as conn:
            conn.sendall(b"12")
            assert conn.recv(10) == b"21"
        t.join(5)


def test_close_removes_only_its_own_socket_file(parent: UnixVsockTransport) -> None:
    listener = parent.listen(7002)
    path = Path(listener.path)
    assert path.exists()
    listener.close()
    assert not path.exists()
    listener.close()  # idempotent
    with pytest.raises(TransportError, match="closed"):
        listener.accept(timeout=0.01)


def test_path_too_long() -> None:
    transport = UnixVsockTransport("/tmp/" + "d" * 120, local_cid=3)
    with pytest.raises(TransportError, match="longer than"):
        transport.connect(16, 1, timeout=1)


def test_caller_bugs_raise_value_error(root: Path, parent: UnixVsockTransport) -> None:
    with pytest.raises(ValueError):
        parent.connect(16, 1, timeout=0)
    with pytest.raises(ValueError):
        parent.connect(16, -1)
    with pytest.raises(ValueError):
        UnixVsockTransport(root, local_cid=VMADDR_CID_ANY)
    with pytest.raises(ValueError):
        UnixVsockTransport(root, handshake_timeout=0)


# ---- asyncio


def test_asyncio_both_directions(parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    async def scenario() -> None:
        listener = await enclave.start_listener(8000)
        try:
            async def client() -> bytes:
                reader, writer, local = await parent.open_connection(ENCLAVE_CID, 8000, timeout=5)
                assert local.cid == 3
                writer.write(b"async ping")
                writer.write_eof()
                data = await reader.read()
                writer.close()
                return data

            task = asyncio.create_task(client())
            reader, writer, peer = await listener.accept(timeout=5)
            assert peer.cid == 3
            writer.write((await reader.read())[::-1])
            await writer.drain()
            writer.close()
            assert await task == b"gnip cnysa"
        finally:
            await listener.close()

    asyncio.run(scenario())


def test_asyncio_interoperates_with_blocking(parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    with parent.listen(8001) as listener:
        t = _serve_once(listener, _echo_reversed)

        async def client() -> bytes:
            reader, writer, _ = await enclave.open_connection(3, 8001, timeout=5)
            writer.write(b"xyz")
            data = await reader.read(10)
            writer.close()
            return data

        assert asyncio.run(client()) == b"zyx"
        t.join(5)


def test_asyncio_refused_and_timeouts(root: Path, parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    async def scenario() -> None:
        with pytest.raises(VsockConnectionRefused):
            await enclave.open_connection(3, 8999, timeout=5)
        with pytest.raises(VsockConnectionRefused):
            await enclave.open_connection(4, 8999, timeout=5)
        listener = await parent.start_listener(8998)
        try:
            with pytest.raises(VsockTimeout):
                await listener.accept(timeout=0.05)
        finally:
            await listener.close()
        assert not (root / "3" / "8998.sock").exists()
        (root / "3" / "8997.sock").parent.mkdir(exist_ok=True)
        bare = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bare.bind(str(root / "3" / "8997.sock"))
        bare.listen(1)
        try:
            with pytest.raises(VsockTimeout):
                await enclave.open_connection(3, 8997, timeout=0.2)
        finally:
            bare.close()

    asyncio.run(scenario())


def test_asyncio_listener_drops_broken_peer(parent: UnixVsockTransport, enclave: UnixVsockTransport) -> None:
    async def scenario() -> None:
        listener = await parent.start_listener(8996)
        try:
            bad_r, bad_w = await asyncio.open_unix_connection(listener.path)
            bad_w.write(b"GARBAGE\n")
            await bad_w.drain()
            assert await bad_r.read() == b""  # dropped without an OK
            bad_w.close()
            reader, writer, _ = await enclave.open_connection(3, 8996, timeout=5)
            _, server_writer, _ = await listener.accept(timeout=5)
            server_writer.write(b"ok")
            await server_writer.drain()
            assert await reader.read(2) == b"ok"
            writer.close()
            server_writer.close()
        finally:
            await listener.close()

    asyncio.run(scenario())
