"""vsock addresses: ``(cid, port)`` pairs and the well-known CIDs.

Linux ``<linux/vm_sockets.h>``: CIDs and ports are unsigned 32-bit numbers; ``0xFFFFFFFF`` is the wildcard
(``VMADDR_CID_ANY`` / ``VMADDR_PORT_ANY``).  On Nitro the parent instance is always CID 3 and enclaves get
CIDs 4 … 2^32-2 (spec eif-pcr-cli §3.5).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "VMADDR_CID_ANY",
    "VMADDR_PORT_ANY",
    "VMADDR_CID_HYPERVISOR",
    "VMADDR_CID_LOCAL",
    "VMADDR_CID_HOST",
    "VMADDR_CID_PARENT",
    "MIN_ENCLAVE_CID",
    "MAX_ENCLAVE_CID",
    "MAX_PORT",
    "VsockAddress",
    "check_cid",
    "check_port",
    "is_enclave_cid",
]

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
# §3.5: the parent instance as seen from its enclaves (nitro-cli's VMADDR_CID_PARENT, vsock-proxy's VSOCK_PROXY_CID).
VMADDR_CID_PARENT = 3
MIN_ENCLAVE_CID = 4
MAX_ENCLAVE_CID = 0xFFFFFFFF - 1
MAX_PORT = 0xFFFFFFFF


def check_cid(cid: int) -> int:
    """``cid`` if it is an unsigned 32-bit integer; ``TypeError``/``ValueError`` otherwise (caller bug)."""
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise TypeError(f"vsock CID must be an int, got {type(cid).__name__}")
    if not 0 <= cid <= VMADDR_CID_ANY:
        raise ValueError(f"vsock CID must be in 0..{VMADDR_CID_ANY}, got {cid}")
    return cid


def check_port(port: int) -> int:
    """``port`` if it is an unsigned 32-bit integer; ``TypeError``/``ValueError`` otherwise (caller bug)."""
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"vsock port must be an int, got {type(port).__name__}")
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"vsock port must be in 0..{MAX_PORT}, got {port}")
    return port


def is_enclave_cid(cid: int) -> bool:
    """True for CIDs nitro-cli may give an enclave (4 … 2^32-2)."""
    return MIN_ENCLAVE_CID <= check_cid(cid) <= MAX_ENCLAVE_CID


@dataclass(frozen=True, order=True)
class VsockAddress:
    """A vsock endpoint ``(cid, port)``; both are validated as unsigned 32-bit integers."""

    cid: int
    port: int

    def __post_init__(self) -> None:
        check_cid(self.cid)
        check_port(self.port)

    def as_tuple(self) -> tuple[int, int]:
        """The ``(cid, port)`` tuple Python's ``socket`` module uses for ``AF_VSOCK``."""
        return (self.cid, self.port)

    def __str__(self) -> str:
        return f"{self.cid}:{self.port}"
