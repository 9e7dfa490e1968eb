"""vsock for enclave (and parent) applications: the same calls on real Nitro and under enclavekit.

Which transport is used (:func:`select_transport`), first rule that applies:

1. ``ENCLAVEKIT_VSOCK_DIR`` is set (enclavekit's runtime sets it inside every enclave): the Unix-socket emulation
   rooted there, with this side's CID from ``ENCLAVEKIT_VSOCK_CID`` (default 3, the parent).
2. ``ENCLAVEKIT_REAL_VSOCK=1`` is set: real ``AF_VSOCK``; ``/dev/vsock`` must exist, else a TransportError.
3. Otherwise the emulation rooted at ``$ENCLAVEKIT_RUN_DIR/vsock`` (default ``/run/enclavekit/vsock``), CID as in 1.

Real vsock is therefore never chosen by guessing: on a development machine or CI (where ``/dev/vsock`` may exist
because the machine is itself a VM) the default is the emulation.  On a real Nitro instance, set
``ENCLAVEKIT_REAL_VSOCK=1`` in the parent's and the enclave image's environment; the application code is the same.

Every failure is a :class:`~enclavekit.errors.TransportError`: :class:`~enclavekit.errors.VsockConnectionRefused`
when nobody listens (at once, no retry loop), :class:`~enclavekit.errors.VsockTimeout` when the timeout passes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path

from enclavekit.errors import ConfigError, TransportError
from enclavekit.vsock.address import VMADDR_CID_PARENT, VMADDR_PORT_ANY, VsockAddress, check_cid
from enclavekit.vsock.transport import (
    DEFAULT_CONNECT_TIMEOUT,
    AFVsockTransport,
    AsyncVsockListener,
    UnixVsockTransport,
    VsockConnection,
    VsockListener,
    VsockTransport,
)

__all__ = [
    "ENV_VSOCK_DIR",
    "ENV_VSOCK_CID",
    "ENV_REAL_VSOCK",
    "ENV_RUN_DIR",
    "DEFAULT_RUN_DIR",
    "VMADDR_CID_PARENT",
    "VMADDR_PORT_ANY",
    "VsockAddress",
    "VsockConnection",
    "select_transport",
    "vsock_root",
    "connect",
    "listen",
    "async_connect",
    "async_listen",
]

ENV_VSOCK_DIR = "ENCLAVEKIT_VSOCK_DIR"
ENV_VSOCK_CID = "ENCLAVEKIT_VSOCK_CID"
ENV_REAL_VSOCK = "ENCLAVEKIT_REAL_VSOCK"
ENV_RUN_DIR = "ENCLAVEKIT_RUN_DIR"
DEFAULT_RUN_DIR = "/run/enclavekit"
_DEV_VSOCK = "/dev/vsock"


def vsock_root(env: Mapping[str, str] | None = None) -> Path:
    """The emulation's root directory for this environment (rules 1 and 3 of :func:`select_transport`)."""
    env = os.environ if env is None else env
    if env.get(ENV_VSOCK_DIR):
        return Path(env[ENV_VSOCK_DIR])
    return Path(env.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR) / "vsock"


def _local_cid(env: Mapping[str, str]) -> int:
    text = env.get(ENV_VSOCK_CID, "").strip()
    if not text:
        return VMADDR_CID_PARENT
    try:
        return check_cid(int(text, 10))
    except ValueError as exc:
        raise ConfigError(f"{ENV_VSOCK_CID} must be a CID (decimal 0..4294967294), got {text!r}") from exc


def select_transport(env: Mapping[str, str] | None = None, dev_vsock: str = _DEV_VSOCK) -> VsockTransport:
    """The transport for this process (see the module docstring for the rule)."""
    env = os.environ if env is None else env
    if env.get(ENV_VSOCK_DIR):
        return UnixVsockTransport(env[ENV_VSOCK_DIR], local_cid=_local_cid(env))
    if env.get(ENV_REAL_VSOCK) == "1":
        if not os.path.exists(dev_vsock):
            raise TransportError(f"{ENV_REAL_VSOCK}=1 but {dev_vsock} does not exist: this is not a Nitro instance "
                                 "or enclave", hint=f"unset {ENV_REAL_VSOCK} to use enclavekit's emulation")
        return AFVsockTransport()
    return UnixVsockTransport(vsock_root(env), local_cid=_local_cid(env))


def connect(cid: int, port: int, timeout: float = DEFAULT_CONNECT_TIMEOUT, *,
            transport: VsockTransport | None = None) -> VsockConnection:
    """Connect to ``(cid, port)`` (an enclave reaches the parent at CID 3); blocking, bounded by ``timeout``."""
    return (transport or select_transport()).connect(cid, port, timeout)


def listen(port: int, backlog: int = 128, *, transport: VsockTransport | None = None) -> VsockListener:
    """Listen on vsock ``port`` of this side; ``listener.accept(timeout)`` returns ``(connection, peer)``."""
    return (transport or select_transport()).listen(port, backlog)


async def async_connect(cid: int, port: int, timeout: float = DEFAULT_CONNECT_TIMEOUT, *,
                        transport: VsockTransport | None = None
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio :func:`connect`: the stream pair, as :func:`asyncio.open_connection` gives."""
    reader, writer, _ = await (transport or select_transport()).open_connection(cid, port, timeout)
    return reader, writer


async def async_listen(port: int, backlog: int = 128, *,
                       transport: VsockTransport | None = None) -> AsyncVsockListener:
    """asyncio :func:`listen`: ``await listener.accept(timeout)`` gives ``(reader, writer, peer)``."""
    return await (transport or select_transport()).start_listener(port, backlog)
