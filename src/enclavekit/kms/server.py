"""``kms serve`` wiring: configuration, trust roots, key store, service, audit trail, HTTP server, workers, TLS.

One process (``workers=1``) serves in place.  With ``workers=N`` the parent binds the listening socket, creates the
audit trail's state directory once, then forks N workers that each open their own store, service and
:class:`~enclavekit.audit.trail.Trail` on that directory and accept on the shared socket (pre-fork).  SQLite in
WAL mode, the trail spool's ``flock`` (every worker appends, group commit) and the trail's ``deliver.lock`` (one
worker delivers log files and digests) make that safe.  The parent prints the endpoint once every worker is
ready, forwards SIGTERM/SIGINT, and exits when they have.

Audit trail (docs/audit.md): ``<data-dir>/audit`` holds the trail's state (spool, delivery state, keys) and, for
a local trail, the ``AWSLogs/`` tree; ``trail="s3://bucket/prefix"`` delivers to S3 instead.  The old
hash-chained ``audit/events.jsonl`` is no longer written: the spool is the durable path, the signed digests the
tamper evidence.  A file left by an older version stays untouched (history is never rewritten).

Stopping (SIGTERM, SIGINT): the accept loop stops, requests in flight finish (up to ``drain_seconds``), the trail
is sealed (everything spooled is delivered and covered by a final digest) and closed, then the store.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import select
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclavekit.attestation.pki import LocalPKI
from enclavekit.attestation.verifier import AWS_ROOT_G1, TrustRoot
from enclavekit.audit.s3 import S3Destination, parse_s3_url
from enclavekit.audit.trail import Destination, Trail, TrailConfig
from enclavekit.errors import ConfigError, EnclaveKitError, FileOperationError
from enclavekit.kms.auditlog import AuditSink, UnsafeDiscardSink
from enclavekit.kms.http import KMSApp, KMSHTTPServer, KMSServiceLike
from enclavekit.kms.service import KMSService
from enclavekit.kms.store import KeyStore, PostgresStore, SQLiteStore
from enclavekit.kms.types import Principal

__all__ = [
    "ServerConfig",
    "open_trail",
    "trail_state_dir",
    "bind_socket",
    "create_credentials",
    "local_tls_context",
    "serve",
]

_DRAIN_SECONDS = 10.0
_CACHE_SECONDS = 30.0


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    database_url: str | None = None
    workers: int = 1
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_local_ca: bool = False
    trust_aws_root: bool = False
    extra_roots: tuple[Path, ...] = ()
    max_attestation_age: float | None = None
    single_use_nonces: bool = False
    require_signed_target: bool = False      # SigV4 must cover X-Amz-Target (see docs/kms.md)
    account_id: str = "111122223333"
    region: str = "us-east-1"
    drain_seconds: float = _DRAIN_SECONDS
    trail: str | None = None                 # a directory or s3://bucket/prefix; None: <data-dir>/audit
    digest_interval: float = 3600.0          # CloudTrail's hour
    trail_name: str = "enclavekit"           # digest names carry it: several trails may share one prefix
    audit_endpoint_url: str | None = None    # S3-compatible store for an s3:// trail
    unsafe_no_audit: bool = False            # benchmarks only: records are dropped, nothing is audited

    def __post_init__(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"--port must be 0..65535, not {self.port}")
        if not (1 <= self.workers <= 64):
            raise ConfigError(f"--workers must be 1..64, not {self.workers}")
        if not (len(self.account_id) == 12 and self.account_id.isdigit()):
            raise ConfigError("--account-id must be 12 digits")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_local_ca and self.tls_cert is not None:
            raise ConfigError("--tls (local CA) and --tls-cert/--tls-key exclude each other")
        if self.max_attestation_age is not None and self.max_attestation_age <= 0:
            raise ConfigError("--max-attestation-age must be a positive number of seconds")
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("--database-url must be a postgresql:// URL")
        if not self.digest_interval > 0:
            raise ConfigError("--digest-interval must be a positive number of seconds")
        if self.trail is not None and self.trail.startswith("s3://"):
            try:
                parse_s3_url(self.trail)
            except ValueError as exc:
                raise ConfigError(f"--trail: {exc}") from None
        elif self.audit_endpoint_url is not None:
            raise ConfigError("--audit-endpoint-url goes with --trail s3://bucket/prefix")
        if self.unsafe_no_audit and self.trail is not None:
            raise ConfigError("--unsafe-no-audit and --trail exclude each other")

    @property
    def tls(self) -> bool:
        return self.tls_local_ca or self.tls_cert is not None


# --------------------------------------------------------------------------------------------- audit trail


def trail_state_dir(config: ServerConfig) -> Path:
    """The trail's state directory: ``--trail DIR``, else ``<data-dir>/audit`` (also for an s3:// trail)."""
    if config.trail is not None and not config.trail.startswith("s3://"):
        return Path(config.trail)
    return config.data_dir / "audit"


