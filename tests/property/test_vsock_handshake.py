"""Property tests: handshake lines round trip, chunking does not change the outcome, and arbitrary bytes raise
only the transport's own errors."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import VsockConnectionRefused, VsockHandshakeError
from enclavekit.vsock.protocol import (
    AcceptorHandshake,
    ConnectorHandshake,
    encode_connect,
    encode_ok,
    parse_connect,
    parse_ok,
)

ports = st.integers(0, 2**32 - 1)


@given(ports)
def test_lines_round_trip(port: int) -> None:
    assert parse_connect(encode_connect(port)) == port
    assert parse_ok(encode_ok(port)) == port


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@given(ports, ports, st.binary(max_size=20), st.lists(st.integers(0, 64), max_size=8))
def test_chunking_does_not_matter(port: int, assigned: int, tail: bytes, cuts: list[int]) -> None:
    acceptor = AcceptorHandshake(port)
    result = None
    for chunk in _chunks(encode_connect(port) + tail, cuts):
        result = acceptor.receive(chunk) if result is None else result
        if result is not None:
            break
    assert result == port
    reply, _ = acceptor.reply(assigned)
    connector = ConnectorHandshake(port)
    connector.request()
    done = None
    for chunk in _chunks(reply, cuts):
        done = connector.receive(chunk)
    assert done is not None and done.local_port == assigned


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_acceptor_raises_only_handshake_errors(data: bytes) -> None:
    machine = AcceptorHandshake(5000)
    try:
        port = machine.receive(data)
    except VsockHandshakeError as exc:
        assert exc.rule
    else:
        # Only a well-formed CONNECT for the listener's own port completes.
        assert port is None or (port == 5000 and data.startswith(b"CONNECT 5000\n"))


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_connector_raises_only_transport_errors(data: bytes) -> None:
    machine = ConnectorHandshake(5000)
    machine.request()
    try:
        result = machine.receive(data)
    except (VsockHandshakeError, VsockConnectionRefused) as exc:
        assert exc.code in ("E76", "E77")
    else:
        assert result is None or data.startswith(b"OK %d\n" % result.local_port)
