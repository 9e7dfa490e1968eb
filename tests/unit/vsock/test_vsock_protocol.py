"""The handshake state machine, driven over in-memory streams: no sockets."""

import pytest

from enclavekit.errors import VsockConnectionRefused, VsockHandshakeError
from enclavekit.vsock.protocol import (
    MAX_LINE_LENGTH,
    AcceptorHandshake,
    ConnectorHandshake,
    HandshakeState,
    LineBuffer,
    encode_connect,
    encode_ok,
    parse_connect,
    parse_ok,
    run_acceptor,
    run_connector,
)


class ChunkStream:
    """Returns the scripted incoming bytes at most ``chunk`` bytes per recv (partial reads); records sends."""

    def __init__(self, incoming: bytes, chunk: int = 1) -> None:
        self.incoming = bytearray(incoming)
        self.chunk = chunk
        self.sent = bytearray()
        self.recv_sizes: list[int] = []

    def recv(self, bufsize: int) -> bytes:
        self.recv_sizes.append(bufsize)
        n = min(bufsize, self.chunk, len(self.incoming))
        out = bytes(self.incoming[:n])
        del self.incoming[:n]
        return out

    def sendall(self, data: bytes) -> None:
        self.sent += data


def test_encode() -> None:
    assert encode_connect(5000) == b"CONNECT 5000\n"
    assert encode_ok(0) == b"OK 0\n"
    assert len(encode_connect(2**32 - 1)) <= MAX_LINE_LENGTH


@pytest.mark.parametrize("port", [0, 1, 9000, 2**32 - 1])
def test_parse_good_lines(port: int) -> None:
    assert parse_connect(encode_connect(port)) == port
    assert parse_ok(encode_ok(port)) == port


@pytest.mark.parametrize(("line", "rule"), [
    (b"CONNECT 5000", "no-newline"),
    (b"CONNECT 5000\r\n", "bad-port"),
    (b"connect 5000\n", "bad-verb"),
    (b"CONNECT  5000\n", "bad-port"),
    (b"CONNECT\n", "bad-verb"),
    (b"CONNECT \n", "bad-port"),
    (b"CONNECT +5\n", "bad-port"),
    (b"CONNECT -5\n", "bad-port"),
    (b"CONNECT 05\n", "bad-port"),
    (b"CONNECT 5x\n", "bad-port"),
    (b"CONNECT 12345678901\n", "bad-port"),
    (b"CONNECT 4294967296\n", "port-range"),
    (b"CONNECT \xd9\xa1\n", "bad-port"),  # a non-ASCII digit
    (b"OK 5\n", "bad-verb"),
    (b"CONNECT " + b"1" * 40 + b"\n", "line-too-long"),
])
def test_parse_connect_bad_lines(line: bytes, rule: str) -> None:
    with pytest.raises(VsockHandshakeError) as info:
        parse_connect(line)
    assert info.value.rule == rule
    assert info.value.code == "E77"


@pytest.mark.parametrize("line", [b"OK\n", b"OK 1 2\n", b"NO 1\n", b"ok 1\n"])
def test_parse_ok_bad_lines(line: bytes) -> None:
    with pytest.raises(VsockHandshakeError):
        parse_ok(line)


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_connector_over_partial_reads(chunk: int) -> None:
    stream = ChunkStream(b"OK 49153\n", chunk)
    result = run_connector(stream, 5000)
    assert stream.sent == b"CONNECT 5000\n"
    assert result.local_port == 49153
    assert result.surplus == b""


def test_connector_keeps_bytes_after_ok() -> None:
    result = run_connector(ChunkStream(b"OK 7\nhello", chunk=64), 5000)
    assert result.surplus == b"hello"


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_acceptor_over_partial_reads(chunk: int) -> None:
    stream = ChunkStream(b"CONNECT 5000\n", chunk)
    result = run_acceptor(stream, 5000, peer_port=49200)
    assert stream.sent == b"OK 49200\n"
    assert (result.requested_port, result.peer_port) == (5000, 49200)


def test_readers_never_ask_past_a_maximal_line() -> None:
    stream = ChunkStream(b"CONNECT 5000\n", chunk=1)
    run_acceptor(stream, 5000, 1)
    assert max(stream.recv_sizes) <= MAX_LINE_LENGTH


def test_acceptor_refuses_other_port() -> None:
    with pytest.raises(VsockHandshakeError) as info:
        run_acceptor(ChunkStream(b"CONNECT 5001\n", 64), 5000, 1)
    assert info.value.rule == "port-mismatch"


def test_acceptor_eof_before_line() -> None:
    with pytest.raises(VsockHandshakeError) as info:
        run_acceptor(ChunkStream(b"CONN", 64), 5000, 1)
    assert info.value.rule == "eof"


def test_connector_eof_before_ok_is_a_refusal() -> None:
    with pytest.raises(VsockConnectionRefused):
        run_connector(ChunkStream(b"", 64), 5000)


def test_oversize_line_without_newline() -> None:
    machine = AcceptorHandshake(5000)
    with pytest.raises(VsockHandshakeError) as info:
        machine.receive(b"C" * MAX_LINE_LENGTH)
    assert info.value.rule == "line-too-long"
    assert machine.state is HandshakeState.FAILED


def test_oversize_line_in_one_chunk_with_newline() -> None:
    buf = LineBuffer()
    with pytest.raises(VsockHandshakeError) as info:
        buf.feed(b"X" * (MAX_LINE_LENGTH + 5) + b"\n")
    assert info.value.rule == "line-too-long"


def test_connector_bad_reply_fails() -> None:
    machine = ConnectorHandshake(5000)
    machine.request()
    with pytest.raises(VsockHandshakeError):
        machine.receive(b"ERR\n")
    assert machine.state is HandshakeState.FAILED


def test_state_machine_misuse_is_a_caller_bug() -> None:
    machine = ConnectorHandshake(1)
    with pytest.raises(RuntimeError):
        machine.receive(b"OK 1\n")
    machine.request()
    with pytest.raises(RuntimeError):
        machine.request()
    acceptor = AcceptorHandshake(1)
    with pytest.raises(RuntimeError):
        acceptor.reply(2)
    assert acceptor.receive(b"CONNECT 1\n") == 1
    with pytest.raises(RuntimeError):
        acceptor.receive(b"x")


def test_acceptor_keeps_early_application_bytes() -> None:
    machine = AcceptorHandshake(9)
    assert machine.receive(b"CONNECT 9\nGET /") == 9
    reply, result = machine.reply(50000)
    assert reply == b"OK 50000\n"
    assert result.surplus == b"GET /"
