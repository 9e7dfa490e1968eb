"""Storage of the KMS: keys and their material versions, aliases, principals (credentials), used nonces.

:class:`KeyStore` is the interface the service and the HTTP shell use; :class:`SQLiteStore` (one data directory,
``kms.sqlite3``) and :class:`PostgresStore` (several ``kms serve`` processes sharing one database) implement it
with the same SQL (:class:`SQLKeyStore`).  Every method that changes something commits before it returns, so an
acknowledged change survives a crash; read-modify-write changes (key state, policy, tags, rotation, aliases,
nonces) run in one transaction holding the key's row lock, so concurrent servers never lose an update.

Secrets at rest: key material and principals' secret access keys are sealed with AES-256-GCM under the **root
key** (:class:`RootKey`), with the row's identity as additional data, so a sealed value copied to another row does
not open.  The root key lives apart from the database: ``ENCLAVEKIT_KMS_ROOT_KEY`` (base64 of 32 bytes) or the
file ``root.key`` (mode 0600) in the data directory, created on first use.  A database sealed under another root
key is refused when the store opens.  The root key is never logged, printed or put in an exception.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import stat
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclavekit.errors import ConfigError, EnclaveKitError
from enclavekit.kms.types import Principal

__all__ = [
    "ROOT_KEY_ENV",
    "RootKey",
    "load_root_key",
    "KeyRecord",
    "AliasRecord",
    "StoreError",
    "KeyStore",
    "SQLKeyStore",
    "principal_arn",
    "DEFAULT_ACCOUNT_ID",
    "SQLiteStore",
    "PostgresStore",
]

ROOT_KEY_ENV = "ENCLAVEKIT_KMS_ROOT_KEY"
DEFAULT_ACCOUNT_ID = "111122223333"
_ROOT_KEY_FILE = "root.key"
_AKID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECRET_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"  # noqa: S105
_NAME = re.compile(r"^[\w+=,.@-]{1,64}$")


class StoreError(EnclaveKitError):
    """The key store failed (database unreachable, damaged, or sealed under another root key)."""

    code = "E88"


# --------------------------------------------------------------------------------------------- root key


class RootKey:
    """The 32-byte key that seals key material and secrets at rest (AES-256-GCM, random 12-byte nonce)."""

    __slots__ = ("_aead", "fingerprint")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("the root key is 32 bytes")
        self._aead = AESGCM(key)
        # identifies the key without revealing it (stored beside sealed data to detect a wrong root key)
        self.fingerprint = hashlib.sha256(b"enclavekit-kms-root-key\0" + key).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"RootKey(fingerprint={self.fingerprint})"

    def seal(self, data: bytes, aad: str) -> bytes:
        nonce = os.urandom(12)
        return b"\x01" + nonce + self._aead.encrypt(nonce, data, aad.encode())

    def open(self, sealed: bytes, aad: str) -> bytes:
        if len(sealed) < 29 or sealed[0] != 1:
            raise StoreError("a sealed value in the key store is malformed")
        try:
            return self._aead.decrypt(sealed[1:13], sealed[13:], aad.encode())
        except InvalidTag:
            raise StoreError("a sealed value in the key store does not open with this root key "
                             "(wrong root key, or the database was altered)") from None


def load_root_key(data_dir: Path | None, environ: Mapping[str, str] | None = None) -> RootKey:
    """The root key from ``ENCLAVEKIT_KMS_ROOT_KEY``, else ``<data_dir>/root.key`` (created 0600 if absent)."""
    env = os.environ if environ is None else environ
    encoded = env.get(ROOT_KEY_ENV, "")
    if encoded:
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise ConfigError(f"{ROOT_KEY_ENV} is not valid base64") from None
        if len(raw) != 32:
            raise ConfigError(f"{ROOT_KEY_ENV} must hold 32 bytes (base64), got {len(raw)}")
        return RootKey(raw)
    if data_dir is None:
        raise ConfigError(f"no root key: set {ROOT_KEY_ENV} (base64 of 32 random bytes) or give a data directory")
    path = data_dir / _ROOT_KEY_FILE
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            dir_fd = os.open(data_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                              "chmod 600 it")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"the root key file {path} cannot be used: {exc.strerror}") from exc
    if len(raw) != 32:
        raise ConfigError(f"{path} must hold exactly 32 bytes, it holds {len(raw)}")
    return RootKey(raw)


# --------------------------------------------------------------------------------------------- records


def _dt(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _undt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True)
class KeyRecord:
    """A KMS key's metadata (no key material)."""

    key_id: str
    arn: str
    account_id: str
    created: datetime
    key_spec: str
    key_usage: str
    policy: str
    description: str = ""
    origin: str = "AWS_KMS"
    state: str = "Enabled"                 # Enabled | Disabled | PendingDeletion
    deletion_date: datetime | None = None
    pending_window_days: int | None = None
    rotation_enabled: bool = False
    rotation_period_days: int | None = None
    next_rotation: datetime | None = None
    on_demand_rotations: int = 0
    last_rotation: datetime | None = None
    current_version: int = 1
    tags: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> str:
        doc = asdict(self)
        for name in ("created", "deletion_date", "next_rotation", "last_rotation"):
            doc[name] = _dt(getattr(self, name))
        doc["tags"] = [list(t) for t in self.tags]
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KeyRecord:
        # parse once per exact text: the row is still read on every lookup (other servers may change it), but an
        # unchanged row maps to the same immutable record
        with _RECORDS_LOCK:
            hit = _RECORDS.get(text)
            if hit is not None:
                _RECORDS.move_to_end(text)
                return hit
        record = cls._parse(text)
        with _RECORDS_LOCK:
            _RECORDS[text] = record
            if len(_RECORDS) > _MAX_CACHED_RECORDS:
                _RECORDS.popitem(last=False)
        return record

    @classmethod
    def _parse(cls, text: str) -> KeyRecord:
        doc = json.loads(text)
        for name in ("created", "deletion_date", "next_rotation", "last_rotation"):
            doc[name] = _undt(doc.get(name))
        doc["tags"] = tuple((k, v) for k, v in doc.get("tags", ()))
        return cls(**doc)


