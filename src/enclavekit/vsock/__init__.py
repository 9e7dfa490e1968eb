"""vsock channels: addresses, the CONNECT/OK handshake, transports (Unix-socket emulation, real AF_VSOCK), and
vsock-proxy.  Applications use :mod:`enclavekit.sdk.vsock`, which picks the transport."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from enclavekit.vsock.address import (
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_HYPERVISOR,
    VMADDR_CID_LOCAL,
    VMADDR_CID_PARENT,
    VMADDR_PORT_ANY,
    VsockAddress,
)

if TYPE_CHECKING:
    from enclavekit.vsock.transport import (
        AFVsockTransport,
        UnixVsockTransport,
        VsockConnection,
        VsockListener,
        VsockTransport,
    )

_FROM_TRANSPORT = ("AFVsockTransport", "UnixVsockTransport", "VsockConnection", "VsockListener", "VsockTransport")


def __getattr__(name: str) -> Any:
    # PEP 562: the transports (and asyncio behind them) load on first use, so that importing the handshake
    # (enclavekit.vsock.protocol, used by the sandbox's PID 1 for the boot heartbeat) stays cheap.
    if name in _FROM_TRANSPORT:
        from enclavekit.vsock import transport  # noqa: PLC0415

        return getattr(transport, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
