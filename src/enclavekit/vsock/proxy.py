"""vsock-proxy: forward enclave connections on (CID 3, port) to one remote TCP address, behind an allow-list.

Spec eif-pcr-cli §4.  The pieces are separate so that each can be tested alone (nitro-cli's own
``check_allowlist`` mixes file reading, parsing and DNS; STYLE.md names it as the counter-example):

* :meth:`Allowlist.parse` turns the YAML text into data (strict: only ``allowlist``, entries with a string
  ``address`` and an integer ``port``);
* :func:`check_allowlist` decides once, at startup, with an injected resolver (no DNS in tests);
* :class:`VsockProxy` accepts on any :class:`~enclavekit.vsock.transport.VsockListener` and copies bytes.

Differences from AWS's vsock-proxy 1.0.2, on purpose: a numeric ``remote_addr`` is used as is, never looked up
(aws-nitro-enclaves-cli#716); a remote that cannot be reached closes the enclave's connection instead of panicking
a worker; both directions are half-closed independently (``shutdown(SHUT_WR)``) so no byte in flight is lost.
The destination is resolved once at startup: the stdlib resolver does not report TTLs (AWS re-resolves after the
TTL expires); restart the proxy to pick up a new address.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import queue
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from enclavekit.errors import AllowlistError, VsockTimeout
from enclavekit.vsock.transport import VsockConnection, VsockListener

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_WORKERS",
    "VSOCK_PROXY_PORT",
    "NOT_ALLOWED_MESSAGE",
    "IPFamily",
    "AllowlistEntry",
    "Allowlist",
    "Destination",
    "Resolver",
    "SystemResolver",
    "DictResolver",
    "resolve_first",
    "check_allowlist",
    "ProxyStats",
    "VsockProxy",
]

log = logging.getLogger("enclavekit.vsock.proxy")

DEFAULT_CONFIG = "/etc/nitro_enclaves/vsock-proxy.yaml"
DEFAULT_WORKERS = 4
VSOCK_PROXY_PORT = 8000
# §4: the message vsock-proxy exits with when the destination is not on the list.
NOT_ALLOWED_MESSAGE = "Error at checking the allowlist: The given address and port are not allowed"
_MAX_CONFIG_BYTES = 1 << 20
_MAX_ENTRIES = 10_000
_MAX_ADDRESS_LENGTH = 253  # a DNS name's maximum length in text form
_CHUNK = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class IPFamily(enum.Enum):
    """``-4`` / ``-6`` / neither (mixed)."""

    ANY = "any"
    V4 = "ipv4"
    V6 = "ipv6"

    def accepts(self, ip: IPAddress) -> bool:
        return self is IPFamily.ANY or (ip.version == 4) == (self is IPFamily.V4)


# ---------------------------------------------------------------------------------------------- allow-list


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise AllowlistError(f"duplicate key {key!r} in the allow-list", rule="duplicate-key")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass(frozen=True)
class AllowlistEntry:
    address: str
    port: int


@dataclass(frozen=True)
class Allowlist:
    """The parsed ``allowlist: [{address, port}, …]`` file."""

    entries: tuple[AllowlistEntry, ...]

    @classmethod
    def parse(cls, text: str | bytes) -> Allowlist:
        """Parse the YAML text strictly; :class:`AllowlistError` names the rule that failed."""
        if len(text) > _MAX_CONFIG_BYTES:
            raise AllowlistError(f"allow-list file is larger than {_MAX_CONFIG_BYTES} bytes", rule="size")
        try:
            document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise AllowlistError(f"allow-list is not valid YAML: {exc}", rule="yaml") from exc
        if not isinstance(document, dict):
            raise AllowlistError("allow-list must be a mapping with the key 'allowlist'", rule="top-level")
        if "allowlist" not in document:
            raise AllowlistError("allow-list has no 'allowlist' key", rule="missing-key")
        unknown = sorted(str(k) for k in document if k != "allowlist")
        if unknown:
            raise AllowlistError(f"unknown key(s) in the allow-list: {', '.join(unknown)}", rule="unknown-key")
        items = document["allowlist"]
        if not isinstance(items, list):
            raise AllowlistError("'allowlist' must be a list of {address, port}", rule="not-a-list")
        if len(items) > _MAX_ENTRIES:
            raise AllowlistError(f"more than {_MAX_ENTRIES} allow-list entries", rule="size")
        return cls(tuple(_entry(i, item) for i, item in enumerate(items)))


def _entry(index: int, item: object) -> AllowlistEntry:
    where = f"allowlist entry {index}"
    if not isinstance(item, dict):
        raise AllowlistError(f"{where} must be a mapping {{address, port}}", rule="entry-type")
    for key in ("address", "port"):
        if key not in item:
            raise AllowlistError(f"{where} has no '{key}'", rule="missing-field")
    unknown = sorted(str(k) for k in item if k not in ("address", "port"))
    if unknown:
        raise AllowlistError(f"{where} has unknown key(s): {', '.join(unknown)}", rule="unknown-key")
    address, port = item["address"], item["port"]
    if not isinstance(address, str) or not address.strip() or address != address.strip():
        raise AllowlistError(f"{where}: 'address' must be a non-empty string without spaces, "
                             f"got {type(address).__name__}", rule="address-type")
    if len(address) > _MAX_ADDRESS_LENGTH:
        raise AllowlistError(f"{where}: 'address' is longer than {_MAX_ADDRESS_LENGTH}", rule="address-type")
    if not isinstance(port, int) or isinstance(port, bool):
        raise AllowlistError(f"{where}: 'port' must be an integer, got {type(port).__name__}", rule="port-type")
    if not 1 <= port <= 65535:
        raise AllowlistError(f"{where}: 'port' must be in 1..65535, got {port}", rule="port-range")
    return AllowlistEntry(address, port)


# ---------------------------------------------------------------------------------------------- resolution

Resolver = Callable[[str], Sequence[str]]
"""``resolver(name)`` → the name's IP addresses as text, in the resolver's order; empty when it does not resolve."""


class SystemResolver:
    """The system's resolver (``getaddrinfo``: /etc/hosts, /etc/resolv.conf), names converted with IDNA first."""

    def __call__(self, name: str) -> list[str]:
        try:
            host = name.encode("idna").decode("ascii")
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (UnicodeError, OSError):
            return []
        seen: list[str] = []
        for info in infos:
            ip = str(info[4][0])
            if ip not in seen:
                seen.append(ip)
        return seen


