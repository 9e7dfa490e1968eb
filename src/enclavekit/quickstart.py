"""``enclavekit quickstart``: enclavekit's whole purpose in one command (docs/user-guide.md).

Steps, each timed:

1. **build**: the example application ``examples/quickstart/main.py`` (a Python program using
   ``enclavekit.sdk``) becomes a root filesystem carrying this host's Python and the modules it imports
   (:mod:`enclavekit.runtime.pyroot`), then an EIF (``build-enclave``).  A *changed* image is built too: the same
   application with one line added, hence another PCR0.  Both EIFs are cached in ``<state>/quickstart/`` under a
   fingerprint of the application, enclavekit's sources and the Python version, so later runs skip this step.
   Each cache entry has a lock file (``<fingerprint>.lock``): a run holds it shared while it uses the entry and
   exclusive while it builds it; an entry is built in a temporary directory and renamed into place, and only
   entries unused for a day and not locked are evicted.
2. **kms**: ``kms serve`` on 127.0.0.1 (SQLite in a temporary data directory, audit trail in ``<data>/audit``,
   attestation trusted through a temporary local CA in a temporary state directory).
3. **proxy**: ``vsock-proxy`` forwarding vsock (3, 8000) to the KMS port, with an allow-list naming only it.
4. **key**: credentials (``kms create-credentials``), a key whose policy allows ``kms:Decrypt`` only with
   ``kms:RecipientAttestation:ImageSha384`` = the image's PCR0 (StringEqualsIgnoreCase), and a secret encrypted
   under it with boto3.  The first statement allows everything *but* kms:Decrypt and kms:ReEncrypt*.
4b. **parent**: the parent itself is denied too: Decrypt without ``Recipient`` and ReEncrypt to a key of its
   own (which would let it decrypt the copy) are both refused with AccessDeniedException.
5. **enclave**: ``run-enclave`` of the image; the application receives the credentials and ciphertext on vsock
   (3, 7200), attests, decrypts through the proxy and answers with its attestation facts and the secret's
   SHA-256.  The parent checks the hash against the secret it encrypted.
6. **denied**: the changed image makes the same call; KMS refuses with AccessDeniedException naming the
   statement and condition.
7. **audit**: the KMS is stopped (its trail writes a final signed digest) and ``audit validate`` checks the trail;
   the Decrypt events (one allowed; two denied: the parent's and the changed image's) and the denied ReEncrypt
   are counted.

Everything started is stopped by PID (enclaves with ``terminate-enclave --all`` in the private run directory),
and the temporary directories are removed, also on failure, SIGTERM and Ctrl-C (``--keep`` keeps the work
directory for inspection).  Progress goes to stderr; ``--json`` prints one JSON object on stdout, also on failure
(``{"Result": "FAILED", "FailedStep": ..., "Error": ...}``); the exit status is non-zero on any failure (130 for
Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]
from rich.console import Console
from rich.table import Table

from enclavekit import __version__
from enclavekit._internal import state
from enclavekit.errors import ConfigError, EnclaveKitError
from enclavekit.runtime.launch_server import stop_server
from enclavekit.runtime.pyroot import build_python_rootfs
from enclavekit.sdk import vsock
from enclavekit.vsock.transport import UnixVsockTransport

__all__ = [
    "QuickstartError",
    "Quickstart",
    "enclave_key_policy",
    "PLAINTEXT_ACTIONS",
    "find_example",
    "run_quickstart",
    "JOB_PORT",
    "PROXY_PORT",
]

JOB_PORT = 7200           # the example application fetches its job from the parent here
PROXY_PORT = 8000         # vsock-proxy, as kmstool's default --proxy-port
REGION = "us-east-1"
ENDPOINT = f"http://kms.{REGION}.amazonaws.com"   # Host and SigV4 name; plain HTTP over vsock-proxy, local only
ENCLAVE_MEMORY_MIB = 384
SECRET = b"enclavekit quickstart: this secret is released only to the measured image"
_CHANGE = "\n# a changed build: one more line, so another PCR0\n"
CACHE_MAX_AGE = 86400.0   # seconds: cached images unused this long (and not in use) are evicted
CACHE_MAX_ENTRIES = 3     # and beyond this many entries (~80 MiB each), the least recently used unlocked ones
KMS_START_TIMEOUT = 60.0  # seconds to wait for kms serve's {"Endpoint": ...} line


class QuickstartError(EnclaveKitError):
    """A quickstart step failed; the message names the step and what happened."""

    code = "E00"


# Every action that returns (or moves) a plaintext the key protects.  kms:ReEncryptFrom decrypts the blob under
# this key and re-encrypts it under a key the caller chooses, which the caller may then Decrypt freely: excluding
# only kms:Decrypt would hand the secret to the parent.  The GenerateDataKey* actions make new keys: no leak.
PLAINTEXT_ACTIONS = ("kms:Decrypt", "kms:ReEncrypt*")


def enclave_key_policy(principal_arn: str, pcr0: str) -> dict[str, Any]:
    """A key policy: ``principal_arn`` administers and encrypts; Decrypt only for an enclave whose PCR0 is ``pcr0``.

    The first statement allows everything except :data:`PLAINTEXT_ACTIONS` (Decrypt and ReEncryptFrom /
    ReEncryptTo); the second allows only kms:Decrypt, and only under the PCR0 condition, so the parent can neither
    decrypt nor re-encrypt the secret to a key of its own.  spec §4.5: ``kms:RecipientAttestation:ImageSha384``
    is PCR0 in lowercase hex; AWS recommends StringEqualsIgnoreCase.  Without a valid attestation document (no
    ``Recipient``) the key is absent and the condition fails.  Whoever may ``kms:PutKeyPolicy`` can still replace
    this policy: in production the key's administrator should not be the parent instance's role.
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "AdministerAndEncrypt", "Effect": "Allow", "Principal": {"AWS": principal_arn},
             "NotAction": list(PLAINTEXT_ACTIONS), "Resource": "*"},
            {"Sid": "DecryptOnlyInTheMeasuredEnclave", "Effect": "Allow", "Principal": {"AWS": principal_arn},
             "Action": "kms:Decrypt", "Resource": "*",
             "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": pcr0.lower()}}},
        ],
    }


