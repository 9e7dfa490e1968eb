"""The handshake of an emulated vsock channel, as a pure state machine over byte streams.

Firecracker's vsock-over-Unix-socket scheme: the connecting side sends ``CONNECT <port>\\n`` and the accepting side
answers ``OK <port>\\n``.  In Firecracker the ``OK`` carries the port the connecting side is known by on the other
end; enclavekit's acceptor does the same: it assigns the connector's port and tells it (that is what
``getsockname()`` reports on the connecting side, and ``accept()`` reports as the peer's port).

Nothing here touches a socket or a clock: :class:`ConnectorHandshake` and :class:`AcceptorHandshake` take the bytes
received so far and return decisions or bytes to send; :func:`run_connector` / :func:`run_acceptor` drive them over
any object with ``recv(n)`` and ``sendall(data)`` (a socket, or an in-memory stream in tests).

Strict parsing: a line is at most :data:`MAX_LINE_LENGTH` bytes including its ``\\n``, ASCII, exactly one space,
a decimal port 0 … 2^32-1 without sign or leading zeros, no ``\\r``; anything else is a :class:`VsockHandshakeError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from enclavekit.errors import VsockConnectionRefused, VsockHandshakeError
from enclavekit.vsock.address import MAX_PORT, check_port

__all__ = [
    "MAX_LINE_LENGTH",
    "ByteStream",
    "HandshakeState",
    "LineBuffer",
    "ConnectorHandshake",
    "AcceptorHandshake",
    "ConnectResult",
    "AcceptResult",
    "encode_connect",
    "encode_ok",
    "parse_connect",
    "parse_ok",
    "run_connector",
    "run_acceptor",
]

# "CONNECT 4294967295\n" is 19 bytes: 32 leaves room for nothing but a well-formed line.
MAX_LINE_LENGTH = 32
_MAX_DIGITS = len(str(MAX_PORT))


class ByteStream(Protocol):
    """What the drivers need from a stream: a socket, or an in-memory fake."""

    def recv(self, bufsize: int, /) -> bytes: ...

    def sendall(self, data: bytes, /) -> None: ...


class HandshakeState(enum.Enum):
    START = "start"
    AWAITING = "awaiting"
    ESTABLISHED = "established"
    FAILED = "failed"


def encode_connect(port: int) -> bytes:
    """``CONNECT <port>\\n``."""
    return b"CONNECT %d\n" % check_port(port)


def encode_ok(port: int) -> bytes:
    """``OK <port>\\n``."""
    return b"OK %d\n" % check_port(port)


def _parse_line(line: bytes, verb: bytes) -> int:
    # The whole line, newline included, is checked: one verb, one space, one canonical decimal port.
    if len(line) > MAX_LINE_LENGTH:
        raise VsockHandshakeError(f"handshake line longer than {MAX_LINE_LENGTH} bytes", rule="line-too-long")
    if not line.endswith(b"\n"):
        raise VsockHandshakeError("handshake line does not end with a newline", rule="no-newline")
    body = line[:-1]
    prefix = verb + b" "
    if not body.startswith(prefix):
        shown = body[: len(prefix)].decode("ascii", "backslashreplace")
        raise VsockHandshakeError(f"expected {verb.decode()} <port>, got {shown!r}…", rule="bad-verb")
    digits = body[len(prefix):]
    if not digits or len(digits) > _MAX_DIGITS or not all(0x30 <= b <= 0x39 for b in digits):
        raise VsockHandshakeError(f"{verb.decode()} port is not a decimal number of 1 to {_MAX_DIGITS} digits",
                                  rule="bad-port")
    if len(digits) > 1 and digits[0] == 0x30:
        raise VsockHandshakeError(f"{verb.decode()} port has a leading zero", rule="bad-port")
    port = int(digits)
    if port > MAX_PORT:
        raise VsockHandshakeError(f"{verb.decode()} port {port} is above {MAX_PORT}", rule="port-range")
    return port


def parse_connect(line: bytes) -> int:
    """The port of a complete ``CONNECT <port>\\n`` line."""
    return _parse_line(line, b"CONNECT")


def parse_ok(line: bytes) -> int:
    """The port of a complete ``OK <port>\\n`` line."""
    return _parse_line(line, b"OK")


class LineBuffer:
    """Collects bytes until the first ``\\n``; bytes after it are ``surplus`` (they belong to the application)."""

    def __init__(self, max_length: int = MAX_LINE_LENGTH) -> None:
        self._max = max_length
        self._buf = bytearray()
        self.line: bytes | None = None
        self.surplus = b""

    @property
    def wanted(self) -> int:
        """How many more bytes a reader may ask for without reading past a maximal line."""
        return max(1, self._max - len(self._buf))

    def feed(self, data: bytes) -> bytes | None:
        """Add ``data``; return the complete line (with its ``\\n``) once there is one, else None."""
        if self.line is not None:
            self.surplus += data
            return self.line
        self._buf += data
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) >= self._max:
                raise VsockHandshakeError(f"no newline within {self._max} bytes", rule="line-too-long")
            return None
        if end + 1 > self._max:
            raise VsockHandshakeError(f"handshake line longer than {self._max} bytes", rule="line-too-long")
        self.line = bytes(self._buf[: end + 1])
        self.surplus = bytes(self._buf[end + 1:])
        self._buf.clear()
        return self.line


@dataclass(frozen=True)
class ConnectResult:
    """The connecting side's view: the port the acceptor assigned to it, and bytes that arrived after ``OK``."""

    local_port: int
    surplus: bytes = b""


