"""The enclave-side NSM client: the /dev/nsm ioctl transport against a fake descriptor, and transport choice.

No real device is ever opened: the ioctl function is replaced by :class:`FakeNSMDevice`, which checks the command
number and the ``struct nsm_raw`` layout (nsm-attestation-kms §1.1) and answers through ctypes like the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import threading
from pathlib import Path

import pytest

from enclavekit.errors import NSMError, NSMTransportError
from enclavekit.formats import cbor
from enclavekit.formats import nsm_messages as m
from enclavekit.nsm.module import extend_digest
from enclavekit.nsm.server import NSMServer
from enclavekit.sdk.nsm import NSM_IOCTL_RAW, IoctlTransport, NSMClient, SocketTransport
from enclavekit.testing.nsm import FakeNSM

FAKE_FD = 1234


class FakeNSMDevice:
    """Plays the kernel's part of NSM_IOCTL_RAW for a fake fd, answering from an in-process NSM."""

    def __init__(self, nsm: FakeNSM, *, reply: bytes | None = None, errno_: int | None = None,
                 reported_len: int | None = None) -> None:
        self.nsm = nsm
        self.reply = reply
        self.errno = errno_
        self.reported_len = reported_len
        self.calls: list[tuple[int, int, int, int]] = []
        self.requests: list[bytes] = []

    def __call__(self, fd: int, request: int, arg: bytearray, mutate_flag: bool, /) -> int:
        assert fd == FAKE_FD
        assert request == 0xC0200A00  # _IOWR(0x0A, 0, struct nsm_raw)
        assert mutate_flag is True
        assert isinstance(arg, bytearray)
        assert len(arg) == 32  # struct nsm_raw: four little-endian u64
        req_addr, req_len, resp_addr, resp_cap = struct.unpack("<QQQQ", arg)
        self.calls.append((req_addr, req_len, resp_addr, resp_cap))
        assert resp_cap == 0x3000  # the libraries always pass a 0x3000-byte buffer
        if req_len > 0x1000:
            raise OSError(errno.EMSGSIZE, "Message too long")
        if self.errno is not None:
            raise OSError(self.errno, "fake device error")
        request_bytes = ctypes.string_at(req_addr, req_len)
        self.requests.append(request_bytes)
        response = self.reply if self.reply is not None else self.nsm.handle(request_bytes)
        # the kernel copies min(capacity, response length) and writes that length back
        n = min(resp_cap, len(response))
        ctypes.memmove(resp_addr, response, n)
        struct.pack_into("<Q", arg, 24, self.reported_len if self.reported_len is not None else n)
        return 0


def client_for(device: FakeNSMDevice) -> NSMClient:
    return NSMClient(IoctlTransport(FAKE_FD, ioctl=device))


def test_ioctl_number_is_iowr_0x0a_0_size_32() -> None:
    ioc_write, ioc_read = 1, 2
    expected = ((ioc_read | ioc_write) << 30) | (32 << 16) | (0x0A << 8) | 0
    assert expected == NSM_IOCTL_RAW


def test_ioctl_transport_carries_the_exact_request_bytes() -> None:
    device = FakeNSMDevice(FakeNSM())
    client_for(device).attestation()
    assert device.requests == [bytes.fromhex(
        "a16b4174746573746174696f6ea369757365725f64617461f6656e6f6e6365f66a7075626c69635f6b6579f6")]


def test_every_operation_over_the_ioctl_transport() -> None:
    nsm = FakeNSM(parent_instance_id="i-1234567890abcdef0")
    client = client_for(FakeNSMDevice(nsm))
    described = client.describe_nsm()
    assert described.max_pcrs == 32
    assert described.locked_pcrs == tuple(range(16))
    assert described.module_id == nsm.module_id
    assert client.describe_pcr(4).lock is True
    new = client.extend_pcr(16, b"measure me")
    assert client.describe_pcr(16) == m.DescribePCRResponse(False, new)
    client.lock_pcr(16)
    client.lock_pcrs(20)
    assert client.describe_nsm().locked_pcrs == tuple(range(20))
    document = client.attestation(user_data=b"u", nonce=b"n", public_key=b"k")
    assert document[0] == 0x84
    assert nsm.signer.issued[-1].nonce == b"n"
    assert len(client.get_random()) == 256
    client.close()


def test_error_response_raises_nsm_error_with_the_wire_code() -> None:
    client = client_for(FakeNSMDevice(FakeNSM()))
    with pytest.raises(NSMError) as info:
        client.extend_pcr(0, b"x")
    assert info.value.error_code == "ReadOnlyIndex"
    with pytest.raises(NSMError) as info:
        client.describe_pcr(40)
    assert info.value.error_code == "InvalidIndex"


def test_emsgsize_maps_to_input_too_large() -> None:
    client = client_for(FakeNSMDevice(FakeNSM()))
    with pytest.raises(NSMError) as info:
        client.extend_pcr(16, bytes(5000))
    assert info.value.error_code == "InputTooLarge"


