"""NSM socket server framing, driven over socket pairs (no listening socket needed) and a temp-dir socket."""

from __future__ import annotations

import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavekit.errors import NSMTransportError
from enclavekit.formats import nsm_messages as m
from enclavekit.nsm.server import MAX_DISCARD, NSMServer, read_exact
from enclavekit.testing.nsm import FakeNSM


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, threading.Thread]]:
    """A client socket connected to a server thread running ``serve_connection`` on the other end."""
    server = NSMServer(FakeNSM(), "/nonexistent/unused.sock")
    client, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    peer.settimeout(10)
    thread = threading.Thread(target=lambda: (server.serve_connection(peer), peer.close()))
    thread.start()
    yield client, thread
    client.close()
    thread.join(10)
    assert not thread.is_alive()


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def read_response(sock: socket.socket) -> bytes:
    header = read_exact(sock, 4)
    assert header is not None
    body = read_exact(sock, struct.unpack(">I", header)[0])
    assert body is not None
    return body


def test_request_response_frames(pair: tuple[socket.socket, threading.Thread]) -> None:
    client, _ = pair
    client.sendall(frame(m.DescribePCRRequest(16).to_bytes()))
    assert m.decode_response(read_response(client)) == m.DescribePCRResponse(False, bytes(48))
    client.sendall(frame(m.GetRandomRequest().to_bytes()) + frame(m.LockPCRRequest(16).to_bytes()))
    assert isinstance(m.decode_response(read_response(client)), m.GetRandomResponse)
    assert m.decode_response(read_response(client)) == m.LockPCRResponse()


def test_malformed_body_is_answered_invalid_operation(pair: tuple[socket.socket, threading.Thread]) -> None:
    client, _ = pair
    client.sendall(frame(b"\xff\xfe"))
    assert m.decode_response(read_response(client)) == m.ErrorResponse(m.NSMErrorCode.INVALID_OPERATION)


def test_empty_body_is_answered_invalid_operation(pair: tuple[socket.socket, threading.Thread]) -> None:
    client, _ = pair
    client.sendall(frame(b""))
    assert m.decode_response(read_response(client)) == m.ErrorResponse(m.NSMErrorCode.INVALID_OPERATION)


def test_oversize_request_is_drained_and_answered(pair: tuple[socket.socket, threading.Thread]) -> None:
    client, _ = pair
    client.sendall(frame(m.ExtendPCRRequest(16, bytes(5000)).to_bytes()))
    assert m.decode_response(read_response(client)) == m.ErrorResponse(m.NSMErrorCode.INPUT_TOO_LARGE)
    # the connection stays usable
    client.sendall(frame(m.DescribeNSMRequest().to_bytes()))
    assert isinstance(m.decode_response(read_response(client)), m.DescribeNSMResponse)


def test_huge_declared_length_is_answered_then_closed(pair: tuple[socket.socket, threading.Thread]) -> None:
    client, thread = pair
    client.sendall(struct.pack(">I", MAX_DISCARD + 1))
    assert m.decode_response(read_response(client)) == m.ErrorResponse(m.NSMErrorCode.INPUT_TOO_LARGE)
    assert client.recv(1) == b""  # closed by the server
    thread.join(10)


def test_truncated_frame_closes_the_connection(pair: tuple[socket.socket, threading.Thread]) -> None:
    client, thread = pair
    client.sendall(struct.pack(">I", 100) + b"short")
    client.shutdown(socket.SHUT_WR)
    assert client.recv(1) == b""
    thread.join(10)


def test_truncated_header_closes_the_connection(pair: tuple[socket.socket, threading.Thread]) -> None:
    client, thread = pair
    client.sendall(b"\x00\x00")
    client.shutdown(socket.SHUT_WR)
    assert client.recv(1) == b""
    thread.join(10)


def test_handler_crash_is_internal_error() -> None:
    class Crashing:
        def handle(self, request: bytes) -> bytes:
            raise RuntimeError("bug")

    server = NSMServer(Crashing(), "/nonexistent/unused.sock")
    client, peer = socket.socketpair()
    thread = threading.Thread(target=server.serve_connection, args=(peer,))
    thread.start()
    client.sendall(frame(b"\x60"))
    assert m.decode_response(read_response(client)) == m.ErrorResponse(m.NSMErrorCode.INTERNAL_ERROR)
    client.close()
    thread.join(10)
    peer.close()


def test_idle_connection_is_closed(tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    with NSMServer(FakeNSM(), path, idle_timeout=0.1):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(str(path))
        assert client.recv(1) == b""
        client.close()


# --------------------------------------------------------------------------------------------- socket file


def test_socket_file_mode_is_0600_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    with NSMServer(FakeNSM(), path):
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert not path.exists()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    with NSMServer(FakeNSM(), path):
        assert path.exists()


def test_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    with NSMServer(FakeNSM(), path), pytest.raises(NSMTransportError, match="already serves"):
        NSMServer(FakeNSM(), path).start()


def test_regular_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    path.write_text("keep me")
    with pytest.raises(NSMTransportError, match="not a socket"):
        NSMServer(FakeNSM(), path).start()
    assert path.read_text() == "keep me"


def test_unbindable_path_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(NSMTransportError, match="cannot listen"):
        NSMServer(FakeNSM(), tmp_path / "missing-dir" / "nsm.sock").start()


def test_start_twice_is_a_caller_bug(tmp_path: Path) -> None:
    server = NSMServer(FakeNSM(), tmp_path / "nsm.sock")
    server.start()
    try:
        with pytest.raises(RuntimeError):
            server.start()
    finally:
        server.close()
