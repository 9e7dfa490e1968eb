"""The runtime's audit records: enclave lifecycle events appended to the state directory's trail (issue 6 item 1, 5).

Every supervisor appends CloudTrail records (:func:`enclavekit.audit.events.runtime_event`, ``eventSource``
``enclaves.enclavekit.local``) to one trail:

* ``RunEnclave`` once ``run-enclave`` has been answered (EnclaveID, EnclaveCID, measurements, debug flag);
* ``TerminateEnclave`` when the enclave is terminated (control socket or a signal to the supervisor), appended
  before the terminate reply is sent;
* ``EnclaveBootFailure`` (``errorCode`` E36, the last console lines, cut) when the enclave dies at boot;
* ``EnclaveOutOfMemory`` when the enclave's cgroup reports an OOM kill as its application ends.

Where (``<state>/audit.json``, optional, like ``parent.json``)::

    {"trail": "audit" | "/abs/dir" | "s3://bucket/prefix" | null, "endpoint_url": "...",
     "account_id": "111122223333", "region": "us-east-1", "digest_interval": 3600}

``trail`` defaults to ``audit`` (``<state>/audit``; a relative path is relative to the state directory); ``null``
turns the runtime's records off.  For ``s3://`` the trail's state (spool, keys, head log) is ``<state>/audit`` and
the objects go to the bucket.  A trail directory that already exists keeps its identity (account, region, trail
name, prefix) from its ``trail.json``, so the runtime can write to the KMS's trail too.

Short-lived writers (trail.py "Delivery"): a supervisor opens the trail *without* a delivery thread.  ``append``
returns once the record is fsync'd in the spool (shared by every process, ``flock``); on the way out the
supervisor delivers what is spooled as a log file (``Trail.flush``: whoever holds ``deliver.lock`` rolls the whole
spool, so a record is delivered by its own supervisor or by another writer) and closes the trail **without
sealing**.  A digest is written when one is due (``digest_interval`` after the previous one, CloudTrail's hour by
default) by whichever writer delivers then; :func:`seal_runtime_trail` writes one now (before ``audit validate``).
Nothing of this runs before ``run-enclave`` has its answer: the launch never waits for the audit path.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclavekit.errors import ConfigError, EnclaveKitError, FileOperationError

if TYPE_CHECKING:  # the trail pulls in the X.509 stack: loaded after the launch, never on its path
    from enclavekit.audit.trail import Trail
    from enclavekit.runtime.registry import EnclaveRecord

__all__ = [
    "AUDIT_CONFIG",
    "RuntimeAuditConfig",
    "load_audit_config",
    "open_runtime_trail",
    "seal_runtime_trail",
    "console_excerpt",
    "RuntimeAudit",
]

AUDIT_CONFIG = "audit.json"
_CONFIG_MAX = 64 << 10
_FIELDS = frozenset({"trail", "endpoint_url", "account_id", "region", "digest_interval"})
_EXCERPT_LINES = 20       # the last console lines of a boot failure ...
_EXCERPT_LINE_CHARS = 200  # ... each cut to this many characters ...
_EXCERPT_CHARS = 2048      # ... and at most this much in all (records stay far below §1.1's caps)
_DELIVER_WAIT = 5.0        # how long a supervisor tries to take its turn delivering before leaving it to others


@dataclass(frozen=True)
class RuntimeAuditConfig:
    """The runtime's trail settings (``<state>/audit.json``); ``trail`` None means no runtime records."""

    trail: str | None = "audit"
    endpoint_url: str | None = None
    account_id: str | None = None
    region: str | None = None
    digest_interval: float | None = None

    def state_dir(self, state_home: Path) -> Path:
        """The trail's state directory (``<state>/audit`` for an ``s3://`` trail)."""
        if self.trail is None or self.trail.startswith("s3://"):
            return state_home / "audit"
        path = Path(self.trail)
        return path if path.is_absolute() else state_home / path