_RECORDS: OrderedDict[str, KeyRecord] = OrderedDict()
_RECORDS_LOCK = threading.Lock()
_MAX_CACHED_RECORDS = 1024


@dataclass(frozen=True)
class AliasRecord:
    name: str            # "alias/…"
    key_id: str
    created: datetime
    updated: datetime


def principal_arn(account_id: str, name: str) -> str:
    return f"arn:aws:iam::{account_id}:user/{name}"


# --------------------------------------------------------------------------------------------- interface


class KeyStore(ABC):
    """What the KMS service and its HTTP shell need from storage.  All methods are thread-safe."""

    root_key: RootKey
    account_id: str

    # keys
    @abstractmethod
    def create_key(self, record: KeyRecord, material: bytes) -> None:
        """Store a new key and its material version 1 (``record.current_version`` must be 1)."""

    @abstractmethod
    def get_key(self, key_id: str) -> KeyRecord | None: ...

    @abstractmethod
    def list_keys(self) -> list[KeyRecord]:
        """All keys, oldest first (stable order for pagination)."""

    @abstractmethod
    def modify_key(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord | None:
        """Atomically replace a key's record by ``change(current)`` under its row lock; None if no such key.
        ``change`` may raise to abort (nothing is written)."""

    @abstractmethod
    def add_material(self, key_id: str, material: bytes,
                     change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord | None:
        """Rotation: store ``material`` as version ``current_version + 1`` and make it current, applying
        ``change`` to the record in the same transaction."""

    @abstractmethod
    def get_material(self, key_id: str, version: int) -> bytes | None: ...

    @abstractmethod
    def delete_key(self, key_id: str) -> None:
        """Remove a key, all its material and its aliases (the end of a deletion window)."""

    # aliases
    @abstractmethod
    def create_alias(self, name: str, key_id: str, now: datetime) -> bool:
        """False if the alias exists already."""

    @abstractmethod
    def update_alias(self, name: str, key_id: str, now: datetime) -> bool:
        """False if there is no such alias."""

    @abstractmethod
    def delete_alias(self, name: str) -> bool: ...

    @abstractmethod
    def get_alias(self, name: str) -> AliasRecord | None: ...

    @abstractmethod
    def list_aliases(self, key_id: str | None = None) -> list[AliasRecord]:
        """Aliases sorted by name, optionally only those of ``key_id``."""

    # principals
    @abstractmethod
    def create_principal(self, name: str, account_id: str | None = None) -> tuple[Principal, str]:
        """New credentials for user ``name`` of ``account_id`` (default: the store's account): (Principal with
        a 20-character ``AKIA…`` id, 40-character secret).
        The secret is stored sealed under the root key (SigV4 verification needs it back)."""

    @abstractmethod
    def lookup_principal(self, access_key_id: str) -> tuple[Principal, str] | None:
        """(Principal, secret access key) of ``access_key_id``, or None."""

    # nonces (single-use attestation documents)
    @abstractmethod
    def use_nonce(self, digest: bytes, expires: datetime, now: datetime) -> bool:
        """Record a nonce digest until ``expires``; False if it is already recorded (a replay)."""

    @abstractmethod
    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------- SQL implementation


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Any = ...) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS kms_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS kms_keys (key_id TEXT PRIMARY KEY, created TEXT NOT NULL, doc TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS kms_key_material (key_id TEXT NOT NULL, version INTEGER NOT NULL, "
    "sealed {blob} NOT NULL, PRIMARY KEY (key_id, version))",
    "CREATE TABLE IF NOT EXISTS kms_aliases (name TEXT PRIMARY KEY, key_id TEXT NOT NULL, created TEXT NOT NULL, "
    "updated TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS kms_principals (access_key_id TEXT PRIMARY KEY, name TEXT NOT NULL, "
    "arn TEXT NOT NULL, account_id TEXT NOT NULL, sealed_secret {blob} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS kms_nonces (digest {blob} PRIMARY KEY, expires TEXT NOT NULL)",
]


class SQLKeyStore(KeyStore):
    """The SQL shared by both back ends; subclasses provide connections and transactions."""

    _blob_type = "BLOB"
    _lock_clause = ""   # " FOR UPDATE" where the database has row locks

    def __init__(self, root_key: RootKey, account_id: str = DEFAULT_ACCOUNT_ID) -> None:
        if not re.fullmatch(r"\d{12}", account_id):
            raise ValueError("account_id is 12 digits")
        self.root_key = root_key
        self.account_id = account_id
        # one connection per thread (the server's workers), all closed by close()
        self._local = threading.local()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()

    def _thread_connection(self, open_connection: Callable[[], Any],
                           usable: Callable[[Any], bool] = lambda conn: True) -> Any:
        """This thread's connection, opened (and remembered for :meth:`close`) the first time or when unusable."""
        conn = getattr(self._local, "conn", None)
        if conn is None or not usable(conn):
            conn = open_connection()
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                with contextlib.suppress(Exception):
                    conn.close()
            self._all.clear()
        self._local = threading.local()

    # ---- subclass hooks
    @abstractmethod
    def _transaction(self, *, write: bool) -> contextlib.AbstractContextManager[_Cursor]: ...

    def _sql(self, sql: str) -> str:
        return sql

    def _exec(self, cur: _Cursor, sql: str, params: tuple[Any, ...] = ()) -> None:
        cur.execute(self._sql(sql), params)

    def _init_schema(self, cur: _Cursor) -> None:
        for statement in _SCHEMA:
            self._exec(cur, statement.format(blob=self._blob_type))
        self._exec(cur, "SELECT value FROM kms_meta WHERE name = %s", ("root_key",))
        row = cur.fetchone()
        if row is None:
            self._exec(cur, "INSERT INTO kms_meta (name, value) VALUES (%s, %s)",
                       ("root_key", self.root_key.fingerprint))
        elif row[0] != self.root_key.fingerprint:
            raise StoreError("the key store was created with a different root key; give the original root key "
                             f"(file root.key or {ROOT_KEY_ENV})")

    # ---- keys
    def create_key(self, record: KeyRecord, material: bytes) -> None:
        if record.current_version != 1:
            raise ValueError("a new key starts at material version 1")
        with self._transaction(write=True) as cur:
            self._exec(cur, "INSERT INTO kms_keys (key_id, created, doc) VALUES (%s, %s, %s)",
                       (record.key_id, record.created.isoformat(), record.to_json()))
            self._insert_material(cur, record.key_id, 1, material)

    def _insert_material(self, cur: _Cursor, key_id: str, version: int, material: bytes) -> None:
        sealed = self.root_key.seal(material, f"key-material:{key_id}:{version}")
        self._exec(cur, "INSERT INTO kms_key_material (key_id, version, sealed) VALUES (%s, %s, %s)",
                   (key_id, version, sealed))

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._transaction(write=False) as cur:
            self._exec(cur, "SELECT doc FROM kms_keys WHERE key_id = %s", (key_id,))
            row = cur.fetchone()
        return None if row is None else KeyRecord.from_json(row[0])

    def list_keys(self) -> list[KeyRecord]:
        with self._transaction(write=False) as cur:
            self._exec(cur, "SELECT doc FROM kms_keys ORDER BY created, key_id")
            rows = cur.fetchall()
        return [KeyRecord.from_json(r[0]) for r in rows]

    def _locked(self, cur: _Cursor, key_id: str) -> KeyRecord | None:
        self._exec(cur, "SELECT doc FROM kms_keys WHERE key_id = %s" + self._lock_clause, (key_id,))  # noqa: S608
        row = cur.fetchone()
        return None if row is None else KeyRecord.from_json(row[0])

    def modify_key(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord | None:
        with self._transaction(write=True) as cur:
            current = self._locked(cur, key_id)
            if current is None:
                return None
            new = change(current)
            if new.key_id != key_id or new.current_version != current.current_version:
                raise ValueError("modify_key may not change the key id or the material version")
            self._exec(cur, "UPDATE kms_keys SET doc = %s WHERE key_id = %s", (new.to_json(), key_id))
            return new

    def add_material(self, key_id: str, material: bytes,
                     change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord | None:
        with self._transaction(write=True) as cur:
            current = self._locked(cur, key_id)
            if current is None:
                return None
            version = current.current_version + 1
            new = replace(change(current), current_version=version)
            self._insert_material(cur, key_id, version, material)
            self._exec(cur, "UPDATE kms_keys SET doc = %s WHERE key_id = %s", (new.to_json(), key_id))
            return new

    def get_material(self, key_id: str, version: int) -> bytes | None:
        with self._transaction(write=False) as cur:
            self._exec(cur, "SELECT sealed FROM kms_key_material WHERE key_id = %s AND version = %s",
                       (key_id, version))
            row = cur.fetchone()
        if row is None:
            return None
        return self.root_key.open(bytes(row[0]), f"key-material:{key_id}:{version}")

    def delete_key(self, key_id: str) -> None:
        with self._transaction(write=True) as cur:
            self._exec(cur, "DELETE FROM kms_aliases WHERE key_id = %s", (key_id,))
            self._exec(cur, "DELETE FROM kms_key_material WHERE key_id = %s", (key_id,))
            self._exec(cur, "DELETE FROM kms_keys WHERE key_id = %s", (key_id,))

    # ---- aliases
    def create_alias(self, name: str, key_id: str, now: datetime) -> bool:
        with self._transaction(write=True) as cur:
            # the primary key makes concurrent creators race safely: exactly one insert succeeds
            self._exec(cur, "INSERT INTO kms_aliases (name, key_id, created, updated) VALUES (%s, %s, %s, %s) "
                       "ON CONFLICT (name) DO NOTHING", (name, key_id, now.isoformat(), now.isoformat()))
            return cur.rowcount == 1

    def update_alias(self, name: str, key_id: str, now: datetime) -> bool:
        with self._transaction(write=True) as cur:
            self._exec(cur, "UPDATE kms_aliases SET key_id = %s, updated = %s WHERE name = %s",
                       (key_id, now.isoformat(), name))
            return cur.rowcount == 1

    def delete_alias(self, name: str) -> bool:
        with self._transaction(write=True) as cur:
            self._exec(cur, "DELETE FROM kms_aliases WHERE name = %s", (name,))
            return cur.rowcount == 1

    @staticmethod
    def _alias(row: Any) -> AliasRecord:
        return AliasRecord(row[0], row[1], datetime.fromisoformat(row[2]), datetime.fromisoformat(row[3]))

    def get_alias(self, name: str) -> AliasRecord | None:
        with self._transaction(write=False) as cur:
            self._exec(cur, "SELECT name, key_id, created, updated FROM kms_aliases WHERE name = %s", (name,))
            row = cur.fetchone()
        return None if row is None else self._alias(row)

    def list_aliases(self, key_id: str | None = None) -> list[AliasRecord]:
        with self._transaction(write=False) as cur:
            if key_id is None:
                self._exec(cur, "SELECT name, key_id, created, updated FROM kms_aliases ORDER BY name")
            else:
                self._exec(cur, "SELECT name, key_id, created, updated FROM kms_aliases WHERE key_id = %s "
                           "ORDER BY name", (key_id,))
            rows = cur.fetchall()
        return [self._alias(r) for r in rows]

    # ---- principals
    def create_principal(self, name: str, account_id: str | None = None) -> tuple[Principal, str]:
        account_id = self.account_id if account_id is None else account_id
        if not _NAME.match(name):
            raise ValueError("a principal name is 1..64 characters of letters, digits and +=,.@_-")
        if not re.fullmatch(r"\d{12}", account_id):
            raise ValueError("account_id is 12 digits")
        access_key_id = "AKIA" + "".join(secrets.choice(_AKID_ALPHABET) for _ in range(16))
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))
        principal = Principal(access_key_id=access_key_id, arn=principal_arn(account_id, name),
                              account_id=account_id, name=name)
        sealed = self.root_key.seal(secret.encode(), f"principal:{access_key_id}")
        with self._transaction(write=True) as cur:
            self._exec(cur, "INSERT INTO kms_principals (access_key_id, name, arn, account_id, sealed_secret) "
                       "VALUES (%s, %s, %s, %s, %s)", (access_key_id, name, principal.arn, account_id, sealed))
        return principal, secret

    def lookup_principal(self, access_key_id: str) -> tuple[Principal, str] | None:
        with self._transaction(write=False) as cur:
            self._exec(cur, "SELECT name, arn, account_id, sealed_secret FROM kms_principals "
                       "WHERE access_key_id = %s", (access_key_id,))
            row = cur.fetchone()
        if row is None:
            return None
        secret = self.root_key.open(bytes(row[3]), f"principal:{access_key_id}").decode()
        return Principal(access_key_id=access_key_id, arn=row[1], account_id=row[2], name=row[0]), secret

    # ---- nonces
    def use_nonce(self, digest: bytes, expires: datetime, now: datetime) -> bool:
        with self._transaction(write=True) as cur:
            self._exec(cur, "DELETE FROM kms_nonces WHERE expires <= %s", (_utc_text(now),))
            self._exec(cur, "INSERT INTO kms_nonces (digest, expires) VALUES (%s, %s) ON CONFLICT (digest) DO NOTHING",
                       (digest, _utc_text(expires)))
            return cur.rowcount == 1


def _utc_text(when: datetime) -> str:
    """Fixed-width UTC text, so that string order is time order in both databases."""
    if when.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------- SQLite

_BUSY_TIMEOUT_S = 30.0


class SQLiteStore(SQLKeyStore):
    """Key store ``<data_dir>/kms.sqlite3`` beside ``<data_dir>/root.key``.

    Durability (issue 5 item 7: a SIGKILL mid-load loses no acknowledged change): WAL journal with
    ``synchronous=FULL``, so a commit is on disk when it returns, and every change commits before the method
    returns.  Each thread gets its own connection; writers take the database lock up front (``BEGIN IMMEDIATE``),
    which makes a read-modify-write transaction atomic without row locks.  ``root_key`` defaults to
    :func:`load_root_key` (environment, else ``root.key`` in ``data_dir``).
    """

    def __init__(self, data_dir: Path, *, root_key: RootKey | None = None,
                 account_id: str = DEFAULT_ACCOUNT_ID) -> None:
        self.data_dir = Path(data_dir)
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the data directory {self.data_dir}: {exc.strerror}") from exc
        super().__init__(root_key if root_key is not None else load_root_key(self.data_dir), account_id)
        self.path = self.data_dir / "kms.sqlite3"
        with self._transaction(write=True) as cur:
            self._init_schema(cur)

    def _sql(self, sql: str) -> str:
        return sql.replace("%s", "?")

    def _connection(self) -> sqlite3.Connection:
        def open_connection() -> sqlite3.Connection:
            try:
                conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the key store {self.path}: {exc}") from exc
            return conn

        conn: sqlite3.Connection = self._thread_connection(open_connection)
        return conn

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[_Cursor]:
        conn = self._connection()
        try:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield cur
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"key store error: {exc}") from exc



# --------------------------------------------------------------------------------------------- PostgreSQL

_SCHEMA_LOCK = 0x656B6B6D73  # advisory lock id for schema creation ("ekkms")


def _psycopg() -> Any:
    try:
        import psycopg  # noqa: PLC0415 - optional dependency, only needed for PostgreSQL
    except ImportError as exc:
        raise StoreError("PostgreSQL support needs psycopg 3: pip install 'psycopg[binary]'") from exc
    return psycopg


class PostgresStore(SQLKeyStore):
    """Key store in the PostgreSQL database at ``url`` (``postgresql://…`` or a libpq conninfo string).

    Several ``kms serve`` processes may share the database.  Each thread gets its own connection (psycopg 3).
    Read-modify-write changes lock the key's row (``SELECT … FOR UPDATE``) in one transaction; alias creation and
    nonce use rely on primary keys (``INSERT … ON CONFLICT DO NOTHING``); the schema is created under a
    transaction-scoped advisory lock so that servers starting together do not collide.  PostgreSQL commits
    durably by default.  The root key is not in the database: pass it, set ``ENCLAVEKIT_KMS_ROOT_KEY`` (all
    servers need the same one), or give ``data_dir`` holding ``root.key``.
    """

    _blob_type = "BYTEA"
    _lock_clause = " FOR UPDATE"

    def __init__(self, url: str, *, root_key: RootKey | None = None, data_dir: Path | None = None,
                 account_id: str = DEFAULT_ACCOUNT_ID) -> None:
        self._pg = _psycopg()
        self.url = url
        super().__init__(root_key if root_key is not None else load_root_key(data_dir), account_id)
        with self._transaction(write=True) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            self._init_schema(cur)

    def _connection(self) -> Any:
        def open_connection() -> Any:
            try:
                return self._pg.connect(self.url, autocommit=True)
            except self._pg.Error as exc:
                # never echo the URL: it may carry a password
                raise StoreError(f"cannot connect to the PostgreSQL key store: {type(exc).__name__}") from exc

        return self._thread_connection(open_connection, usable=lambda conn: not conn.closed)

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[_Cursor]:
        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield cur
        except self._pg.Error as exc:
            raise StoreError(f"key store error: {type(exc).__name__}: {exc.diag.message_primary or ''}") from exc

