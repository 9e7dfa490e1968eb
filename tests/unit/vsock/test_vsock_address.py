import pytest

from enclavekit.vsock.address import (
    MAX_PORT,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_HYPERVISOR,
    VMADDR_CID_LOCAL,
    VMADDR_CID_PARENT,
    VsockAddress,
    is_enclave_cid,
)


def test_well_known_cids() -> None:
    assert (VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL, VMADDR_CID_HOST, VMADDR_CID_PARENT) == (0, 1, 2, 3)
    assert VMADDR_CID_ANY == 2**32 - 1


def test_address_round_trip_and_text() -> None:
    a = VsockAddress(16, 5000)
    assert a.as_tuple() == (16, 5000)
    assert str(a) == "16:5000"
    assert VsockAddress(VMADDR_CID_ANY, MAX_PORT).port == MAX_PORT


@pytest.mark.parametrize("cid", [-1, 2**32])
def test_cid_out_of_range(cid: int) -> None:
    with pytest.raises(ValueError, match="CID"):
        VsockAddress(cid, 1)


@pytest.mark.parametrize("port", [-1, 2**32])
def test_port_out_of_range(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        VsockAddress(3, port)


@pytest.mark.parametrize("value", ["3", 3.0, True, None])
def test_cid_and_port_must_be_int(value: object) -> None:
    with pytest.raises(TypeError):
        VsockAddress(value, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        VsockAddress(3, value)  # type: ignore[arg-type]


def test_enclave_cid_range() -> None:
    assert not is_enclave_cid(3)
    assert is_enclave_cid(4)
    assert is_enclave_cid(2**32 - 2)
    assert not is_enclave_cid(VMADDR_CID_ANY)
