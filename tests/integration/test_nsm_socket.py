"""The emulated NSM served over a real Unix socket, used by the SDK client from threads and from other processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavekit._internal.ecdsa import verify_cose
from enclavekit.errors import NSMError
from enclavekit.formats import cbor
from enclavekit.formats.cose import COSESign1
from enclavekit.nsm.module import extend_digest
from enclavekit.nsm.server import NSMServer
from enclavekit.sdk.nsm import NSMClient, SocketTransport
from enclavekit.testing.nsm import FakeNSM

pytestmark = pytest.mark.integration

ZERO = bytes(48)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FakeNSM, Path]]:
    nsm = FakeNSM(measurements={"PCR0": "11" * 48, "PCR1": "22" * 48, "PCR2": "33" * 48},
                  parent_instance_id="i-1234567890abcdef0")
    path = tmp_path / "nsm.sock"
    with NSMServer(nsm, path):
        yield nsm, path


def test_full_session_over_the_socket(served: tuple[FakeNSM, Path]) -> None:
    nsm, path = served
    with NSMClient(SocketTransport(path, timeout=10)) as client:
        assert client.describe_nsm().locked_pcrs == tuple(range(16))
        assert client.describe_pcr(0).data == bytes.fromhex("11" * 48)
        value = client.extend_pcr(16, b"app config")
        assert value == extend_digest(ZERO, b"app config")
        client.lock_pcrs(17)
        with pytest.raises(NSMError) as info:
            client.extend_pcr(16, b"again")
        assert info.value.error_code == "ReadOnlyIndex"
        document = client.attestation(nonce=b"n" * 32, public_key=b"pk")
    message = COSESign1.from_bytes(document)
    assert verify_cose(message, nsm.signer.key.public_key())
    payload = cbor.decode(message.payload)
    assert sorted(payload["pcrs"]) == list(range(17))
    assert payload["pcrs"][16] == value
    assert payload["nonce"] == b"n" * 32


def test_oversize_request_over_the_socket_is_input_too_large(served: tuple[FakeNSM, Path]) -> None:
    _, path = served
    with NSMClient(SocketTransport(path, timeout=10)) as client:
        with pytest.raises(NSMError) as info:
            client.extend_pcr(16, bytes(8000))
        assert info.value.error_code == "InputTooLarge"
        with pytest.raises(NSMError) as info:
            client.attestation(user_data=bytes(1025))
        assert info.value.error_code == "InputTooLarge"
        # the same connection keeps working
        assert len(client.get_random()) == 256


def test_concurrent_clients_share_one_nsm(served: tuple[FakeNSM, Path]) -> None:
    nsm, path = served
    errors: list[BaseException] = []
    rounds, workers = 25, 6

    def worker() -> None:
        try:
            with NSMClient(SocketTransport(path, timeout=30)) as client:
                for _ in range(rounds):
                    client.extend_pcr(20, b"tick")
                    assert len(client.get_random()) == 256
                assert client.attestation(user_data=b"w")[0] == 0x84
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    expected = ZERO
    for _ in range(rounds * workers):
        expected = extend_digest(expected, b"tick")
    assert nsm.describe_pcr(20).data == expected
    assert len(nsm.signer.issued) == workers


CHILD = textwrap.dedent("""
    import json, sys
    from enclavekit.sdk.nsm import NSMClient
    with NSMClient.open() as nsm:
        description = nsm.describe_nsm()
        value = nsm.extend_pcr(int(sys.argv[1]), b"from a process")
        document = nsm.attestation(nonce=b"child")
    print(json.dumps({"module_id": description.module_id, "pcr": value.hex(), "doc_len": len(document)}))
""")


def test_processes_find_the_nsm_through_the_environment(served: tuple[FakeNSM, Path]) -> None:
    nsm, path = served
    env = {**os.environ, "ENCLAVEKIT_NSM_SOCKET": str(path)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(index)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for index in (21, 22, 23)]
    for index, child in zip((21, 22, 23), children, strict=True):
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        result = json.loads(out)
        assert result["module_id"] == nsm.module_id
        assert result["pcr"] == extend_digest(ZERO, b"from a process").hex()
        assert nsm.describe_pcr(index).data.hex() == result["pcr"]
        assert result["doc_len"] > 0


def test_no_nsm_in_a_process_without_socket_or_device(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ENCLAVEKIT_NSM_SOCKET"}
    code = ("from enclavekit.sdk.nsm import NSMClient\n"
            f"NSMClient.open(device={str(tmp_path / 'nsm')!r})\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "NSMTransportError" in result.stderr


def test_server_shutdown_with_connected_clients(tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    server = NSMServer(FakeNSM(), path)
    server.start()
    clients = [NSMClient(SocketTransport(path, timeout=10)) for _ in range(3)]
    for client in clients:
        client.get_random()
    server.close()  # must return although clients are still connected
    assert not path.exists()
    for client in clients:
        client.close()