def find_example(examples: Path | None = None) -> Path:
    """``examples/quickstart/main.py`` of the repository this package runs from (or under ``examples``)."""
    base = examples if examples is not None else Path(__file__).resolve().parents[2] / "examples"
    app = base / "quickstart" / "main.py"
    if not app.is_file():
        raise ConfigError(f"the example application {app} does not exist",
                          hint="Run from a checkout of the repository (pip install -e .), or pass --examples DIR.")
    return app


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("enclavekit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "enclavekit.cli.main"]


def _fingerprint(app: Path) -> str:
    """What the cached EIFs depend on: the application, enclavekit's code, the Python that runs it."""
    h = hashlib.sha256()
    h.update(f"{__version__}\0{sys.version}\0{os.path.realpath(sys.executable)}\0".encode())
    h.update(app.read_bytes())
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:32]


def _cached_images(entry: Path) -> dict[str, Any] | None:
    """The images recorded in ``entry/images.json`` if it is complete, else None."""
    try:
        cached: dict[str, Any] = json.loads((entry / "images.json").read_text())
        if all(Path(cached[k]["Path"]).is_file() for k in ("App", "Changed")):
            cached["Cached"] = True
            return cached
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _last_use(entry: Path) -> float:
    marker = entry / "images.json"
    try:
        return (marker if marker.exists() else entry).stat().st_mtime
    except OSError:
        return 0.0


def _evict(base: Path, *, keep: str, now: float, max_age: float = CACHE_MAX_AGE,
           max_entries: int = CACHE_MAX_ENTRIES) -> list[str]:
    """Remove cache entries other than ``keep`` that were last used more than ``max_age`` seconds before ``now``,
    or that are beyond the ``max_entries`` most recently used (``keep`` counts as one), and that no run holds
    (their lock is taken exclusively without waiting); returns the names removed."""
    removed: list[str] = []
    entries: list[Path] = []
    for path in sorted(base.iterdir()):
        if not path.is_dir() or path.name == keep:
            continue
        if path.name.startswith("."):
            # a staging directory: a crashed build's if old (a build takes minutes, not a day)
            with suppress(OSError):
                if now - path.stat().st_mtime > max_age:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
            continue
        entries.append(path)
    entries.sort(key=_last_use, reverse=True)
    for rank, path in enumerate(entries, start=2):  # rank 1 is ``keep``
        if rank <= max_entries and now - _last_use(path) <= max_age:
            continue
        try:
            with (base / f"{path.name}.lock").open("ab") as lock:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use or being built by another run
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        except OSError:
            continue
    return removed