@dataclass(frozen=True)
class AcceptResult:
    """The accepting side's view: the port the peer asked for and the port assigned to the peer."""

    requested_port: int
    peer_port: int
    surplus: bytes = b""


class ConnectorHandshake:
    """The connecting side: send ``CONNECT <port>``, then wait for ``OK <port>``."""

    def __init__(self, port: int) -> None:
        self.port = check_port(port)
        self.state = HandshakeState.START
        self._lines = LineBuffer()
        self.result: ConnectResult | None = None

    def request(self) -> bytes:
        if self.state is not HandshakeState.START:
            raise RuntimeError(f"request() in state {self.state.value}")
        self.state = HandshakeState.AWAITING
        return encode_connect(self.port)

    @property
    def wanted(self) -> int:
        return self._lines.wanted

    def receive(self, data: bytes) -> ConnectResult | None:
        """Feed bytes from the acceptor; the result once ``OK`` arrived.  An empty ``data`` means end of stream."""
        if self.state is not HandshakeState.AWAITING:
            raise RuntimeError(f"receive() in state {self.state.value}")
        if not data:
            # Firecracker closes the stream when nobody listens on the port: that is a refusal, as on real vsock.
            self.state = HandshakeState.FAILED
            raise VsockConnectionRefused(f"connection to vsock port {self.port} refused (closed before OK)")
        try:
            line = self._lines.feed(data)
            if line is None:
                return None
            local_port = parse_ok(line)
        except VsockHandshakeError:
            self.state = HandshakeState.FAILED
            raise
        self.state = HandshakeState.ESTABLISHED
        self.result = ConnectResult(local_port=local_port, surplus=self._lines.surplus)
        return self.result


class AcceptorHandshake:
    """The accepting side: read ``CONNECT <port>``, check the port, answer ``OK <assigned port>``."""

    def __init__(self, listen_port: int) -> None:
        self.listen_port = check_port(listen_port)
        self.state = HandshakeState.AWAITING
        self._lines = LineBuffer()
        self.requested_port: int | None = None

    @property
    def wanted(self) -> int:
        return self._lines.wanted

    def receive(self, data: bytes) -> int | None:
        """Feed bytes from the connector; the requested port once the line is complete.  Empty ``data`` = EOF."""
        if self.state is not HandshakeState.AWAITING or self.requested_port is not None:
            raise RuntimeError(f"receive() in state {self.state.value}")
        try:
            if not data:
                raise VsockHandshakeError("peer closed before CONNECT", rule="eof")
            line = self._lines.feed(data)
            if line is None:
                return None
            port = parse_connect(line)
            if port != self.listen_port:
                # A channel socket serves exactly one port: a CONNECT for another port was misrouted.
                raise VsockHandshakeError(f"CONNECT for port {port} on the listener of port {self.listen_port}",
                                          rule="port-mismatch")
        except VsockHandshakeError:
            self.state = HandshakeState.FAILED
            raise
        self.requested_port = port
        return port

    def reply(self, peer_port: int) -> tuple[bytes, AcceptResult]:
        """The ``OK`` line telling the connector it is known as ``peer_port``, and the accept result."""
        if self.requested_port is None or self.state is not HandshakeState.AWAITING:
            raise RuntimeError("reply() before a complete CONNECT line")
        self.state = HandshakeState.ESTABLISHED
        result = AcceptResult(self.requested_port, check_port(peer_port), self._lines.surplus)
        return encode_ok(peer_port), result


def run_connector(stream: ByteStream, port: int) -> ConnectResult:
    """Perform the connecting side's handshake on ``stream`` (timeouts are the stream's business)."""
    machine = ConnectorHandshake(port)
    stream.sendall(machine.request())
    while True:
        result = machine.receive(stream.recv(machine.wanted))
        if result is not None:
            return result


def run_acceptor(stream: ByteStream, listen_port: int, peer_port: int) -> AcceptResult:
    """Perform the accepting side's handshake on ``stream``, assigning ``peer_port`` to the connector."""
    machine = AcceptorHandshake(listen_port)
    while machine.receive(stream.recv(machine.wanted)) is None:
        pass
    reply, result = machine.reply(peer_port)
    stream.sendall(reply)
    return result
