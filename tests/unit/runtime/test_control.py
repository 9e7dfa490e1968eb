"""The CLI ↔ supervisor control protocol: framing, requests and replies, and the socket shell."""

from __future__ import annotations

import io
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclavekit.errors import EnclaveKitError
from enclavekit.runtime import control
from enclavekit.runtime.console import ConsoleRecorder, copy_stream, tail_lines
from enclavekit.runtime.control import (
    MAX_FRAME,
    ControlError,
    ControlServer,
    FrameDecoder,
    Request,
    encode_frame,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
    recv_frame,
)

# ---------------------------------------------------------------- framing


def test_frame_round_trip_in_pieces() -> None:
    data = encode_frame({"a": 1}) + encode_frame({"b": [1, 2]})
    dec = FrameDecoder()
    out: list[dict[str, Any]] = []
    for i in range(len(data)):
        out += dec.feed(data[i:i + 1])
    assert out == [{"a": 1}, {"b": [1, 2]}]
    assert dec.pending == 0


def test_frame_header_is_big_endian_length() -> None:
    frame = encode_frame({})
    assert frame[:4] == struct.pack(">I", 2) and frame[4:] == b"{}"


def test_oversized_frame_is_refused_before_reading_it() -> None:
    with pytest.raises(ControlError, match="at most"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"[1, 2]", b"not json"])
def test_frame_payload_must_be_a_json_object(payload: bytes) -> None:
    with pytest.raises(ControlError):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


def test_encode_frame_rejects_non_objects() -> None:
    with pytest.raises(TypeError):
        encode_frame([1])  # type: ignore[arg-type]


def test_truncated_frame_on_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", 10) + b"{}")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ControlError, match="closed inside a frame"):
            recv_frame(b)


def test_clean_eof_between_frames_is_none() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.close()
        assert recv_frame(b) is None


# ---------------------------------------------------------------- requests and replies


def test_request_round_trip() -> None:
    obj = FrameDecoder().feed(encode_request("describe", metadata=True))[0]
    assert parse_request(obj) == Request("describe", {"metadata": True})


def test_unknown_operation() -> None:
    with pytest.raises(ValueError):
        encode_request("reboot")
    with pytest.raises(EnclaveKitError) as info:
        parse_request({"v": 1, "op": "reboot", "args": {}})
    assert info.value.code == "E14"


def test_wrong_version_and_bad_args() -> None:
    with pytest.raises(ControlError):
        parse_request({"v": 2, "op": "ping"})
    with pytest.raises(ControlError):
        parse_request({"v": 1, "op": "ping", "args": []})


def test_error_reply_is_raised_with_its_code_and_details() -> None:
    err = EnclaveKitError("not debug", code="E44", details={"k": "v"})
    obj = FrameDecoder().feed(encode_reply(error=err))[0]
    with pytest.raises(EnclaveKitError) as info:
        parse_reply(obj)
    assert (info.value.code, info.value.message, info.value.details) == ("E44", "not debug", {"k": "v"})


def test_error_reply_with_unknown_code_becomes_e38() -> None:
    with pytest.raises(EnclaveKitError) as info:
        parse_reply({"v": 1, "ok": False, "error": {"code": "E999", "message": "x"}})
    assert info.value.code == "E38"


def test_malformed_replies() -> None:
    with pytest.raises(ControlError):
        parse_reply({"v": 1})
    with pytest.raises(ControlError):
        parse_reply({"v": 1, "ok": False})


# ---------------------------------------------------------------- socket shell


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ekc", dir="/tmp") as d:
        yield Path(d)


def test_server_answers_requests_and_enforces_owner_ops(short_dir: Path) -> None:
    seen: list[tuple[str, int]] = []

    def handler(req: Request, uid: int, conn: socket.socket) -> Any:
        seen.append((req.op, uid))
        if req.op == "describe":
            return {"State": "RUNNING", "metadata": req.args.get("metadata")}
        raise EnclaveKitError("nope", code="E44")

    path = short_dir / "c.sock"
    owner = os.getuid() + 1  # another user owns this enclave: only describe/ping are allowed
    server = ControlServer(path, handler, owner_uid=owner)
    server.start()
    try:
        assert control.request(path, "describe", metadata=True) == {"State": "RUNNING", "metadata": True}
        with pytest.raises(EnclaveKitError) as info:
            control.request(path, "console")
        expected = "E44" if os.getuid() == 0 else "E18"  # root may do everything
        assert info.value.code == expected
    finally:
        server.close()
    assert not path.exists()
    assert seen[0] == ("describe", os.getuid())


def test_request_to_missing_socket_is_e40(short_dir: Path) -> None:
    with pytest.raises(EnclaveKitError) as info:
        control.request(short_dir / "none.sock", "ping")
    assert info.value.code == "E40"


def test_request_to_dead_socket_is_e39(short_dir: Path) -> None:
    path = short_dir / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens
    with pytest.raises(EnclaveKitError) as info:
        control.request(path, "ping")
    assert info.value.code == "E39"


def test_server_that_closes_without_reply_is_e38(short_dir: Path) -> None:
    path = short_dir / "mute.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def mute() -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=mute)
    t.start()
    try:
        with pytest.raises(EnclaveKitError) as info:
            control.request(path, "ping")
        assert info.value.code == "E38"
    finally:
        t.join()
        listener.close()


# ---------------------------------------------------------------- console


def test_console_recorder_logs_and_feeds_followers(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    rec = ConsoleRecorder(log)
    r, w = os.pipe()
    rec.start(r)
    os.write(w, b"boot line\n")
    a, b = socket.socketpair()
    follower_thread = threading.Thread(target=rec.serve_follower, args=(a,))
    # wait until the first line reached the log, then attach: the backlog carries it
    for _ in range(200):
        if log.read_bytes() == b"boot line\n":
            break
        threading.Event().wait(0.01)
    follower_thread.start()
    os.write(w, b"second\n")
    os.close(w)
    assert rec.wait(5)
    follower_thread.join(5)
    out = io.BytesIO()
    with b:
        copy_stream(b, out)
    assert out.getvalue() == b"boot line\nsecond\n"
    assert log.read_bytes() == b"boot line\nsecond\n"
    assert tail_lines(log, 1) == ["second"]


def test_console_rotation(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    rec = ConsoleRecorder(log, max_bytes=10)
    rec.write(b"12345678\n")
    rec.write(b"abc\n")
    rec.close()
    assert (tmp_path / "console.log.1").read_bytes() == b"12345678\n"
    assert log.read_bytes() == b"abc\n"
    assert rec.attach() == (None, b"")


def test_copy_stream_stops_at_disconnect_timeout() -> None:
    a, b = socket.socketpair()
    ticks = iter([0.0, 0.0, 5.0])
    out = io.BytesIO()
    with a, b:
        a.sendall(b"x")
        copy_stream(b, out, disconnect_timeout=1.0, clock=lambda: next(ticks))
    assert out.getvalue() == b"x"


def test_tail_lines_of_missing_log(tmp_path: Path) -> None:
    assert tail_lines(tmp_path / "nope") == []
    assert tail_lines(tmp_path / "nope", 0) == []
