"""vsock channels: addresses, the CONNECT/OK handshake, transports (Unix-socket emulation, real AF_VSOCK), and
vsock-proxy.  Applications use :mod:`enclavekit.sdk.vsock`, which picks the transport."""

from __future__ import annotations

from enclavekit.vsock.address import (
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_HYPERVISOR,
    VMADDR_CID_LOCAL,
    VMADDR_CID_PARENT,
    VMADDR_PORT_ANY,
    VsockAddress,
)
from enclavekit.vsock.transport import (
    AFVsockTransport,
    UnixVsockTransport,
    VsockConnection,
    VsockListener,
    VsockTransport,
)

__all__ = [
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "VMADDR_CID_HYPERVISOR",
    "VMADDR_CID_LOCAL",
    "VMADDR_CID_PARENT",
    "VMADDR_PORT_ANY",
    "VsockAddress",
    "AFVsockTransport",
    "UnixVsockTransport",
    "VsockConnection",
    "VsockListener",
    "VsockTransport",
]