def open_trail(config: ServerConfig, *, deliver: bool = True) -> Trail:
    """The configured trail (each worker opens its own on the same state directory)."""
    destination: Destination | None = None
    url = "local"
    prefix = ""
    if config.trail is not None and config.trail.startswith("s3://"):
        bucket, prefix = parse_s3_url(config.trail)
        destination = S3Destination(bucket, endpoint_url=config.audit_endpoint_url, region=config.region)
        url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    try:
        trail_config = TrailConfig(account_id=config.account_id, region=config.region, prefix=prefix,
                                   digest_interval=config.digest_interval, trail_name=config.trail_name)
    except ValueError as exc:
        raise ConfigError(f"cannot configure the audit trail: {exc}") from exc
    return Trail(trail_state_dir(config), config=trail_config, destination=destination, destination_url=url,
                 deliver=deliver)


def _open_audit(config: ServerConfig) -> AuditSink:
    if config.unsafe_no_audit:
        return UnsafeDiscardSink()
    return open_trail(config)


def _prepare_audit(config: ServerConfig) -> None:
    """Before forking: create the trail's state once, so that workers do not race to create ``trail.json``."""
    if config.unsafe_no_audit:
        print("kms: WARNING: --unsafe-no-audit: requests are NOT audited (for benchmarks only)", file=sys.stderr,
              flush=True)
        return
    legacy = trail_state_dir(config) / "events.jsonl"
    if legacy.exists():
        print(f"kms: {legacy} (the hash-chained log of earlier versions) is no longer written; it is kept as is, "
              "new records go to the trail", file=sys.stderr, flush=True)
    open_trail(config, deliver=False).close(seal=False)


# --------------------------------------------------------------------------------------------- store, service


def _open_store(config: ServerConfig) -> KeyStore:
    if config.database_url is not None:
        # the root key: ENCLAVEKIT_KMS_ROOT_KEY, else root.key in the data directory (all servers need the same)
        return PostgresStore(config.database_url, data_dir=config.data_dir, account_id=config.account_id)
    return SQLiteStore(config.data_dir, account_id=config.account_id)


def _trust_roots(config: ServerConfig) -> list[Any]:
    pki = LocalPKI.open(now=datetime.now(UTC))
    roots: list[Any] = [TrustRoot.from_certificate(pki.root.certificate, name="enclavekit local root")]
    for path in config.extra_roots:
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--root {path}: no readable PEM certificate ({type(exc).__name__})") from exc
        roots += [TrustRoot.from_certificate(c, name=str(path)) for c in certs]
    if config.trust_aws_root:
        roots.append(AWS_ROOT_G1)
    return roots


def _make_service(config: ServerConfig, store: KeyStore) -> KMSServiceLike:
    service: KMSServiceLike = KMSService(
        store, account_id=config.account_id, region=config.region, trust_roots=_trust_roots(config),
        max_attestation_age=(None if config.max_attestation_age is None
                             else timedelta(seconds=config.max_attestation_age)),
        single_use_nonces=config.single_use_nonces)
    return service