def test_other_errno_maps_to_internal_error() -> None:
    client = client_for(FakeNSMDevice(FakeNSM(), errno_=errno.ETIMEDOUT))
    with pytest.raises(NSMError) as info:
        client.get_random()
    assert info.value.error_code == "InternalError"
    assert "ETIMEDOUT" in str(info.value)


def test_undecodable_response_is_internal_error() -> None:
    client = client_for(FakeNSMDevice(FakeNSM(), reply=b"\xa1\x69GetRandom"))  # truncated CBOR
    with pytest.raises(NSMError) as info:
        client.get_random()
    assert info.value.error_code == "InternalError"


def test_wrong_response_variant_is_invalid_response() -> None:
    client = client_for(FakeNSMDevice(FakeNSM(), reply=m.LockPCRResponse().to_bytes()))
    with pytest.raises(NSMError) as info:
        client.get_random()
    assert info.value.error_code == "InvalidResponse"


def test_reported_length_beyond_the_buffer_is_internal_error() -> None:
    client = client_for(FakeNSMDevice(FakeNSM(), reply=b"\x60", reported_len=0x3001))
    with pytest.raises(NSMError) as info:
        client.get_random()
    assert info.value.error_code == "InternalError"


def test_response_length_is_read_back_from_the_struct() -> None:
    # a device that writes a short length: the client must use it, not the buffer size
    reply = m.LockPCRResponse().to_bytes()
    client = client_for(FakeNSMDevice(FakeNSM(), reply=reply + b"garbage-after-length", reported_len=len(reply)))
    client.lock_pcr(16)


def test_caller_bugs_raise_value_and_type_errors() -> None:
    client = client_for(FakeNSMDevice(FakeNSM()))
    with pytest.raises(ValueError):
        client.describe_pcr(-1)
    with pytest.raises(TypeError):
        client.extend_pcr("16", b"x")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ transport choice


def test_open_prefers_the_socket_from_the_environment(tmp_path: Path) -> None:
    nsm = FakeNSM()
    path = tmp_path / "nsm.sock"
    with NSMServer(nsm, path), NSMClient.open(environ={"ENCLAVEKIT_NSM_SOCKET": str(path)},
                                              device=tmp_path / "no-such-device") as client:
        assert client.describe_nsm().module_id == nsm.module_id


def test_open_uses_the_device_when_present(tmp_path: Path) -> None:
    device = tmp_path / "nsm"
    device.write_bytes(b"")
    client = NSMClient.open(environ={}, device=device)
    assert isinstance(client._transport, IoctlTransport)
    client.close()


def test_open_without_any_nsm_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(NSMTransportError) as info:
        NSMClient.open(environ={}, device=tmp_path / "nsm")
    assert info.value.code == "E74"
    assert "ENCLAVEKIT_NSM_SOCKET" in str(info.value)


def test_open_with_a_missing_socket_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(NSMTransportError, match="cannot connect"):
        NSMClient.open(environ={"ENCLAVEKIT_NSM_SOCKET": str(tmp_path / "missing.sock")})


def test_unopenable_device_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(NSMTransportError, match="cannot open NSM device"):
        IoctlTransport.open(tmp_path / "missing")


def test_socket_transport_times_out_instead_of_hanging(tmp_path: Path) -> None:
    # a listener that accepts but never answers
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        transport = SocketTransport(path, timeout=0.2)
        with pytest.raises(NSMTransportError, match="did not answer"):
            transport.exchange(m.GetRandomRequest().to_bytes())
        transport.close()
    finally:
        listener.close()


def test_socket_transport_refuses_an_oversized_response_frame(tmp_path: Path) -> None:
    path = tmp_path / "liar.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        transport = SocketTransport(path, timeout=5)
        conn, _ = listener.accept()
        conn.sendall(struct.pack(">I", 0x3001))
        with pytest.raises(NSMTransportError, match="limit"):
            transport.exchange(cbor.encode("GetRandom"))
        conn.close()
        transport.close()
    finally:
        listener.close()


def test_socket_transport_reconnects_after_the_server_closed_an_idle_connection(tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    nsm = FakeNSM()
    with NSMServer(nsm, path, idle_timeout=0.05) as server:
        client = NSMClient(SocketTransport(path, timeout=10))
        client.extend_pcr(16, b"one")
        # wait (without asserting on time) until the server has dropped the idle connection
        idle = threading.Event()
        for _ in range(1000):
            if server.connection_count() == 0:
                break
            idle.wait(0.01)
        assert server.connection_count() == 0
        client.extend_pcr(16, b"two")  # neither lost nor applied twice
        client.close()
    assert nsm.describe_pcr(16).data == extend_digest(extend_digest(bytes(48), b"one"), b"two")