class DictResolver:
    """A fixed table ``{name: [ip, …]}``; unknown names do not resolve.  For tests and air-gapped setups."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self._table = {k: list(v) for k, v in table.items()}
        self.queries: list[str] = []

    def __call__(self, name: str) -> list[str]:
        self.queries.append(name)
        return list(self._table.get(name, []))


def _literal(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _resolve_all(resolver: Resolver, name: str) -> list[IPAddress]:
    literal = _literal(name)
    if literal is not None:
        return [literal]  # a numeric address is never looked up (aws-nitro-enclaves-cli#716)
    out: list[IPAddress] = []
    for text in resolver(name):
        ip = _literal(text)
        if ip is not None:
            out.append(ip)
    return out


def resolve_first(resolver: Resolver, name: str, family: IPFamily = IPFamily.ANY) -> IPAddress | None:
    """§4 DNS: the first record of the accepted family, or None."""
    for ip in _resolve_all(resolver, name):
        if family.accepts(ip):
            return ip
    return None


@dataclass(frozen=True)
class Destination:
    """The one remote the proxy forwards to, as approved at startup."""

    address: str
    port: int
    ip: IPAddress

    @property
    def socket_family(self) -> int:
        return socket.AF_INET if self.ip.version == 4 else socket.AF_INET6


def check_allowlist(allowlist: Allowlist, remote_addr: str, remote_port: int, resolver: Resolver,
                    family: IPFamily = IPFamily.ANY) -> Destination:
    """§4 matching, done once at startup; raises :class:`AllowlistError` when the destination is not allowed."""
    if not 1 <= remote_port <= 65535:
        raise ValueError(f"remote_port must be in 1..65535, got {remote_port}")
    remote_ip = resolve_first(resolver, remote_addr, family)
    if remote_ip is None:
        raise AllowlistError(f"{NOT_ALLOWED_MESSAGE} (no accepted IP was found for {remote_addr})",
                             rule="remote-unresolved")
    for entry in allowlist.entries:
        if entry.port != remote_port:
            continue
        # §4: the exact string first, then any IP of the listed name equal to the remote's resolved IP.
        if entry.address == remote_addr:
            return Destination(remote_addr, remote_port, remote_ip)
        ips = _resolve_all(resolver, entry.address)
        if not ips:
            log.warning("Unable to resolve allow listed host: %s", entry.address)
            continue
        if remote_ip in ips:
            return Destination(remote_addr, remote_port, remote_ip)
    raise AllowlistError(NOT_ALLOWED_MESSAGE, rule="not-allowed",
                         details={"destination": f"{remote_addr}:{remote_port}"})


# ---------------------------------------------------------------------------------------------- the proxy


@dataclass
class ProxyStats:
    accepted: int = 0
    forwarded: int = 0
    remote_failures: int = 0
    bytes_to_remote: int = 0
    bytes_to_enclave: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)


ConnectRemote = Callable[[Destination, float], socket.socket]


def _connect_tcp(destination: Destination, timeout: float) -> socket.socket:
    sock = socket.socket(destination.socket_family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((str(destination.ip), destination.port))
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class VsockProxy:
    """Accept on ``listener``, forward each connection to ``destination`` with a pool of ``workers``.

    Connections beyond the worker count are accepted (their handshake completes) and wait in a queue for a free
    worker; they never fail for lack of one.
    """

    def __init__(self, listener: VsockListener, destination: Destination, workers: int = DEFAULT_WORKERS,
                 connect_timeout: float = 10.0, connect_remote: ConnectRemote = _connect_tcp) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.listener = listener
        self.destination = destination
        self.workers = workers
        self.connect_timeout = connect_timeout
        self._connect_remote = connect_remote
        self.stats = ProxyStats()
        self._pending: queue.Queue[VsockConnection | None] = queue.Queue()
        self._stop = threading.Event()
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle

    def start(self) -> None:
        """Start the accept loop and the workers in background threads."""
        if self._threads:
            raise RuntimeError("proxy already started")
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"vsock-proxy-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._accept_loop, name="vsock-proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (safe from a signal handler)."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Run until :meth:`stop` is called from another thread (or KeyboardInterrupt)."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut the connections in flight, and join the threads."""
        self._stop.set()
        with self._active_lock:
            for sock in list(self._active):
                _shutdown(sock, socket.SHUT_RDWR)
        for _ in range(self.workers):
            self._pending.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        self.listener.close()
        while True:
            try:
                conn = self._pending.get_nowait()
            except queue.Empty:
                break
            if conn is not None:
                conn.close()

    # ---- threads

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept(timeout=0.25)
            except VsockTimeout:
                continue
            except Exception as exc:
                if not self._stop.is_set():
                    log.error("vsock-proxy: accept failed: %s", exc)
                    self._stop.wait(0.1)
                continue
            self.stats.add("accepted")
            log.debug("vsock-proxy: accepted %s", peer)
            self._pending.put(conn)

    def _worker(self) -> None:
        while True:
            conn = self._pending.get()
            if conn is None:
                return
            try:
                self._forward(conn)
            except Exception as exc:  # a worker must survive anything one connection does
                log.error("vsock-proxy: connection failed: %s", exc)
            finally:
                conn.close()

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._active_lock:
            if add:
                self._active.add(sock)
            else:
                self._active.discard(sock)

    def _forward(self, conn: VsockConnection) -> None:
        if self._stop.is_set():
            return
        try:
            remote = self._connect_remote(self.destination, self.connect_timeout)
        except OSError as exc:
            # The remote is absent: close the enclave's side cleanly (it reads EOF), keep serving.
            self.stats.add("remote_failures")
            log.warning("vsock-proxy: could not connect to %s:%d: %s", self.destination.address,
                        self.destination.port, exc.strerror or exc)
            _shutdown(conn.socket, socket.SHUT_RDWR)
            return
        enclave = conn.socket
        self._track(enclave, True)
        self._track(remote, True)
        try:
            back = threading.Thread(target=self._copy, args=(remote, enclave, "bytes_to_enclave"), daemon=True)
            back.start()
            self._copy(enclave, remote, "bytes_to_remote")
            back.join()
            self.stats.add("forwarded")
        finally:
            self._track(enclave, False)
            self._track(remote, False)
            remote.close()

    def _copy(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        """Copy until EOF, then half-close ``dst``; on any error cut both sockets so the other copy ends too."""
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        total = 0
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    _shutdown(dst, socket.SHUT_WR)
                    return
                dst.sendall(view[:n])
                total += n
        except OSError:
            _shutdown(src, socket.SHUT_RDWR)
            _shutdown(dst, socket.SHUT_RDWR)
        finally:
            self.stats.add(counter, total)


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)