class _CachedLookup:
    """Principal lookups cached for a short while (credentials cannot be changed through the API)."""

    def __init__(self, store: KeyStore, seconds: float = _CACHE_SECONDS) -> None:
        self._store = store
        self._seconds = seconds
        self._cache: dict[str, tuple[float, tuple[Principal, str]]] = {}
        self._lock = threading.Lock()

    def __call__(self, access_key_id: str) -> tuple[Principal, str] | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(access_key_id)
        if hit is not None and now - hit[0] < self._seconds:
            return hit[1]
        found = self._store.lookup_principal(access_key_id)
        if found is None:
            return None
        principal, secret = found
        with self._lock:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[access_key_id] = (now, (principal, secret))
        return principal, secret


def create_credentials(config: ServerConfig, name: str) -> dict[str, str]:
    """A new principal of the configured account: ``{"AccessKeyId", "SecretAccessKey", "Arn"}``."""
    store = _open_store(config)
    try:
        principal, secret = store.create_principal(name)
    finally:
        store.close()
    return {"AccessKeyId": principal.access_key_id, "SecretAccessKey": secret, "Arn": principal.arn}


# --------------------------------------------------------------------------------------------- sockets, TLS


def bind_socket(host: str, port: int, *, backlog: int = 256) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise ConfigError(f"--host must be an IP address, not {host!r}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        # pre-fork: every worker is woken for each connection and all but one find nothing to accept; a blocking
        # accept() would then hang that worker (and its shutdown) until the next connection
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def _endpoint(config: ServerConfig, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if config.tls else 'http'}://{shown}:{port}"


def local_tls_context(directory: Path, host: str, *, now: datetime | None = None) -> tuple[ssl.SSLContext, Path]:
    """TLS with a local CA kept in ``directory`` (created on first use); returns the context and the CA's PEM path.

    The server certificate names ``localhost``, 127.0.0.1, ::1 and ``host``; clients trust ``ca.pem``.
    """
    now = now or datetime.now(UTC)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_pem, ca_key_pem = directory / "ca.pem", directory / "ca.key"
    if not ca_pem.exists() or not ca_key_pem.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclavekit local KMS CA")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(ca_key_pem, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
        ca_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_key_pem} is not an EC private key")
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    try:
        ip = ipaddress.ip_address(host)
        if str(ip) not in ("127.0.0.1", "::1"):
            names.append(x509.IPAddress(ip))
    except ValueError:
        names.append(x509.DNSName(host))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclavekit kms")]))
            .issuer_name(ca_cert.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca_pem.read_bytes())
    _write_private(key_path, leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context, ca_pem


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _tls(config: ServerConfig) -> tuple[ssl.SSLContext | None, Path | None]:
    if config.tls_local_ca:
        return local_tls_context(config.data_dir / "tls", config.host)
    if config.tls_cert is not None and config.tls_key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load --tls-cert/--tls-key: {exc}") from exc
        return context, None
    return None, None


# --------------------------------------------------------------------------------------------- serving


class _Stopper:
    """A stop request from SIGTERM/SIGINT or from the caller's event.

    The signal handler only sets a flag and writes one byte to a pipe (no locks: a handler that called
    ``Event.set()`` could deadlock on the event's lock held by the interrupted code).
    """

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()
        self.signalled = False
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.signalled = True
        with contextlib.suppress(OSError):
            os.write(self._w, b"s")

    def is_set(self) -> bool:
        return self.signalled or self.event.is_set()

    def wait(self, timeout: float) -> bool:
        if not self.is_set():
            select.select([self._r], [], [], timeout)
        return self.is_set()

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _serve_worker(config: ServerConfig, sock: socket.socket, *, ssl_context: ssl.SSLContext | None,
                  stop: _Stopper, ready: Callable[[], None],
                  service_factory: Callable[[ServerConfig, Any], KMSServiceLike] | None = None) -> None:
    """Open store, service and audit trail; serve ``sock`` until ``stop`` is set; then drain and close."""
    store = _open_store(config)
    audit: AuditSink | None = None
    try:
        service = (service_factory or _make_service)(config, store)
        audit = _open_audit(config)
        app = KMSApp(service, _CachedLookup(store), audit, region=config.region, account_id=config.account_id,
                     require_signed_target=config.require_signed_target)
        server = KMSHTTPServer(app, sock, ssl_context=ssl_context, balance_accept=config.workers > 1)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="kms-accept", daemon=True)
        thread.start()
        ready()
        while not stop.wait(0.5):
            pass
        server.shutdown()
        thread.join()
        app.wait_idle(config.drain_seconds)
        server.server_close()
    finally:
        if audit is not None:
            audit.close()
        with contextlib.suppress(Exception):
            store.close()


