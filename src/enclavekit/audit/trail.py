"""The trail writer: spool -> CloudTrail log files -> signed, chained digests -> a local directory or S3.

Layout of a trail's state directory (``kms serve --trail DIR``; for a local trail the log tree lives there too)::

    trail.json            account, region, trail name, bucket, prefix, destination (fixed at creation);
                          digestInterval, endpointUrl (settings, may change between runs)
    spool/                spool.jsonl + spool.lock (spool.py): acknowledged, not yet delivered records
    state/delivery.json   the delivery state (cursor, undigested log files, chain head, write intents, clock mark)
    state/deliver.lock    flock: the one process that delivers (others only append to the spool)
    state/health.json     the deliverer's health (last error, conflicts), for `audit validate|events`
    state/heads.jsonl     every digest written (key, sha256, signature, end, sealed): the head anchor (§5.3.1)
    keys/private.pem      RSA-2048 signing key (0600, in a 0700 directory)
    keys/public-keys.json every public key the trail ever signed with (§3.6 ListPublicKeys, kept forever)
    AWSLogs/...           (local destination) log files, digests and ``<digest>.meta.json`` signature sidecars

Delivery (one thread in the process holding ``deliver.lock``): roll a log file when the spool holds
``max_log_bytes`` or its oldest undelivered record waited ``max_log_age`` seconds (§3.7 step 1); write a digest
every ``digest_interval`` seconds (§3.7 step 2, also when no log file was delivered); on ``close(seal=True)``
deliver everything and write a final sealing digest.  Each object write is preceded by an intent in
``delivery.json`` and every object is a function of the spool and the state, so a crash at any point is
repaired on restart by writing the very same bytes again (the destination accepts identical bytes, refuses
different ones: history is never overwritten).  Any failure is retried with exponential backoff (the delivery
thread never dies of one; :meth:`Trail.health` reports it); events keep arriving in the spool meanwhile.  A key
already holding other bytes is permanent: the object is delivered under a new name instead.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import secrets
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavekit._internal.fileio import fsync_dir
from enclavekit.audit.digest import (
    SIGNATURE_ALGORITHM,
    DigestFile,
    DigestKey,
    LogFileEntry,
    fingerprint,
    load_public_key_der,
    public_key_der,
    sign_digest,
)
from enclavekit.audit.events import cap_record, check_record, format_time, parse_time, trail_service_event
from enclavekit.audit.logfile import LogFile, LogFileKey
from enclavekit.audit.spool import Spool, SpoolCursor
from enclavekit.errors import (
    AuditDeliveryError,
    AuditError,
    AuditHistoryError,
    AuditKeyError,
    AuditSpoolError,
)

__all__ = [
    "Destination",
    "LocalDestination",
    "TrailConfig",
    "Trail",
    "HeadRecord",
    "read_heads",
    "read_trail_config",
    "read_public_keys",
    "read_health",
    "read_pending",
    "iter_records",
    "utc_now",
    "random_unique",
]

log = logging.getLogger(__name__)

_ALNUM = string.ascii_letters + string.digits
_STATE_VERSION = 1
_CONFLICT_ATTEMPTS = 3       # a key taken by other bytes: deliver under a new name at most this many times a round


def utc_now() -> datetime:
    return datetime.now(UTC)


def random_unique() -> str:
    """§2: the 16 random alphanumerics that keep log file names unique."""
    return "".join(secrets.choice(_ALNUM) for _ in range(16))


# ============================================================================================== destinations


class Destination(Protocol):
    """Where objects go: a local directory or an S3 bucket (s3.py)."""

    bucket: str

    def describe(self) -> str: ...

    def put_new(self, key: str, data: bytes, metadata: dict[str, str] | None = None, *,
                retain_until: datetime | None = None) -> None: ...

    def get(self, key: str) -> tuple[bytes, dict[str, str]] | None: ...

    def list(self, prefix: str) -> list[str]: ...


_META = ".meta.json"


class LocalDestination:
    """Objects are files under ``root``; metadata is a ``<key>.meta.json`` sidecar written after the object (§3.7.4).

    ``bucket`` is a label recorded in digests (``digestS3Bucket``); files are created with ``link()`` so that an
    existing file is never replaced.
    """

    def __init__(self, root: Path, bucket: str = "local") -> None:
        self.root = Path(root)
        self.bucket = bucket

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"not a safe object key: {key!r}")
        return self.root.joinpath(*parts)

    def _create(self, path: Path, data: bytes) -> bool:
        """Create ``path`` with ``data``; False if it already exists (left untouched)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
        finally:
            tmp.unlink()
        if created:
            fsync_dir(path.parent)
        return created

    def put_new(self, key: str, data: bytes, metadata: dict[str, str] | None = None, *,
                retain_until: datetime | None = None) -> None:
        path = self._path(key)
        meta = json.dumps(dict(metadata or {}), sort_keys=True).encode()
        try:
            if not self._create(path, data) and path.read_bytes() != data:
                raise AuditHistoryError(f"refusing to overwrite {path}: a file with other content exists")
            if metadata and not self._create(path.with_name(path.name + _META), meta) \
                    and path.with_name(path.name + _META).read_bytes() != meta:
                raise AuditHistoryError(f"refusing to overwrite the metadata of {path}")
        except OSError as exc:
            raise AuditDeliveryError(f"cannot write {path}: {exc.strerror}") from exc

    def get(self, key: str) -> tuple[bytes, dict[str, str]] | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditDeliveryError(f"cannot read {path}: {exc.strerror}") from exc
        metadata: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            try:
                loaded = json.loads(path.with_name(path.name + _META).read_bytes())
            except ValueError:
                loaded = {}
            if isinstance(loaded, dict):
                metadata = {str(k).lower(): str(v) for k, v in loaded.items()}
        return data, metadata

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        base = self.root
        if not base.is_dir():
            return keys
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(_META) or name.endswith(".tmp"):
                    continue
                if name.startswith("."):
                    continue
                key = Path(dirpath, name).relative_to(base).as_posix()
                if key.startswith(prefix) and "AWSLogs/" in key:
                    keys.append(key)
        return sorted(keys)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` may write less than asked (signals, quotas): loop until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _append_line(path: Path, line: bytes) -> None:
    """Append one line durably; the first creation of ``path`` also fsyncs its directory (the entry itself)."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


# ============================================================================================== config


@dataclass(frozen=True)
class TrailConfig:
    account_id: str = "111122223333"
    region: str = "us-east-1"
    trail_name: str = "enclavekit"
    home_region: str | None = None
    prefix: str = ""
    digest_interval: float = 3600.0          # CloudTrail's hour (§3.3)
    max_log_bytes: int = 4 * 1024 * 1024     # roll a log file at this much spooled JSON ...
    max_log_age: float = 300.0               # ... or when its oldest record waited this long (§2: ~5 minutes)
    poll_interval: float = 0.2
    retry_initial: float = 0.2               # backoff while the store is down: 0.2 s, 0.4 s, ... up to retry_max
    retry_max: float = 10.0
    object_lock_days: int = 365              # retention when the bucket has Object Lock (§5.3.9)

    def __post_init__(self) -> None:
        # validate names through the key classes (12-digit account, region, trail name)
        DigestKey(account_id=self.account_id, region=self.region, trail_name=self.trail_name,
                  home_region=self.home, end_time=datetime(2000, 1, 1, tzinfo=UTC), prefix=self.prefix)
        if self.digest_interval <= 0 or self.max_log_age <= 0 or self.max_log_bytes < 1024:
            raise ValueError("digest_interval and max_log_age must be positive, max_log_bytes at least 1024")

    @property
    def home(self) -> str:
        return self.home_region or self.region


@dataclass(frozen=True)
class HeadRecord:
    """One line of ``state/heads.jsonl``: a digest the trail wrote."""

    key: str
    sha256: str
    signature: str
    end: str
    sealed: bool = False


def read_heads(path: Path) -> list[HeadRecord]:
    heads: list[HeadRecord] = []
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except FileNotFoundError:
        return heads
    for raw in lines:
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            heads.append(HeadRecord(key=obj["key"], sha256=obj["sha256"], signature=obj["signature"],
                                    end=obj["end"], sealed=bool(obj.get("sealed", False))))
        except (ValueError, KeyError, TypeError):
            continue   # a torn last line from a crash: the digest it named is still in delivery.json
    return heads


def read_trail_config(state_dir: Path) -> dict[str, Any]:
    try:
        obj = json.loads((Path(state_dir) / "trail.json").read_bytes())
    except FileNotFoundError:
        raise AuditError(f"{state_dir} is not a trail directory (no trail.json)") from None
    except ValueError as exc:
        raise AuditError(f"{state_dir}/trail.json is not JSON") from exc
    if not isinstance(obj, dict):
        raise AuditError(f"{state_dir}/trail.json is not an object")
    return obj


def read_public_keys(state_dir: Path) -> dict[str, rsa.RSAPublicKey]:
    """Every public key of a trail, by fingerprint (``keys/public-keys.json``)."""
    path = Path(state_dir) / "keys" / "public-keys.json"
    try:
        items = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise AuditKeyError(f"{path} is not JSON") from exc
    keys: dict[str, rsa.RSAPublicKey] = {}
    for item in items if isinstance(items, list) else []:
        key = load_public_key_der(base64.b64decode(item["Value"]))
        if fingerprint(key) != item.get("Fingerprint"):
            raise AuditKeyError(f"{path}: a fingerprint does not match its key")
        keys[item["Fingerprint"]] = key
    return keys


# ============================================================================================== the trail


@dataclass
class _State:
    cursor: SpoolCursor
    window_start: str
    undigested: list[dict[str, Any]] = field(default_factory=list)
    last_digest: dict[str, Any] | None = None
    pending_log: dict[str, Any] | None = None
    pending_digest: dict[str, Any] | None = None
    clock_mark: str | None = None     # the latest clock reading used (digest windows may run a second ahead)

    def to_json(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "cursor": self.cursor.to_json(), "windowStart": self.window_start,
                "undigested": self.undigested, "lastDigest": self.last_digest, "pendingLog": self.pending_log,
                "pendingDigest": self.pending_digest, "clockMark": self.clock_mark}

    @classmethod
    def from_json(cls, obj: Any) -> _State:
        if not isinstance(obj, dict) or obj.get("version") != _STATE_VERSION:
            raise AuditSpoolError("the trail's delivery state has an unknown version")
        try:
            return cls(cursor=SpoolCursor.from_json(obj["cursor"]), window_start=obj["windowStart"],
                       undigested=list(obj["undigested"]), last_digest=obj["lastDigest"],
                       pending_log=obj["pendingLog"], pending_digest=obj["pendingDigest"],
                       clock_mark=obj.get("clockMark") if isinstance(obj.get("clockMark"), str) else None)
        except (KeyError, TypeError) as exc:
            raise AuditSpoolError("the trail's delivery state is damaged") from exc


class Trail:
    """Append CloudTrail records durably; deliver them as log files and signed digests (see the module doc).

    Implements the KMS's ``AuditSink`` protocol (``append(event)``, ``close()``).
    """

    def __init__(self, state_dir: Path, *, config: TrailConfig | None = None,
                 destination: Destination | None = None, destination_url: str = "local",
                 clock: Callable[[], datetime] = utc_now, unique: Callable[[], str] = random_unique,
                 deliver: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.config = config or TrailConfig()
        self.destination: Destination = destination or LocalDestination(self.state_dir)
        self._clock = clock
        self._unique = unique
        try:
            for sub in ("", "state", "keys"):
                (self.state_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
            self._check_trail_json(destination_url)
            self._deliver_fd = os.open(self.state_dir / "state" / "deliver.lock",
                                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the trail in {self.state_dir}: {exc.strerror}") from exc
        self.spool = Spool(self.state_dir / "spool")
        self._holder = False
        self._state: _State | None = None
        self._key: rsa.RSAPrivateKey | None = None
        self._first_pending: float | None = None
        self._lock = threading.RLock()       # one delivery step at a time inside this process
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.last_error: Exception | None = None
        self.last_error_time: datetime | None = None
        self.last_success_time: datetime | None = None
        self.consecutive_failures = 0
        self.history_conflicts = 0
        self.last_history_conflict: str | None = None
        self.delivered_logs = 0
        self.digests_written = 0
        self.clock_skews = 0
        self._clock_behind = False
        self._thread: threading.Thread | None = None
        if deliver:
            self._thread = threading.Thread(target=self._run, name="audit-trail-delivery", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------ set-up

    def _check_trail_json(self, destination_url: str) -> None:
        c = self.config
        wanted = {"version": 1, "accountId": c.account_id, "region": c.region, "trailName": c.trail_name,
                  "homeRegion": c.home, "prefix": c.prefix.strip("/"), "bucket": self.destination.bucket,
                  "destination": destination_url}
        # settings, not identity: they may change between runs (validation reads them: --max-age default,
        # digest window lengths, the S3 endpoint of `audit validate|events --trail DIR`)
        settings = {"digestInterval": c.digest_interval,
                    "endpointUrl": getattr(self.destination, "endpoint_url", None)}
        path = self.state_dir / "trail.json"
        if path.exists():
            existing = read_trail_config(self.state_dir)
            changed = [k for k, v in wanted.items() if existing.get(k) != v]
            if changed:
                raise AuditError(f"the trail in {self.state_dir} was created with other settings "
                                 f"({', '.join(changed)}); a trail's identity cannot change, use a new directory")
            if all(existing.get(k) == v for k, v in settings.items()):
                return
        _atomic_write(path, json.dumps({**wanted, **settings}, indent=2).encode() + b"\n", 0o644)

    def _signing_key(self) -> rsa.RSAPrivateKey:
        """The trail's RSA-2048 key, created on first use (keys/private.pem, 0600)."""
        if self._key is not None:
            return self._key
        keys = self.state_dir / "keys"
        path = keys / "private.pem"
        try:
            if path.exists():
                if path.stat().st_mode & 0o077:
                    raise AuditKeyError(f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}); "
                                        "chmod 600 it")
                loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
                if not isinstance(loaded, rsa.RSAPrivateKey):
                    raise AuditKeyError(f"{path} is not an RSA private key")
                key = loaded
            else:
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
                _atomic_write(path, pem, 0o600)
        except OSError as exc:
            raise AuditKeyError(f"cannot read or create the trail key {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise AuditKeyError(f"{path} is not a PEM private key") from exc
        self._publish(key.public_key())
        self._key = key
        return key

    def _publish(self, public: rsa.RSAPublicKey) -> None:
        """§3.6: every key the trail signs with stays listable, with its fingerprint."""
        path = self.state_dir / "keys" / "public-keys.json"
        fp = fingerprint(public)
        try:
            items = json.loads(path.read_bytes()) if path.exists() else []
        except ValueError as exc:
            raise AuditKeyError(f"{path} is not JSON") from exc
        except OSError as exc:
            raise AuditKeyError(f"cannot read {path}: {exc.strerror}") from exc
        if any(item.get("Fingerprint") == fp for item in items):
            return
        items.append({"Fingerprint": fp, "Value": base64.b64encode(public_key_der(public)).decode(),
                      "ValidityStartTime": format_time(self._clock()), "ValidityEndTime": None})
        try:
            _atomic_write(path, json.dumps(items, indent=2).encode() + b"\n", 0o644)
        except OSError as exc:
            raise AuditKeyError(f"cannot write {path}: {exc.strerror}") from exc

    def public_key_pem(self) -> bytes:
        """The signing key's public half (SubjectPublicKeyInfo PEM), for `audit validate --public-key`."""
        return self._signing_key().public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo)

    # ------------------------------------------------------------------------------------------ appending

    def append(self, event: Mapping[str, Any]) -> None:
        """Durably spool one record (returns after fsync; group commit across threads and processes)."""
        record = cap_record(event)     # §1.1 size caps: a huge field is replaced by a marker, never an error
        check_record(record)
        self.spool.append(record)
        self._wake.set()

    # ------------------------------------------------------------------------------------------ state

    def _load_state(self) -> _State:
        if self._state is not None:
            return self._state
        path = self.state_dir / "state" / "delivery.json"
        try:
            self._state = _State.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            self._state = _State(cursor=self.spool.start(), window_start=format_time(self._clock()))
            self._save()
        except ValueError as exc:
            raise AuditSpoolError(f"{path} is not JSON") from exc
        except OSError as exc:
            raise AuditSpoolError(f"cannot read the delivery state {path}: {exc.strerror}") from exc
        return self._state

    def _save(self) -> None:
        assert self._state is not None
        path = self.state_dir / "state" / "delivery.json"
        try:
            _atomic_write(path, json.dumps(self._state.to_json(), separators=(",", ":")).encode())
        except OSError as exc:
            raise AuditSpoolError(f"cannot write the delivery state {path}: {exc.strerror}") from exc

    def _try_hold(self, block_for: float = 0.0) -> bool:
        if self._holder:
            return True
        deadline = time.monotonic() + block_for
        while True:
            try:
                fcntl.flock(self._deliver_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._holder = True
                self._state = None   # another process may have delivered since: re-read
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def _retain_until(self) -> datetime:
        return self._clock() + timedelta(days=self.config.object_lock_days)

    # ------------------------------------------------------------------------------------------ delivery

    def _recover(self) -> None:
        """Finish a write interrupted by a crash: the same bytes again (identical objects are accepted)."""
        state = self._load_state()
        if state.pending_log is not None:
            p = state.pending_log
            start, end = SpoolCursor.from_json(p["from"]), SpoolCursor.from_json(p["to"])
            records, after = self.spool.read(start, end.offset - start.offset)
            if after != end or not records:
                raise AuditSpoolError("the spool no longer holds the records of an interrupted log file")
            logfile = LogFile.from_records(records)
            if logfile.sha256 != p["sha256"]:
                raise AuditSpoolError("the spool's records differ from those of an interrupted log file")
            key = self._put_log(p["key"], logfile)
            self._commit_log(key, logfile, end)
        if state.pending_digest is not None:
            p = state.pending_digest
            digest = DigestFile.from_json_bytes(p["content"].encode())
            self._put_digest(digest, p["signature"], bool(p.get("sealed", False)))

    def _roll(self) -> bool:
        """Deliver one log file from the spool; False if the spool is empty."""
        state = self._load_state()
        records, after = self.spool.read(state.cursor, self.config.max_log_bytes)
        if not records:
            return False
        logfile = LogFile.from_records(records)
        delivered_at = self._clock()
        self._mark_clock(state, delivered_at)
        key = LogFileKey(account_id=self.config.account_id, region=self.config.region,
                         delivered_at=delivered_at, unique=self._unique(), prefix=self.config.prefix).to_key()
        state.pending_log = {"key": key, "from": self.spool.resolve(state.cursor).to_json(),
                             "to": after.to_json(), "sha256": logfile.sha256}
        self._save()
        key = self._put_log(key, logfile)
        self._commit_log(key, logfile, after)
        return True

    def _put_log(self, key: str, logfile: LogFile) -> str:
        """Write a log file (its intent is saved); returns the key it was written under.

        A key that already holds other bytes (AuditHistoryError: planted, or a clash of the random part) is
        permanent, retrying cannot help: report it and deliver under a fresh random name with the same stamp.
        """
        for attempt in range(_CONFLICT_ATTEMPTS):
            try:
                self.destination.put_new(key, logfile.to_bytes(), retain_until=self._retain_until())
                return key
            except AuditHistoryError as exc:
                self._history_conflict(exc)
                if attempt + 1 == _CONFLICT_ATTEMPTS:
                    raise
                old = LogFileKey.from_key(key)
                key = LogFileKey(account_id=old.account_id, region=old.region, delivered_at=old.delivered_at,
                                 unique=self._unique(), prefix=old.prefix).to_key()
                state = self._load_state()
                assert state.pending_log is not None
                state.pending_log = {**state.pending_log, "key": key}
                self._save()
        raise AssertionError("unreachable")

    def _history_conflict(self, exc: AuditHistoryError) -> None:
        self.history_conflicts += 1
        self.last_history_conflict = f"{format_time(self._clock())} {exc}"
        log.error("audit trail delivery: %s; this is permanent (someone wrote that object): delivering under a "
                  "new name, and validation will report the foreign object", exc)
        self._write_health()

    def _commit_log(self, key: str, logfile: LogFile, after: SpoolCursor) -> None:
        state = self._load_state()
        oldest, newest = logfile.event_time_range()
        entry = LogFileEntry(s3_bucket=self.destination.bucket, s3_object=key, hash_value=logfile.sha256,
                             oldest_event_time=oldest, newest_event_time=newest)
        state.undigested.append(entry.to_json())
        state.cursor = after
        state.pending_log = None
        self._save()
        self.delivered_logs += 1

    def _check_clock(self) -> None:
        """A clock behind the last digest's end went backwards: warn, and record it in the trail itself (once per
        episode) as a service event, so that the validator's window check has an explanation to point at."""
        state = self._load_state()
        now = self._clock().astimezone(UTC).replace(microsecond=0)
        # compare with the latest clock reading used, not with the window end: a window is at least one second
        # long, so after quick digests its end runs a little ahead of the clock (state without a mark: 60 s slack)
        mark = parse_time(state.clock_mark) if state.clock_mark else parse_time(state.window_start) - \
            timedelta(seconds=60)
        if now >= mark:
            self._clock_behind = False
            return
        if self._clock_behind:
            return
        self._clock_behind = True
        self.clock_skews += 1
        behind = int((mark - now).total_seconds())
        log.warning("audit trail: the clock went backwards: it is %d s behind its last reading (%s); digest "
                    "times stay monotonic, a ClockWentBackwards record is written", behind, format_time(mark))
        self.spool.append(trail_service_event(
            "ClockWentBackwards", event_time=now, event_id=str(uuid.uuid4()), region=self.config.region,
            account_id=self.config.account_id, trail_name=self.config.trail_name,
            details={"lastClockTime": format_time(mark), "lastDigestEndTime": state.window_start,
                     "clockTime": format_time(now), "secondsBehind": behind}))

    def _mark_clock(self, state: _State, now: datetime) -> None:
        """Keep the highest clock reading used (saved with the state by the caller)."""
        text = format_time(now)
        if state.clock_mark is None or parse_time(state.clock_mark) < parse_time(text):
            state.clock_mark = text

    def _digest(self, *, sealed: bool, not_before: datetime | None = None,
                attempts: int = _CONFLICT_ATTEMPTS) -> None:
        state = self._load_state()
        start = parse_time(state.window_start)
        now = self._clock().astimezone(UTC).replace(microsecond=0)
        # a clock that went backwards (see _check_clock): windows never run backwards
        end = max(now, start + timedelta(seconds=1), not_before or start)
        self._mark_clock(state, now)
        key = DigestKey(account_id=self.config.account_id, region=self.config.region,
                        trail_name=self.config.trail_name, home_region=self.config.home, end_time=end,
                        prefix=self.config.prefix).to_key()
        last = state.last_digest
        previous = (last["bucket"], last["key"], last["sha256"], last["signature"]) if last else None
        private = self._signing_key()
        digest = DigestFile.build(account_id=self.config.account_id, start=start, end=end,
                                  bucket=self.destination.bucket, key=key, fingerprint=fingerprint(
                                      private.public_key()),
                                  log_files=[LogFileEntry.from_json(e) for e in state.undigested],
                                  previous=previous)
        signature = sign_digest(private, digest.string_to_sign())
        state.pending_digest = {"content": digest.content.decode(), "signature": signature, "sealed": sealed}
        self._save()
        self._put_digest(digest, signature, sealed, attempts=attempts)

    def _put_digest(self, digest: DigestFile, signature: str, sealed: bool, *,
                    attempts: int = _CONFLICT_ATTEMPTS) -> None:
        state = self._load_state()
        key = digest.digest_s3_object
        try:
            self.destination.put_new(key, digest.to_bytes(),
                                     {"signature": signature, "signature-algorithm": SIGNATURE_ALGORITHM},
                                     retain_until=self._retain_until())
        except AuditHistoryError as exc:
            # permanent: rebuild the same digest (same logs, same link) ending a second later, under a new key
            self._history_conflict(exc)
            if attempts <= 1:
                raise
            self._digest(sealed=sealed, not_before=parse_time(digest.digest_end_time) + timedelta(seconds=1),
                         attempts=attempts - 1)
            return
        head = HeadRecord(key=key, sha256=digest.sha256, signature=signature, end=digest.digest_end_time,
                          sealed=sealed)
        heads_path = self.state_dir / "state" / "heads.jsonl"
        try:
            if not any(h.key == key for h in read_heads(heads_path)[-2:]):
                _append_line(heads_path, json.dumps(head.__dict__, separators=(",", ":")).encode() + b"\n")
        except OSError as exc:
            raise AuditSpoolError(f"cannot append to the head log {heads_path}: {exc.strerror}") from exc
        state.last_digest = {"bucket": digest.digest_s3_bucket, "key": key, "sha256": digest.sha256,
                             "signature": signature, "end": digest.digest_end_time, "sealed": sealed}
        state.window_start = digest.digest_end_time
        state.undigested = []
        state.pending_digest = None
        self._save()
        self.digests_written += 1

    def step(self, *, force_roll: bool = False, force_digest: bool = False) -> None:
        """One delivery round (the thread calls it; tests may too).  Raises store errors."""
        with self._lock:
            if not self._try_hold():
                return
            self._recover()
            self._check_clock()
            state = self._load_state()
            pending = self.spool.pending_bytes(state.cursor)
            if pending:
                now = time.monotonic()
                if self._first_pending is None:
                    self._first_pending = now
                if force_roll or pending >= self.config.max_log_bytes or \
                        now - self._first_pending >= self.config.max_log_age:
                    while self._roll():
                        if not force_roll and self.spool.pending_bytes(self._load_state().cursor) < \
                                self.config.max_log_bytes:
                            break
                    self._first_pending = None
            due = parse_time(state.window_start) + timedelta(seconds=self.config.digest_interval)
            if force_digest or self._clock() >= due:
                self._digest(sealed=False)
            state = self._load_state()
            if state.pending_log is None and self.spool.pending_bytes(state.cursor) == 0 and state.cursor.offset:
                state.cursor = self.spool.compact(state.cursor)
                self._save()

    def flush(self) -> None:
        """Deliver every spooled record now (log files only; the next digest lists them)."""
        self.step(force_roll=True)

    def seal(self) -> bool:
        """Deliver everything and write a sealing digest covering it; False if another process delivers."""
        with self._lock:
            if not self._try_hold(block_for=5.0):
                return False
            self._recover()
            self._check_clock()
            while self._roll():
                pass
            state = self._load_state()
            last = state.last_digest
            if state.undigested or last is None or not last.get("sealed"):
                self._digest(sealed=True)
            return True

    def health(self) -> dict[str, Any]:
        """Delivery health (also kept in ``state/health.json`` for ``audit validate|events``)."""
        return {
            "delivering": self._holder,
            "healthy": self.last_error is None,
            "lastError": f"{type(self.last_error).__name__}: {self.last_error}" if self.last_error else None,
            "lastErrorTime": format_time(self.last_error_time) if self.last_error_time else None,
            "consecutiveFailures": self.consecutive_failures,
            "lastDeliveryTime": format_time(self.last_success_time) if self.last_success_time else None,
            "historyConflicts": self.history_conflicts,
            "lastHistoryConflict": self.last_history_conflict,
            "clockSkews": self.clock_skews,
            "deliveredLogs": self.delivered_logs,
            "digestsWritten": self.digests_written,
        }

    def _write_health(self) -> None:
        """Best effort: the health file must never be what stops delivery."""
        path = self.state_dir / "state" / "health.json"
        try:
            _atomic_write(path, json.dumps(self.health(), indent=2).encode() + b"\n", 0o644)
        except OSError as exc:
            log.warning("audit trail: cannot write %s: %s", path, exc.strerror)

    def _run(self) -> None:
        delay = self.config.poll_interval
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                    if self.last_error is not None:
                        log.warning("audit trail delivery works again after %d failed attempts",
                                    self.consecutive_failures)
                        self.last_error, self.consecutive_failures = None, 0
                        self._write_health()
                    if self._holder:
                        self.last_success_time = self._clock()
                    delay = self.config.poll_interval
                except Exception as exc:  # any failure, ours or not: delivery must never stop for good
                    self.consecutive_failures += 1
                    changed = self.last_error is None or str(exc) != str(self.last_error)
                    self.last_error, self.last_error_time = exc, self._clock()
                    if changed:
                        log.error("audit trail delivery failed: %s: %s (retrying with backoff; events stay in the "
                                  "spool)", type(exc).__name__, exc, exc_info=not isinstance(exc, AuditError))
                        self._write_health()
                    delay = min(max(delay * 2, self.config.retry_initial), self.config.retry_max)
                self._wake.wait(delay)
                self._wake.clear()
        finally:
            if not self._stop.is_set():   # not a clean stop: let another process take over delivery
                log.critical("audit trail delivery thread stopped unexpectedly; releasing deliver.lock")
                with self._lock:
                    if self._holder:
                        fcntl.flock(self._deliver_fd, fcntl.LOCK_UN)
                        self._holder = False

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until the spool is empty (everything is in log files); for tests and shutdown."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._holder and self._state is not None and self._state.pending_log is None \
                        and self.spool.pending_bytes(self._state.cursor) == 0:
                    return True
            time.sleep(0.05)
        return False

    def close(self, *, seal: bool = True) -> None:
        """Stop delivering; with ``seal``, deliver everything and write the final digest first (best effort:
        if the store is unreachable the events stay in the spool and the next start delivers them)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if seal:
                try:
                    self.seal()
                except AuditError as exc:
                    log.error("audit trail: could not seal on shutdown (%s); the spool keeps the events", exc)
        finally:
            self.spool.close()
            if self._holder:
                fcntl.flock(self._deliver_fd, fcntl.LOCK_UN)
                self._holder = False
            os.close(self._deliver_fd)

    def __enter__(self) -> Trail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_records(destination: Destination, prefix: str = "", *, keys: Iterable[str] | None = None,
                 on_error: Callable[[str, Exception], None] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of the log files ``keys`` (default: every log file under ``prefix``), as (log key, record).

    With ``on_error``, a file that cannot be read or parsed is reported to it and skipped; without, it raises.
    """
    if keys is None:
        lead = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        keys = [k for k in destination.list(f"{lead}AWSLogs/") if "/CloudTrail/" in k]
    for key in keys:
        try:
            got = destination.get(key)
            if got is None:
                continue
            records = LogFile.from_bytes(got[0], strict_records=False).records
        except (AuditError, ValueError) as exc:
            if on_error is None:
                raise
            on_error(key, exc)
            continue
        for record in records:
            yield key, record


def read_health(state_dir: Path) -> dict[str, Any] | None:
    """The delivery health a trail's deliverer last wrote (``state/health.json``), or None."""
    try:
        obj = json.loads((Path(state_dir) / "state" / "health.json").read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_pending(state_dir: Path) -> dict[str, str]:
    """Log files delivered but not yet listed by a digest, from the delivery state: {key: SHA-256}."""
    try:
        obj = json.loads((Path(state_dir) / "state" / "delivery.json").read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AuditSpoolError(f"cannot read the delivery state of {state_dir}") from exc
    pending: dict[str, str] = {}
    if not isinstance(obj, dict):
        return pending
    for entry in obj.get("undigested") or []:
        if isinstance(entry, dict) and isinstance(entry.get("s3Object"), str):
            pending[entry["s3Object"]] = str(entry.get("hashValue", ""))
    p = obj.get("pendingLog")
    if isinstance(p, dict) and isinstance(p.get("key"), str):
        pending[p["key"]] = str(p.get("sha256", ""))
    return pending