def load_audit_config(state_home: Path) -> RuntimeAuditConfig:
    """``<state>/audit.json``; missing: the default (``<state>/audit``).  Malformed: ConfigError (E03)."""
    path = state_home / AUDIT_CONFIG
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_CONFIG_MAX + 1)
    except FileNotFoundError:
        return RuntimeAuditConfig()
    except OSError as exc:
        raise FileOperationError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > _CONFIG_MAX:
        raise ConfigError(f"{path} is larger than {_CONFIG_MAX} bytes")
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON") from exc
    if not isinstance(obj, dict) or set(obj) - _FIELDS:
        raise ConfigError(f"{path}: expected an object with {', '.join(sorted(_FIELDS))}")
    trail = obj.get("trail", "audit")
    if trail is not None and (not isinstance(trail, str) or not trail or "\0" in trail):
        raise ConfigError(f"{path}: trail must be a directory, s3://bucket/prefix or null")
    for key in ("endpoint_url", "account_id", "region"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise ConfigError(f"{path}: {key} must be a string")
    interval = obj.get("digest_interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int | float)
                                 or interval <= 0):
        raise ConfigError(f"{path}: digest_interval must be a positive number of seconds")
    return RuntimeAuditConfig(trail=trail, endpoint_url=obj.get("endpoint_url"), account_id=obj.get("account_id"),
                              region=obj.get("region"),
                              digest_interval=float(interval) if interval is not None else None)


def open_runtime_trail(state_home: Path, config: RuntimeAuditConfig | None = None) -> Trail | None:
    """The state directory's trail, opened without a delivery thread; None when the config turns it off."""
    from enclavekit.audit.s3 import S3Destination, parse_s3_url  # noqa: PLC0415 - see TYPE_CHECKING above
    from enclavekit.audit.trail import Destination, Trail, TrailConfig, read_trail_config  # noqa: PLC0415
    from enclavekit.errors import AuditError  # noqa: PLC0415

    cfg = config if config is not None else load_audit_config(state_home)
    if cfg.trail is None:
        return None
    state_dir = cfg.state_dir(state_home)
    # an existing trail keeps its identity (trail.json): join it rather than refuse
    existing: dict[str, Any] = {}
    if (state_dir / "trail.json").exists():
        with contextlib.suppress(AuditError):
            existing = read_trail_config(state_dir)
    destination: Destination | None = None
    url, prefix = "local", str(existing.get("prefix", ""))
    if cfg.trail.startswith("s3://"):
        try:
            bucket, prefix = parse_s3_url(cfg.trail)
        except ValueError as exc:
            raise ConfigError(f"{state_home / AUDIT_CONFIG}: {exc}") from None
        region = cfg.region or existing.get("region")
        destination = S3Destination(bucket, endpoint_url=cfg.endpoint_url, region=region)
        url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    kwargs: dict[str, Any] = {"prefix": prefix}
    for key, name in (("account_id", "accountId"), ("region", "region"), ("trail_name", "trailName"),
                      ("home_region", "homeRegion")):
        value = existing.get(name)
        if isinstance(value, str) and value:
            kwargs[key] = value
    if cfg.account_id is not None:
        kwargs.setdefault("account_id", cfg.account_id)
    if cfg.region is not None:
        kwargs.setdefault("region", cfg.region)
    if "home_region" in kwargs and kwargs["home_region"] == kwargs.get("region", TrailConfig.region):
        del kwargs["home_region"]  # trail.json records the home region even when it is the region
    if cfg.digest_interval is not None:
        kwargs["digest_interval"] = cfg.digest_interval
    elif isinstance(existing.get("digestInterval"), int | float) and existing["digestInterval"] > 0:
        kwargs["digest_interval"] = float(existing["digestInterval"])
    try:
        trail_config = TrailConfig(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"cannot configure the runtime's audit trail: {exc}") from exc
    return Trail(state_dir, config=trail_config, destination=destination, destination_url=url, deliver=False)


def seal_runtime_trail(state_home: Path) -> bool:
    """Deliver everything spooled and write a sealing digest now (e.g. before ``enclavekit audit validate``).

    False when the runtime's trail is off, or another process holds the trail's delivery lock (it delivers).
    """
    trail = open_runtime_trail(state_home)
    if trail is None:
        return False
    try:
        return trail.seal()
    finally:
        trail.close(seal=False)


def console_excerpt(lines: list[str]) -> list[str]:
    """The last console lines of a failed boot, cut for a record: at most 20 lines of 200 characters, 2 KiB."""
    out: list[str] = []
    total = 0
    for line in reversed(lines[-_EXCERPT_LINES:]):
        cut = line if len(line) <= _EXCERPT_LINE_CHARS else line[:_EXCERPT_LINE_CHARS - 3] + "..."
        if total + len(cut) > _EXCERPT_CHARS:
            break
        out.append(cut)
        total += len(cut)
    out.reverse()
    return out


def _user_name(uid: int) -> str:
    if uid == 0:
        return "root"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class RuntimeAudit:
    """One supervisor's audit writer.  Never raises: a trail that fails is reported in ``supervisor.log``.

    Records are appended on whatever thread calls; :meth:`run_enclave` appends on a thread of its own (the
    supervisor goes on watching its enclave); :meth:`close` delivers and closes (call it last).
    """

    def __init__(self, state_home: Path, *, owner_uid: int = 0) -> None:
        self.state_home = state_home
        self.user = _user_name(owner_uid)
        self._lock = threading.Lock()
        self._trail: Trail | None = None
        self._opened = False
        self._config: RuntimeAuditConfig | None = None
        self._threads: list[threading.Thread] = []
        self.appended: list[str] = []   # event names appended by this supervisor (diagnostics, tests)

    def _open(self) -> Trail | None:
        with self._lock:
            if not self._opened:
                self._opened = True
                try:
                    self._config = load_audit_config(self.state_home)
                    self._trail = open_runtime_trail(self.state_home, self._config)
                except EnclaveKitError as exc:
                    _log(f"audit: the runtime's trail cannot be opened: [ {exc.code} ] {exc.message}")
                except Exception as exc:  # never the enclave's problem (see the class doc)
                    _log(f"audit: the runtime's trail cannot be opened: {type(exc).__name__}: {exc}")
            return self._trail

    def _append(self, name: str, record: EnclaveRecord, **fields: Any) -> None:
        trail = self._open()
        if trail is None:
            return
        from enclavekit.audit.events import runtime_event  # noqa: PLC0415 - see TYPE_CHECKING above

        cfg = trail.config
        try:
            event = runtime_event(name, event_time=datetime.now(UTC), event_id=str(uuid.uuid4()),
                                  region=cfg.region, account_id=cfg.account_id, enclave_id=record.enclave_id,
                                  enclave_name=record.name, user=self.user, **fields)
            trail.append(event)
            self.appended.append(name)
        except Exception as exc:  # the enclave's life must not depend on its audit trail
            _log(f"audit: cannot append {name} for {record.enclave_id}: {type(exc).__name__}: {exc}")

    # ---- the four events

    def run_enclave(self, record: EnclaveRecord, request: Mapping[str, Any]) -> None:
        """``RunEnclave``, on a thread (the launch has been answered already)."""
        response = {"EnclaveID": record.enclave_id, "EnclaveName": record.name, "EnclaveCID": record.cid,
                    "ProcessID": record.owner_pid, "NumberOfCPUs": len(record.cpu_ids),
                    "CPUIDs": list(record.cpu_ids), "MemoryMiB": record.memory_mib,
                    "Flags": "DEBUG_MODE" if record.debug_mode else "NONE", "DebugMode": record.debug_mode,
                    "Measurements": dict(record.measurements)}

        def run() -> None:
            self._append("RunEnclave", record, request_parameters=dict(request), response_elements=response)

        thread = threading.Thread(target=run, name="audit-run-enclave", daemon=True)
        self._threads.append(thread)
        thread.start()

    def terminate_enclave(self, record: EnclaveRecord, *, via: str) -> None:
        self._append("TerminateEnclave", record, request_parameters={"via": via},
                     response_elements={"EnclaveID": record.enclave_id, "Terminated": True})

    def boot_failure(self, record: EnclaveRecord, error: EnclaveKitError, console: list[str]) -> None:
        self._append("EnclaveBootFailure", record, error_code=error.code, error_message=error.message,
                     details={"enclaveCid": record.cid, "consoleTail": console_excerpt(console),
                              "consoleLog": error.details.get("console log", "")})

    def out_of_memory(self, record: EnclaveRecord, *, oom_kills: int, exit_status: int | None) -> None:
        self._append("EnclaveOutOfMemory", record,
                     details={"enclaveCid": record.cid, "memoryMiB": record.memory_mib, "oomKills": oom_kills,
                              "exitStatus": exit_status})

    # ---- delivery

    def close(self, *, deliver_wait: float = _DELIVER_WAIT) -> None:
        """Deliver what is spooled (as log files; a digest only when one is due), then close without sealing.

        Another process may hold the delivery lock (a KMS on the same trail, another supervisor delivering): it
        delivers our records too, so after ``deliver_wait`` seconds of trying this gives up quietly.
        """
        for thread in self._threads:
            thread.join(30.0)
        trail = self._trail
        if trail is None:
            return
        try:
            deadline = time.monotonic() + max(0.0, deliver_wait)
            while True:
                try:
                    trail.step(force_roll=True)
                except Exception as exc:  # store down: the records stay in the spool for the next writer
                    _log(f"audit: delivery failed ({type(exc).__name__}: {exc}); the spool keeps the records")
                    break
                if trail.health().get("delivering") or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        finally:
            with contextlib.suppress(Exception):
                trail.close(seal=False)
            self._trail = None


def _log(message: str) -> None:
    """The supervisor's stderr is its ``supervisor.log``."""
    with contextlib.suppress(OSError, ValueError):
        os.write(sys.stderr.fileno(), (message + "\n").encode(errors="replace"))
