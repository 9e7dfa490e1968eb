"""``enclavekit vsock-proxy``: AWS's vsock-proxy with its flags and allow-list (spec eif-pcr-cli §4).

    enclavekit vsock-proxy [-4|-6] [-w N] [--config FILE] [--vsock-dir DIR] LOCAL_PORT REMOTE_ADDR REMOTE_PORT

Listens on vsock (CID 3, LOCAL_PORT) and forwards every connection to REMOTE_ADDR:REMOTE_PORT, which must be on
the allow-list of ``--config`` (default ``/etc/nitro_enclaves/vsock-proxy.yaml``, always applied).  The vsock side
is enclavekit's emulation rooted at ``--vsock-dir`` when given, else the transport chosen as
:func:`enclavekit.sdk.vsock.select_transport` does.  Runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from enclavekit.cli._args import bounded_int
from enclavekit.errors import ConfigError, FileOperationError
from enclavekit.sdk.vsock import select_transport
from enclavekit.vsock.address import MAX_PORT, VMADDR_CID_PARENT
from enclavekit.vsock.proxy import (
    DEFAULT_CONFIG,
    DEFAULT_WORKERS,
    Allowlist,
    IPFamily,
    SystemResolver,
    VsockProxy,
    check_allowlist,
)
from enclavekit.vsock.transport import UnixVsockTransport, VsockTransport

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "vsock-proxy",
        help="Forward enclave connections on vsock (CID 3, LOCAL_PORT) to one allowed TCP address.",
        description="Listen on vsock (CID 3, LOCAL_PORT) and forward each connection to REMOTE_ADDR:REMOTE_PORT, "
        "which must be on the allow-list (--config).",
    )
    family = p.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4", action="store_true", help="Use only IPv4 addresses of REMOTE_ADDR.")
    family.add_argument("-6", "--ipv6", action="store_true", help="Use only IPv6 addresses of REMOTE_ADDR.")
    p.add_argument("-w", "--num_workers", "--num-workers", dest="workers", default=str(DEFAULT_WORKERS),
                   metavar="N", help=f"Connections served at once (default {DEFAULT_WORKERS}); more wait.")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"Allow-list YAML (default {DEFAULT_CONFIG}).")
    p.add_argument("--vsock-dir", metavar="DIR", default=None,
                   help="Root of enclavekit's vsock emulation (default: ENCLAVEKIT_VSOCK_DIR or the run directory).")
    p.add_argument("local_port", metavar="LOCAL_PORT", help="vsock port to listen on (0..4294967295).")
    p.add_argument("remote_addr", metavar="REMOTE_ADDR", help="Host name or IP address to forward to.")
    p.add_argument("remote_port", metavar="REMOTE_PORT", help="TCP port to forward to (1..65535).")
    p.set_defaults(func=run)


def _transport(vsock_dir: str | None) -> VsockTransport:
    if vsock_dir is not None:
        return UnixVsockTransport(vsock_dir, local_cid=VMADDR_CID_PARENT)
    transport = select_transport()
    if isinstance(transport, UnixVsockTransport) and transport.is_enclave:
        raise ConfigError("vsock-proxy runs on the parent (CID 3), but ENCLAVEKIT_VSOCK_CID names an enclave")
    return transport


def run(args: argparse.Namespace) -> int:
    local_port = bounded_int("LOCAL_PORT", args.local_port, 0, MAX_PORT)
    remote_port = bounded_int("REMOTE_PORT", args.remote_port, 1, 65535)
    workers = bounded_int("--num_workers", args.workers, 1, 1024)
    family = IPFamily.V4 if args.ipv4 else IPFamily.V6 if args.ipv6 else IPFamily.ANY

    _configure_logging()
    # §4: the allow-list is always applied, and checked once before anything listens.
    path = Path(args.config)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise FileOperationError(f"Could not read the allow-list: File: '{path}', failing operation: 'Read'. "
                                 f"({exc.strerror or exc})") from exc
    allowlist = Allowlist.parse(text)
    destination = check_allowlist(allowlist, args.remote_addr, remote_port, SystemResolver(), family)

    listener = _transport(args.vsock_dir).listen(local_port)
    proxy = VsockProxy(listener, destination, workers=workers)

    def _stop(signum: int, frame: FrameType | None) -> None:
        proxy.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"vsock-proxy: listening on vsock {listener.address}, forwarding to {destination.address}:"
          f"{destination.port} ({destination.ip}) with {workers} workers", file=sys.stderr, flush=True)
    proxy.serve_forever()
    print(f"vsock-proxy: stopped after {proxy.stats.accepted} connections", file=sys.stderr, flush=True)
    return 0


def _configure_logging() -> None:
    root = logging.getLogger("enclavekit")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vsock-proxy: %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