@dataclass
class Step:
    name: str
    title: str
    seconds: float = 0.0
    detail: str = ""
    failed: bool = False


@dataclass
class Quickstart:
    """One run; :meth:`run` returns the summary dict, :meth:`cleanup` stops everything it started."""

    app: Path
    progress: Callable[[str], None]
    use_cache: bool = True
    keep: bool = False
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="enclavekit-quickstart-")))
    steps: list[Step] = field(default_factory=list)
    _kms: subprocess.Popen[bytes] | None = None
    _proxy: subprocess.Popen[bytes] | None = None
    _enclaves_started: bool = False
    _cache_lock: IO[bytes] | None = None
    _client: Any = None
    current: str = ""

    # ------------------------------------------------------------------------------------ plumbing

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def home(self) -> Path:
        return self.work / "home"

    @property
    def kms_data(self) -> Path:
        return self.work / "kms"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVEKIT_")}
        env.update(ENCLAVEKIT_RUN_DIR=str(self.run_dir), ENCLAVEKIT_HOME=str(self.home))
        return env

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([*_cli(), *args], env=self.env(), capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise QuickstartError(f"`enclavekit {args[0]}` did not finish within {timeout:.0f} s") from exc

    def cli_ok(self, *args: str, timeout: float = 180) -> str:
        proc = self.cli(*args, timeout=timeout)
        if proc.returncode != 0:
            raise QuickstartError(f"`enclavekit {' '.join(args[:2])}` failed (exit {proc.returncode}): "
                                  f"{proc.stderr.strip()[-1500:]}")
        return proc.stdout

    @contextmanager
    def step(self, name: str, title: str) -> Iterator[Step]:
        """Time one step; a failure prints its own line and any foreign exception becomes a QuickstartError."""
        current = Step(name, title)
        self.current = name
        start = time.monotonic()
        try:
            # inside the try: a signal arriving right after the title is printed still ends the step visibly
            self.progress(f"[bold]{title}[/bold] ...")
            yield current
        except BaseException as exc:
            current.failed = True
            current.seconds = round(time.monotonic() - start, 2)
            self.steps.append(current)
            how = "interrupted" if isinstance(exc, (KeyboardInterrupt, _Terminated)) else "failed"
            self.progress(f"  [red]{how}[/red] after {current.seconds:.1f} s" + (f": {exc}" if str(exc) else ""))
            if isinstance(exc, Exception) and not isinstance(exc, EnclaveKitError):
                raise QuickstartError(f"step '{name}' ({title}) failed: {type(exc).__name__}: {exc}") from exc
            raise
        current.seconds = round(time.monotonic() - start, 2)
        self.steps.append(current)
        detail = f": {current.detail}" if current.detail else ""
        self.progress(f"  [green]done[/green] in {current.seconds:.1f} s{detail}")

    # --------------------------------------------------------------------------------------- steps

    def prepare(self) -> None:
        if os.geteuid() != 0:
            raise QuickstartError("the quickstart runs enclaves, which needs root (namespaces, cgroups, mounts)",
                                  hint="Run it as root, e.g. `sudo .venv/bin/enclavekit quickstart`.")
        online = sorted(os.sched_getaffinity(0))
        if len(online) < 2:
            raise QuickstartError("enclaves need a CPU of their own: this machine has one CPU",
                                  hint="Use a machine (or VM) with at least two CPUs.")
        self.home.mkdir(mode=0o700)
        # the parent keeps the other CPUs; the enclaves of this run share the last one, one after the other
        (self.home / "allocator.yaml").write_text(f"---\nmemory_mib: 2048\ncpu_pool: {online[-1]}\n"
                                                  "cpu_sharing: true\n")
        (self.run_dir / "vsock" / "3").mkdir(parents=True)

    def build(self) -> dict[str, Any]:
        """Step 1: the EIFs of the application and of the changed application (cached, see the module doc)."""
        base = state.state_home() / "quickstart"
        base.mkdir(parents=True, exist_ok=True)
        fingerprint = _fingerprint(self.app)
        entry = base / fingerprint
        # held shared until cleanup: the entry is in use, no other run may replace or evict it
        lock = (base / f"{fingerprint}.lock").open("ab")
        self._cache_lock = lock
        fcntl.flock(lock.fileno(), fcntl.LOCK_SH)
        images = _cached_images(entry) if self.use_cache else None
        if images is None:
            # one build of an entry at a time: a concurrent run waits here, then finds the entry built
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.progress(f"  waiting for another quickstart using or building {entry} ...")
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            images = _cached_images(entry) if self.use_cache else None
            if images is None:
                images = self._build_entry(entry)
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH)
        with suppress(OSError):
            os.utime(entry / "images.json")  # last use, for eviction
        _evict(base, keep=fingerprint, now=time.time())
        return images

    def _build_entry(self, entry: Path) -> dict[str, Any]:
        """Build both EIFs into a temporary directory beside ``entry``, then rename it into place (exclusive lock
        held by the caller)."""
        build = self.work / "build"
        root = build / "rootfs"
        app = build / "main.py"
        build.mkdir()
        shutil.copyfile(self.app, app)
        build_python_rootfs(root, scripts=[app])
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            out: dict[str, Any] = {}
            for name, file in (("App", "quickstart.eif"), ("Changed", "quickstart-changed.eif")):
                if name == "Changed":
                    target = root / "app" / "main.py"
                    target.write_text(target.read_text() + _CHANGE)
                result = json.loads(self.cli_ok("build-enclave", "--docker-uri", f"dir:{root}", "--output-file",
                                                str(staging / file), "--name", "quickstart", "--cmd",
                                                json.dumps(["/usr/bin/python3", "/app/main.py"])))
                out[name] = {"Path": str(entry / file), "Measurements": result["Measurements"]}
            (staging / "images.json").write_text(json.dumps(out, indent=2))
            if entry.exists():
                shutil.rmtree(entry)  # incomplete or --no-cache: nobody else holds the lock
            os.rename(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(build, ignore_errors=True)
        out["Cached"] = False
        return out

    def start_kms(self) -> str:
        """Step 2: ``kms serve``; returns its endpoint URL."""
        self.kms_data.mkdir()
        log = (self.work / "kms.stderr").open("w")
        kms = subprocess.Popen([*_cli(), "kms", "serve", "--port", "0", "--data-dir", str(self.kms_data)],
                               stdout=subprocess.PIPE, stderr=log, bufsize=0, env=self.env())
        self._kms = kms
        log.close()
        assert kms.stdout is not None
        line = _read_line(kms.stdout, KMS_START_TIMEOUT)
        if line is None:
            raise QuickstartError(f"kms serve did not print its endpoint within {KMS_START_TIMEOUT:.0f} s: "
                                  f"{(self.work / 'kms.stderr').read_text()[-1500:]}")
        if not line:
            with suppress(subprocess.TimeoutExpired):
                kms.wait(10)
            raise QuickstartError(f"kms serve did not start: {(self.work / 'kms.stderr').read_text()[-1500:]}")
        try:
            endpoint: str = json.loads(line)["Endpoint"]
        except (ValueError, KeyError, TypeError) as exc:
            raise QuickstartError(f"kms serve printed {line[:200]!r}, not its endpoint") from exc
        return endpoint

    def start_proxy(self, kms_port: int) -> None:
        """Step 3: vsock-proxy (3, 8000) -> 127.0.0.1:<kms port>, allow-listed."""
        allow = self.work / "vsock-proxy.yaml"
        allow.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {kms_port}}}\n")
        log = (self.work / "proxy.stderr").open("w")
        self._proxy = subprocess.Popen([*_cli(), "vsock-proxy", "--config", str(allow), "--vsock-dir",
                                        str(self.run_dir / "vsock"), str(PROXY_PORT), "127.0.0.1", str(kms_port)],
                                       stdout=subprocess.DEVNULL, stderr=log, env=self.env())
        log.close()
        listener = self.run_dir / "vsock" / "3" / f"{PROXY_PORT}.sock"
        deadline = time.monotonic() + 30
        while not listener.exists():
            if self._proxy.poll() is not None or time.monotonic() > deadline:
                raise QuickstartError(f"vsock-proxy did not start: {(self.work / 'proxy.stderr').read_text()[-800:]}")
            time.sleep(0.05)

    def create_key(self, endpoint: str, pcr0: str) -> dict[str, Any]:
        """Step 4: credentials, the PCR0-bound key, and the secret encrypted under it."""
        creds = json.loads(self.cli_ok("kms", "create-credentials", "--name", "quickstart-parent", "--data-dir",
                                       str(self.kms_data)))
        client = boto3.client("kms", endpoint_url=endpoint, region_name=REGION,
                              aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                              config=Config(retries={"max_attempts": 0}))
        policy = enclave_key_policy(creds["Arn"], pcr0)
        key = client.create_key(Policy=json.dumps(policy), Description="enclavekit quickstart")["KeyMetadata"]
        blob = client.encrypt(KeyId=key["KeyId"], Plaintext=SECRET,
                              EncryptionContext={"app": "quickstart"})["CiphertextBlob"]
        self._client = client
        return {"Credentials": creds, "KeyId": key["KeyId"], "KeyArn": key["Arn"], "Ciphertext": blob,
                "Policy": policy}

    def parent_denied(self, key: dict[str, Any]) -> dict[str, str]:
        """Step 4b: the parent's own Decrypt (no Recipient) and ReEncrypt to a key of its own must be refused."""
        client = self._client
        own = client.create_key(Description="enclavekit quickstart: a key of the parent's own")["KeyMetadata"]
        context = {"app": "quickstart"}
        attempts: dict[str, Callable[[], Any]] = {
            "Decrypt": lambda: client.decrypt(CiphertextBlob=key["Ciphertext"], EncryptionContext=context),
            "ReEncrypt": lambda: client.re_encrypt(CiphertextBlob=key["Ciphertext"], SourceEncryptionContext=context,
                                                   DestinationKeyId=own["KeyId"]),
        }
        refused: dict[str, str] = {}
        for operation, attempt in attempts.items():
            try:
                attempt()
            except ClientError as exc:
                error = exc.response.get("Error", {})
                if error.get("Code") != "AccessDeniedException":
                    raise QuickstartError(f"the parent's {operation} failed with {error.get('Code')}, not "
                                          f"AccessDeniedException: {error.get('Message')}") from exc
                refused[operation] = f"AccessDeniedException: {error.get('Message', '')}"
                continue
            except BotoCoreError as exc:
                raise QuickstartError(f"the parent's {operation} request failed: {exc}") from exc
            raise QuickstartError(f"the parent's own {operation} succeeded: the key policy releases the secret "
                                  "outside the measured enclave")
        return refused

    def run_enclave(self, eif: str, job: dict[str, Any]) -> dict[str, Any]:
        """Steps 5 and 6: start ``eif``, hand its application the job on (3, 7200), collect the answer."""
        transport = UnixVsockTransport(self.run_dir / "vsock", local_cid=3)
        listener = vsock.listen(JOB_PORT, transport=transport)
        try:
            self._enclaves_started = True
            info = json.loads(self.cli_ok("run-enclave", "--eif-path", eif, "--cpu-count", "1", "--memory",
                                          str(ENCLAVE_MEMORY_MIB)))
            enclave_id = info["EnclaveID"]
            console = self.run_dir / enclave_id / "console.log"
            try:
                try:
                    conn, _ = listener.accept(timeout=90)
                except EnclaveKitError as exc:
                    raise QuickstartError(f"the enclave never asked for its job: {exc}; console: "
                                          f"{_tail(console)}") from exc
                with conn:
                    conn.settimeout(120)
                    payload = json.dumps(job).encode()
                    conn.sendall(len(payload).to_bytes(4, "big") + payload)
                    data = b""
                    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            raise QuickstartError(f"the enclave closed the connection; console: {_tail(console)}")
                        data += chunk
            except TimeoutError as exc:
                raise QuickstartError(f"the enclave did not answer in time; console: {_tail(console)}") from exc
            finally:
                self.cli("terminate-enclave", "--enclave-id", enclave_id)
        finally:
            listener.close()
        answer: dict[str, Any] = json.loads(data[4:])
        answer["EnclaveID"] = enclave_id
        answer["EnclaveCID"] = info["EnclaveCID"]
        return answer

    def stop_kms(self) -> None:
        if self._kms is not None:
            _stop(self._kms)
            if self._kms.stdout is not None:
                with suppress(OSError):
                    self._kms.stdout.close()
            self._kms = None

    def audit(self) -> dict[str, Any]:
        """Step 7: validate the trail the KMS wrote, and count its Decrypt events."""
        trail = self.kms_data / "audit"
        # pin the trail's public key, exported to a file outside the trail directory (docs/audit.md)
        pem = self.kms_data / "audit-public-key.pem"
        pem.write_text(self.cli_ok("audit", "public-key", "--trail", str(trail)))
        validate = self.cli("audit", "validate", "--trail", str(trail), "--public-key", str(pem))
        if validate.returncode != 0:
            raise QuickstartError(f"the audit trail did not validate (exit {validate.returncode}): "
                                  f"{(validate.stdout + validate.stderr).strip()[-1500:]}")
        events = json.loads(self.cli_ok("audit", "events", "--trail", str(trail), "--event-name", "Decrypt",
                                        "--json", "--public-key", str(pem)))
        allowed = [e for e in events if not e.get("errorCode")]
        denied = [e for e in events if e.get("errorCode")]
        reencrypt = json.loads(self.cli_ok("audit", "events", "--trail", str(trail), "--event-name", "ReEncrypt",
                                           "--json", "--public-key", str(pem)))
        return {"Trail": str(trail), "Valid": True, "Report": validate.stdout.strip().splitlines()[-3:],
                "DecryptEvents": len(events), "Allowed": len(allowed), "Denied": len(denied),
                "DeniedErrorCodes": sorted({str(e.get("errorCode")) for e in denied}),
                "ReEncryptEvents": len(reencrypt),
                "ReEncryptDenied": sum(1 for e in reencrypt if e.get("errorCode"))}

    def cleanup(self) -> list[str]:
        """Stop what this run started (by PID), terminate its enclaves, release the image cache entry, remove the
        temporary directories.  Every part runs even if another fails; returns the failures' descriptions."""
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], Any]) -> None:
            try:
                action()
            except Exception as exc:  # clean-up goes on; the failure is reported
                problems.append(f"{what}: {type(exc).__name__}: {exc}")

        if self._enclaves_started and self.run_dir.exists():
            attempt("terminate-enclave --all", lambda: self.cli("terminate-enclave", "--all", timeout=120))
            attempt("launch server", lambda: stop_server(self.run_dir))  # the one the first run-enclave started
        if self._proxy is not None:
            proxy, self._proxy = self._proxy, None
            attempt("vsock-proxy", lambda: _stop(proxy))
        attempt("kms serve", self.stop_kms)
        if self._cache_lock is not None:
            lock, self._cache_lock = self._cache_lock, None
            attempt("image cache lock", lock.close)
        if not self.keep:
            attempt("work directory", lambda: shutil.rmtree(self.work))
        return problems

    # ----------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        summary: dict[str, Any] = {"Result": "FAILED", "WorkDirectory": str(self.work)}
        with self.step("prepare", "Checking the machine"):
            self.prepare()
        with self.step("build", "Building the example enclave image and a changed one (EIF)") as s:
            images = self.build()
            app, changed = images["App"]["Measurements"], images["Changed"]["Measurements"]
            if app["PCR0"] == changed["PCR0"]:
                raise QuickstartError("the changed image has the same PCR0 as the original")
            s.detail = ("cached" if images["Cached"] else "built") + f"; PCR0 {app['PCR0'][:16]}..."
        summary["Image"] = {"Path": images["App"]["Path"], "PCR0": app["PCR0"], "PCR1": app["PCR1"],
                            "PCR2": app["PCR2"], "Cached": images["Cached"]}
        summary["ChangedImage"] = {"Path": images["Changed"]["Path"], "PCR0": changed["PCR0"]}
        with self.step("kms", "Starting the KMS (SQLite, local CA, audit trail)") as s:
            endpoint = self.start_kms()
            s.detail = endpoint
        with self.step("proxy", f"Starting vsock-proxy (vsock port {PROXY_PORT} -> the KMS)") as s:
            self.start_proxy(int(endpoint.rsplit(":", 1)[1]))
            s.detail = f"allow-list: 127.0.0.1:{endpoint.rsplit(':', 1)[1]}"
        with self.step("key", "Creating credentials and a key that only this image's PCR0 may decrypt with") as s:
            key = self.create_key(endpoint, app["PCR0"])
            s.detail = key["KeyId"]
        summary["KeyId"], summary["KeyArn"] = key["KeyId"], key["KeyArn"]
        summary["Condition"] = {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": app["PCR0"]}}
        summary["Policy"] = key["Policy"]
        with self.step("parent", "The parent itself is denied too: Decrypt without Recipient, ReEncrypt") as s:
            summary["ParentDenied"] = self.parent_denied(key)
            s.detail = "Decrypt and ReEncrypt both AccessDeniedException"
        job = {"region": REGION, "endpoint": ENDPOINT, "proxy_port": PROXY_PORT, "credentials": {
            "AccessKeyId": key["Credentials"]["AccessKeyId"],
            "SecretAccessKey": key["Credentials"]["SecretAccessKey"]},
            "ciphertext": base64.b64encode(key["Ciphertext"]).decode(), "encryption_context": {"app": "quickstart"}}
        with self.step("enclave", "Running the enclave: attest, decrypt through the proxy") as s:
            answer = self.run_enclave(images["App"]["Path"], job)
            if "Error" in answer:
                raise QuickstartError(f"the enclave could not decrypt: {answer['Error']}: {answer.get('Message')}")
            expected = hashlib.sha256(SECRET).hexdigest()
            if answer.get("SecretSHA256") != expected:
                raise QuickstartError("the enclave's SHA-256 of the secret does not match the secret encrypted")
            attested = answer.get("Attestation", {})
            if attested.get("PCR0") != app["PCR0"]:
                raise QuickstartError("the enclave's attestation document does not carry the image's PCR0")
            s.detail = answer["Message"]
        summary["Enclave"] = answer
        with self.step("denied", "Running the changed image: the same call must be denied") as s:
            denied = self.run_enclave(images["Changed"]["Path"], job)
            if denied.get("Error") != "AccessDeniedException":
                raise QuickstartError(f"the changed image was not denied: {json.dumps(denied)[:500]}")
            if denied.get("Attestation", {}).get("PCR0") != changed["PCR0"]:
                raise QuickstartError("the changed image's attestation document does not carry its PCR0")
            s.detail = f"{denied['Error']}: {denied.get('Message', '')}"
        summary["Denied"] = denied
        with self.step("audit", "Validating the KMS audit trail") as s:
            self.stop_kms()  # its trail writes the final digest on shutdown
            audit = self.audit()
            if audit["Allowed"] < 1 or audit["Denied"] < 2 or audit["ReEncryptDenied"] < 1:
                raise QuickstartError(f"the audit trail lacks the Decrypt/ReEncrypt events: {audit}")
            s.detail = (f"valid; {audit['Allowed']} allowed and {audit['Denied']} denied Decrypt events, "
                        f"{audit['ReEncryptDenied']} denied ReEncrypt")
        summary["Audit"] = audit
        summary["Result"] = "SUCCESS"
        summary["Steps"] = [{"Name": st.name, "Title": st.title, "Seconds": st.seconds} for st in self.steps]
        summary["TotalSeconds"] = round(time.monotonic() - started, 2)
        return summary


def _read_line(stream: IO[bytes], timeout: float) -> str | None:
    """The first line ``stream`` (unbuffered) delivers within ``timeout`` s; "" at end of file; None on timeout."""
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data and len(data) < 65536:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console log)"


