"""Helpers for the KMS integration tests: a real ``enclavekit kms serve`` process, credentials, a throwaway
PostgreSQL (initdb/pg_ctl in a temp dir, as the ``postgres`` user when run as root, unix socket only).

PostgreSQL missing is a test FAILURE with a clear message, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

_SCRIPT = Path(sys.executable).with_name("enclavekit")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "enclavekit.cli.main"]
REGION = "us-east-1"
ACCOUNT = "111122223333"
INSTANCE = "i-0123456789abcdef0"


class KMSServer:
    """One ``enclavekit kms serve`` subprocess on 127.0.0.1 with its own data dir and state home."""

    def __init__(self, data_dir: Path, *, home: Path, database_url: str | None = None, workers: int = 1,
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.home = home
        self.database_url = database_url
        self.workers = workers
        self.extra = extra or []
        self.env = {**os.environ, "ENCLAVEKIT_HOME": str(home), **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint = ""
        self.info: dict[str, str] = {}
        self.stderr_path = data_dir.parent / f"{data_dir.name}.stderr"

    def store_args(self) -> list[str]:
        args = ["--data-dir", str(self.data_dir)]
        if self.database_url:
            args += ["--database-url", self.database_url]
        return args

    def start(self, timeout: float = 30.0) -> KMSServer:
        self.stderr_file = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [*CLI, "kms", "serve", "--port", "0", "--workers", str(self.workers), *self.store_args(), *self.extra],
            stdout=subprocess.PIPE, stderr=self.stderr_file, text=True, env=self.env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line or self.proc.poll() is not None:
                break
        if not line:
            self.stop()
            raise AssertionError(f"kms serve did not start: {self.stderr_path.read_text()[-2000:]}")
        self.info = json.loads(line)
        self.endpoint = self.info["Endpoint"]
        return self

    def credentials(self, name: str) -> dict[str, str]:
        out = subprocess.run([*CLI, "kms", "create-credentials", "--name", name, *self.store_args()],
                             check=True, capture_output=True, text=True, env=self.env, timeout=60)
        creds: dict[str, str] = json.loads(out.stdout)
        return creds

    def client(self, creds: dict[str, str], **kw: Any) -> Any:
        return boto3.client("kms", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                            config=Config(retries={"max_attempts": 0}, **kw))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # a stuck server: kill its workers too, so no test leaves a process behind
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                pids = children.read_text().split() if children.exists() else []
                self.proc.kill()
                self.proc.wait()
                for pid in pids:
                    with suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.stderr_file.close()
        return self.proc.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def __enter__(self) -> KMSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------- attestation


def attestation_document(home: Path, public_key: bytes, pcr0: bytes, *, debug: bool = False) -> bytes:
    """A document from the local PKI in ``home`` (the one ``kms serve`` trusts), for a Recipient."""
    from enclavekit.attestation.issuer import DocumentIssuer
    from enclavekit.attestation.pki import LocalPKI
    from enclavekit.formats.pcr import pcr4_instance_id

    now = datetime.now(UTC)
    pki = LocalPKI.open(home, now=now)
    pcrs = {i: b"\x00" * 48 for i in range(16)}
    pcrs.update({0: pcr0, 1: b"\x11" * 48, 2: b"\x22" * 48, 4: pcr4_instance_id(INSTANCE)})
    if debug:  # spec 2.5: a debug-mode enclave has PCR0/1/2 all zero
        pcrs.update({0: b"\x00" * 48, 1: b"\x00" * 48, 2: b"\x00" * 48})
    return DocumentIssuer(pki).issue(module_id=f"{INSTANCE}-enc0199546b533fd5d0",
                                     timestamp_ms=int(now.timestamp() * 1000), pcrs=pcrs, public_key=public_key,
                                     user_data=None, nonce=None)


def recipient_param(document: bytes) -> dict[str, Any]:
    return {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": document}


# --------------------------------------------------------------------------------------------- audit trail


def audit_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``enclavekit audit ...`` as a user runs it."""
    return subprocess.run([*CLI, "audit", *args], check=False, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def trail_events(*trail_args: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``enclavekit audit events --trail ... --json`` (the delivered records of a trail)."""
    out = audit_cli("events", *trail_args, "--json", env=env)
    assert out.returncode == 0, out.stderr
    events: list[dict[str, Any]] = json.loads(out.stdout)
    return events


def pinned_key_args(*trail_args: str, env: dict[str, str] | None = None) -> list[str]:
    """Export the trail's public key (``audit public-key``) to a file outside the trail's state directory and
    return ``--public-key FILE``: validation wants an anchored key, not the keys stored beside the private one."""
    args = list(trail_args)
    state = Path(args[args.index("--state") + 1] if "--state" in args else args[args.index("--trail") + 1])
    out = audit_cli("public-key", "--trail", str(state), env=env)
    assert out.returncode == 0, out.stderr
    pem = state.parent / f"{state.name}-public-key.pem"
    pem.write_text(out.stdout)
    return ["--public-key", str(pem)]


def assert_trail_valid(*trail_args: str, env: dict[str, str] | None = None) -> None:
    pinned = [] if "--public-key" in trail_args else pinned_key_args(*trail_args, env=env)
    out = audit_cli("validate", *trail_args, *pinned, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


def live_trail_records(state_dir: Path) -> list[dict[str, Any]]:
    """The records of a local trail whose server still runs: delivered log files plus what waits in the spool."""
    from enclavekit.audit.trail import LocalDestination, iter_records

    records = {r["eventID"]: r for _key, r in iter_records(LocalDestination(state_dir))}
    spool = state_dir / "spool" / "spool.jsonl"
    data = spool.read_bytes() if spool.exists() else b""
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        record = json.loads(line)
        records.setdefault(record["eventID"], record)
    return sorted(records.values(), key=lambda r: (r["eventTime"], r["eventID"]))


# --------------------------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / name).exists():
            return str(base / name)
    pytest.fail(f"PostgreSQL is required for the KMS store tests but `{name}` was not found: install the "
                "postgresql package (apt-get install postgresql) — these tests never skip")


@contextmanager
def running_postgres() -> Iterator[str]:
    """Start a private PostgreSQL on a unix socket in a temp dir; yields a postgresql:// URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    base = Path(tempfile.mkdtemp(prefix="ek-kms-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    base.chmod(0o755)
    try:
        subprocess.run([*as_postgres, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-w", "-t", "60", "-l", str(base / "log"),
                        "-o", f"-k {sock} -c listen_addresses='' -c fsync=on", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (base / "log").read_text() if (base / "log").exists() else ""
        out = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL for the KMS tests: {out.decode(errors='replace')[-800:]} {log}")
    try:
        yield f"postgresql://postgres@/postgres?host={sock}"
    finally:
        with suppress(subprocess.SubprocessError):
            subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=False,
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server at ``url``; returns its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.replace("/postgres?", f"/{name}?")
