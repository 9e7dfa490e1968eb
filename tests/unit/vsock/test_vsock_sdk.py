"""enclavekit.sdk.vsock: which transport is chosen, and the SDK calls over the emulation."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

import pytest

from enclavekit.errors import ConfigError, TransportError, VsockConnectionRefused
from enclavekit.sdk import vsock
from enclavekit.vsock.transport import AFVsockTransport, UnixVsockTransport


def test_default_is_the_emulation_even_with_dev_vsock(tmp_path: Path) -> None:
    fake_dev = tmp_path / "vsock"
    fake_dev.touch()
    transport = vsock.select_transport({}, dev_vsock=str(fake_dev))
    assert isinstance(transport, UnixVsockTransport)
    assert transport.root == Path("/run/enclavekit/vsock")
    assert transport.local_cid == 3


def test_run_dir_and_cid_from_env() -> None:
    transport = vsock.select_transport({"ENCLAVEKIT_RUN_DIR": "/tmp/rd", "ENCLAVEKIT_VSOCK_CID": "21"})
    assert isinstance(transport, UnixVsockTransport)
    assert (transport.root, transport.local_cid) == (Path("/tmp/rd/vsock"), 21)


def test_vsock_dir_wins_over_the_real_opt_in(tmp_path: Path) -> None:
    env = {"ENCLAVEKIT_VSOCK_DIR": "/v", "ENCLAVEKIT_REAL_VSOCK": "1", "ENCLAVEKIT_VSOCK_CID": "16"}
    transport = vsock.select_transport(env, dev_vsock=str(tmp_path))
    assert isinstance(transport, UnixVsockTransport)
    assert transport.root == Path("/v")
    assert transport.is_enclave


def test_real_vsock_only_on_explicit_opt_in_with_the_device(tmp_path: Path) -> None:
    # Selecting the transport creates no socket; nothing here connects.
    assert isinstance(vsock.select_transport({"ENCLAVEKIT_REAL_VSOCK": "1"}, dev_vsock=str(tmp_path)),
                      AFVsockTransport)
    with pytest.raises(TransportError, match="does not exist"):
        vsock.select_transport({"ENCLAVEKIT_REAL_VSOCK": "1"}, dev_vsock=str(tmp_path / "absent"))
    assert isinstance(vsock.select_transport({"ENCLAVEKIT_REAL_VSOCK": "yes"}, dev_vsock=str(tmp_path)),
                      UnixVsockTransport)


@pytest.mark.parametrize("bad", ["x", "-1", "4294967296"])
def test_bad_cid_env(bad: str) -> None:
    with pytest.raises(ConfigError):
        vsock.select_transport({"ENCLAVEKIT_VSOCK_CID": bad})


def test_same_code_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="vk") as d:
        # The "enclave" process: env as the runtime sets it.
        monkeypatch.setenv("ENCLAVEKIT_VSOCK_DIR", d)
        monkeypatch.setenv("ENCLAVEKIT_VSOCK_CID", "16")
        listener = vsock.listen(5000)

        def serve() -> None:
            conn, peer = listener.accept(timeout=5)
            assert peer.cid == 3
            with conn:
                conn.sendall(conn.recv(100) + b"!")

        t = threading.Thread(target=serve)
        t.start()
        parent = UnixVsockTransport(d, local_cid=3)
        with vsock.connect(16, 5000, timeout=5, transport=parent) as conn:
            conn.sendall(b"hi")
            assert conn.recv(100) == b"hi!"
        t.join(5)
        listener.close()
        with pytest.raises(VsockConnectionRefused):
            vsock.connect(3, 5000, timeout=1)

        async def scenario() -> bytes:
            server = await vsock.async_listen(5001, transport=parent)
            try:
                reader, writer = await vsock.async_connect(3, 5001, timeout=5)
                _, server_writer, _ = await server.accept(timeout=5)
                server_writer.write(b"async")
                await server_writer.drain()
                data = await reader.read(5)
                writer.close()
                server_writer.close()
                return data
            finally:
                await server.close()

        assert asyncio.run(scenario()) == b"async"