def serve(config: ServerConfig, *, announce: Callable[[dict[str, str]], None],
          stop: threading.Event | None = None,
          service_factory: Callable[[ServerConfig, Any], KMSServiceLike] | None = None) -> int:
    """Run ``kms serve`` until SIGTERM/SIGINT (or ``stop``); ``announce`` gets ``{"Endpoint": ...}`` when ready."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _prepare_audit(config)
    ssl_context, ca_path = _tls(config)
    sock = bind_socket(config.host, config.port)
    info = {"Endpoint": _endpoint(config, sock)}
    if ca_path is not None:
        info["CABundle"] = str(ca_path)
    stopper = _Stopper(stop)
    try:
        if config.workers == 1:
            if threading.current_thread() is threading.main_thread():
                stopper.install()
            _serve_worker(config, sock, ssl_context=ssl_context, stop=stopper, ready=lambda: announce(info),
                          service_factory=service_factory)
            return 0
        return _serve_forked(config, sock, ssl_context=ssl_context, stop=stopper, ready=lambda: announce(info),
                             service_factory=service_factory)
    finally:
        sock.close()
        stopper.close()


def _serve_forked(config: ServerConfig, sock: socket.socket, *, ssl_context: ssl.SSLContext | None,
                  stop: _Stopper, ready: Callable[[], None],
                  service_factory: Callable[[ServerConfig, Any], KMSServiceLike] | None) -> int:
    children: dict[int, int] = {}
    read_fd, write_fd = os.pipe()
    for _ in range(config.workers):
        pid = os.fork()
        if pid == 0:  # worker
            os.close(read_fd)
            _die_with_parent()
            status = 0
            try:
                child_stop = _Stopper()
                child_stop.install()
                _serve_worker(config, sock, ssl_context=ssl_context, stop=child_stop,
                              ready=lambda: _signal_ready(write_fd), service_factory=service_factory)
            except EnclaveKitError as exc:
                print(exc.diagnostics(), file=sys.stderr)
                status = exc.exit_status
            except BaseException as exc:  # the worker must never return into the parent's code
                print(f"[ E00 ] kms worker failed: {type(exc).__name__}", file=sys.stderr)
                status = 1
            finally:
                sys.stderr.flush()
                os._exit(status)
        children[pid] = 0
    os.close(write_fd)
    stop.install()
    got = 0
    while got < config.workers:
        chunk = os.read(read_fd, config.workers - got)
        if not chunk:
            break  # a worker died before it was ready
        got += len(chunk)
    os.close(read_fd)
    if got < config.workers:
        _stop_children(children)
        raise FileOperationError("a kms worker failed to start (see the messages above)")
    ready()
    status = 0
    while children:
        if stop.is_set():
            _stop_children(children)
            break
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            stop.wait(0.2)
            continue
        children.pop(pid, None)
        code = os.waitstatus_to_exitcode(wstatus)
        if code != 0:
            status = 1
            break
    _stop_children(children)
    return status


def _die_with_parent() -> None:
    """Linux PR_SET_PDEATHSIG: a worker gets SIGTERM if the parent dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _signal_ready(fd: int) -> None:
    os.write(fd, b"r")


def _stop_children(children: dict[int, int], grace: float = _DRAIN_SECONDS + 10) -> None:
    """SIGTERM every worker, wait up to ``grace`` seconds for them, then SIGKILL whoever is left."""
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while children:
        for pid in list(children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                children.pop(pid, None)
        if not children:
            return
        if time.monotonic() > deadline:
            for pid in list(children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                children.pop(pid, None)
            return
        time.sleep(0.05)