def _stop(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Terminated(BaseException):
    """SIGTERM during a run: unwinds like Ctrl-C so that everything started is cleaned up."""


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title="enclavekit quickstart", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("PCR0", summary["Image"]["PCR0"])
    table.add_row("PCR1", summary["Image"]["PCR1"])
    table.add_row("PCR2", summary["Image"]["PCR2"])
    table.add_row("changed image PCR0", summary["ChangedImage"]["PCR0"])
    table.add_row("key", summary["KeyArn"])
    for operation, outcome in summary["ParentDenied"].items():
        table.add_row(f"parent's own {operation}", outcome)
    enclave = summary["Enclave"]
    table.add_row("enclave", f"{enclave['EnclaveID']} (module_id {enclave['Attestation'].get('ModuleId')})")
    table.add_row("enclave attested PCR0", str(enclave["Attestation"].get("PCR0")))
    table.add_row("enclave said", enclave["Message"])
    denied = summary["Denied"]
    table.add_row("changed image attested PCR0", str(denied.get("Attestation", {}).get("PCR0")))
    table.add_row("changed image", f"{denied['Error']}: {denied.get('Message', '')}")
    audit = summary["Audit"]
    table.add_row("audit trail", f"valid, {audit['DecryptEvents']} Decrypt events ({audit['Denied']} denied), "
                  f"{audit['ReEncryptDenied']} denied ReEncrypt; {audit['Trail']}")
    for st in summary["Steps"]:
        table.add_row(f"time: {st['Name']}", f"{st['Seconds']:.1f} s")
    table.add_row("total", f"{summary['TotalSeconds']:.1f} s")
    console.print(table)


def run_quickstart(*, json_output: bool = False, keep: bool = False, use_cache: bool = True,
                   examples: Path | None = None) -> int:
    """The ``enclavekit quickstart`` command: run, print, clean up; returns the exit status.

    Any failure (an enclavekit error, any other exception, Ctrl-C, SIGTERM) still cleans up and, with
    ``json_output``, still prints one ``{"Result": "FAILED", ...}`` object; enclavekit errors are then re-raised
    (``[ EXX ]`` line and status), Ctrl-C returns 130 and SIGTERM 143 (128 + the signal number).
    """
    console = Console(stderr=True, highlight=False)
    app = find_example(examples)
    qs = Quickstart(app=app, progress=console.print, use_cache=use_cache, keep=keep)

    def _on_term(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, _on_term)
    summary: dict[str, Any] = {"Result": "FAILED"}
    error: BaseException | None = None
    try:
        summary = qs.run()
    except (Exception, _Terminated, KeyboardInterrupt) as exc:
        error = exc
        if isinstance(exc, Exception) and not isinstance(exc, EnclaveKitError):
            # outside a step (steps translate their own): name where the run was
            error = QuickstartError(f"after step '{qs.current or 'start'}': {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        summary = {"Result": "FAILED", "FailedStep": qs.current or None,
                   "Error": str(error) or type(error).__name__,
                   "Steps": [{"Name": s.name, "Title": s.title, "Seconds": s.seconds, "Failed": s.failed}
                             for s in qs.steps]}
    finally:
        # a second SIGTERM must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            console.print("Cleaning up (enclaves, vsock-proxy, KMS, temporary directories) ...")
            problems = qs.cleanup()
        finally:
            signal.signal(signal.SIGTERM, previous)
    for problem in problems:
        console.print(f"[yellow]clean-up:[/yellow] {problem}")
    if keep:
        summary["WorkDirectory"] = str(qs.work)
    else:
        summary.pop("WorkDirectory", None)
        if isinstance(summary.get("Audit"), dict):
            summary["Audit"]["Trail"] = "removed"  # it was in the work directory; --keep keeps it
    if json_output:
        print(json.dumps(summary, indent=2))
    if error is not None:
        if isinstance(error, EnclaveKitError):
            raise error
        if isinstance(error, _Terminated):
            console.print("[red]terminated[/red] (SIGTERM)")
            return 128 + signal.SIGTERM
        console.print("[red]interrupted[/red]")
        return 130
    if not json_output:
        _print_summary(console, summary)
    console.print("[green]quickstart succeeded[/green]: the measured image decrypted the secret, the changed "
                  "image and the parent itself were denied, the audit trail is valid.")
    return 0
