"""The SQLite key store (the shared contract) and the root key: file mode, environment, wrong key, nothing in
clear at rest."""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from kms_store_contract import NOW, StoreContract, record

from enclavekit.errors import ConfigError
from enclavekit.kms.store import ROOT_KEY_ENV, KeyRecord, RootKey, SQLiteStore, StoreError, load_root_key


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "data", root_key=RootKey(os.urandom(32)))
    yield s
    s.close()


class TestSQLiteStore(StoreContract):
    pass


def test_sqlite_is_wal_and_synchronous_full(store: SQLiteStore) -> None:
    conn = store._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_changes_survive_reopen(tmp_path: Path) -> None:
    root = RootKey(os.urandom(32))
    first = SQLiteStore(tmp_path, root_key=root)
    first.create_key(record(), b"k" * 32)
    first.create_alias("alias/x", record().key_id, NOW)
    first.close()
    second = SQLiteStore(tmp_path, root_key=root)
    try:
        assert second.get_key(record().key_id) == record()
        assert second.get_material(record().key_id, 1) == b"k" * 32
        assert second.get_alias("alias/x") is not None
    finally:
        second.close()


def test_root_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    key = load_root_key(tmp_path / "d", environ={})
    path = tmp_path / "d" / "root.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    assert load_root_key(tmp_path / "d", environ={}).fingerprint == key.fingerprint
    assert path.read_bytes().hex() not in repr(key)


def test_root_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_root_key(tmp_path, environ={})
    (tmp_path / "root.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_root_key(tmp_path, environ={})


def test_root_key_file_of_wrong_size_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "root.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"short")
    os.close(fd)
    with pytest.raises(ConfigError, match="32 bytes"):
        load_root_key(tmp_path, environ={})


def test_root_key_from_environment(tmp_path: Path) -> None:
    raw = os.urandom(32)
    key = load_root_key(tmp_path, environ={ROOT_KEY_ENV: base64.b64encode(raw).decode()})
    assert key.fingerprint == RootKey(raw).fingerprint
    assert not (tmp_path / "root.key").exists()
    with pytest.raises(ConfigError):
        load_root_key(tmp_path, environ={ROOT_KEY_ENV: "not base64!"})
    with pytest.raises(ConfigError):
        load_root_key(tmp_path, environ={ROOT_KEY_ENV: base64.b64encode(b"short").decode()})
    with pytest.raises(ConfigError):
        load_root_key(None, environ={})


def test_store_defaults_to_root_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROOT_KEY_ENV, raising=False)
    store = SQLiteStore(tmp_path)
    store.close()
    assert (tmp_path / "root.key").exists()


def test_wrong_root_key_is_refused(tmp_path: Path) -> None:
    SQLiteStore(tmp_path, root_key=RootKey(os.urandom(32))).close()
    with pytest.raises(StoreError, match="different root key"):
        SQLiteStore(tmp_path, root_key=RootKey(os.urandom(32)))


def test_nothing_secret_in_clear_at_rest(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path, root_key=RootKey(os.urandom(32)))
    material = b"MATERIAL" * 4
    store.create_key(record(), material)
    principal, secret = store.create_principal("alice")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("kms.sqlite3"))
    assert material not in raw and secret.encode() not in raw
    assert principal.access_key_id.encode() in raw  # identifiers are not secret


def test_sealed_values_are_bound_to_their_row(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path, root_key=RootKey(os.urandom(32)))
    try:
        store.create_key(record(), b"1" * 32)
        store.add_material(record().key_id, b"2" * 32, lambda r: r)
        conn = sqlite3.connect(tmp_path / "kms.sqlite3")
        v1 = conn.execute("SELECT sealed FROM kms_key_material WHERE version = 1").fetchone()[0]
        conn.execute("UPDATE kms_key_material SET sealed = ? WHERE version = 2", (v1,))
        conn.commit()
        conn.close()
        with pytest.raises(StoreError):
            store.get_material(record().key_id, 2)
    finally:
        store.close()


def test_root_key_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        RootKey(b"short")
    key = RootKey(os.urandom(32))
    with pytest.raises(StoreError):
        key.open(b"\x02" + bytes(40), "x")
    assert key.open(key.seal(b"data", "aad"), "aad") == b"data"
    with pytest.raises(StoreError):
        key.open(key.seal(b"data", "aad"), "other")


def test_key_record_json_round_trip() -> None:
    rec = record(tags=(("a", "b"),), next_rotation=NOW, rotation_enabled=True, rotation_period_days=90)
    assert KeyRecord.from_json(rec.to_json()) == rec
