"""The key-store contract: one suite, run against SQLite (tests/unit/kms/test_kms_store.py) and PostgreSQL
(tests/integration/test_kms_postgres.py).  A subclass provides the ``store`` fixture."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from enclavekit.kms.store import KeyRecord, KeyStore, StoreError

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ACCOUNT = "111122223333"


def record(key_id: str = "1234abcd-12ab-34cd-56ef-1234567890ab", **kw: object) -> KeyRecord:
    base = KeyRecord(key_id=key_id, arn=f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id}", account_id=ACCOUNT,
                     created=NOW, key_spec="SYMMETRIC_DEFAULT", key_usage="ENCRYPT_DECRYPT", policy="{}")
    return replace(base, **kw)  # type: ignore[arg-type]


def key_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


class StoreContract:
    def test_key_round_trip(self, store: KeyStore) -> None:
        rec = record(tags=(("a", "1"),), description="d", deletion_date=NOW + timedelta(days=7))
        store.create_key(rec, b"m" * 32)
        assert store.get_key(rec.key_id) == rec
        assert store.get_material(rec.key_id, 1) == b"m" * 32
        assert store.get_material(rec.key_id, 2) is None
        assert store.get_key(key_id(9)) is None

    def test_duplicate_key_fails(self, store: KeyStore) -> None:
        store.create_key(record(), b"m" * 32)
        with pytest.raises(StoreError):
            store.create_key(record(), b"m" * 32)

    def test_list_keys_oldest_first(self, store: KeyStore) -> None:
        for i in (3, 1, 2):
            store.create_key(record(key_id(i), created=NOW + timedelta(seconds=i)), b"m" * 32)
        assert [r.key_id for r in store.list_keys()] == [key_id(1), key_id(2), key_id(3)]

    def test_modify_key(self, store: KeyStore) -> None:
        store.create_key(record(), b"m" * 32)
        new = store.modify_key(record().key_id, lambda r: replace(r, state="Disabled"))
        assert new is not None and new.state == "Disabled"
        assert store.get_key(record().key_id) == new
        assert store.modify_key(key_id(9), lambda r: r) is None

    def test_modify_key_aborts_on_exception(self, store: KeyStore) -> None:
        store.create_key(record(), b"m" * 32)

        def boom(r: KeyRecord) -> KeyRecord:
            raise LookupError("abort")

        with pytest.raises(LookupError):
            store.modify_key(record().key_id, boom)
        assert store.get_key(record().key_id) == record()

    def test_modify_key_may_not_change_identity(self, store: KeyStore) -> None:
        store.create_key(record(), b"m" * 32)
        with pytest.raises(ValueError):
            store.modify_key(record().key_id, lambda r: replace(r, current_version=5))

    def test_add_material(self, store: KeyStore) -> None:
        store.create_key(record(), b"1" * 32)
        new = store.add_material(record().key_id, b"2" * 32, lambda r: replace(r, on_demand_rotations=1))
        assert new is not None and new.current_version == 2 and new.on_demand_rotations == 1
        assert store.get_material(record().key_id, 1) == b"1" * 32
        assert store.get_material(record().key_id, 2) == b"2" * 32
        assert store.add_material(key_id(9), b"x" * 32, lambda r: r) is None

    def test_concurrent_rotations_never_lose_a_version(self, store: KeyStore) -> None:
        store.create_key(record(), b"0" * 32)
        errors: list[BaseException] = []

        def rotate(n: int) -> None:
            try:
                for _ in range(5):
                    store.add_material(record().key_id, bytes([n]) * 32, lambda r: r)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=rotate, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        current = store.get_key(record().key_id)
        assert current is not None and current.current_version == 21
        assert all(store.get_material(record().key_id, v) is not None for v in range(1, 22))

    def test_concurrent_modifications_are_serialized(self, store: KeyStore) -> None:
        store.create_key(record(), b"0" * 32)

        def bump() -> None:
            for _ in range(10):
                store.modify_key(record().key_id, lambda r: replace(r, on_demand_rotations=r.on_demand_rotations + 1))

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        current = store.get_key(record().key_id)
        assert current is not None and current.on_demand_rotations == 40

    def test_delete_key_removes_material_and_aliases(self, store: KeyStore) -> None:
        store.create_key(record(), b"m" * 32)
        store.create_alias("alias/a", record().key_id, NOW)
        store.delete_key(record().key_id)
        assert store.get_key(record().key_id) is None
        assert store.get_material(record().key_id, 1) is None
        assert store.get_alias("alias/a") is None

    def test_aliases(self, store: KeyStore) -> None:
        assert store.create_alias("alias/b", key_id(1), NOW)
        assert store.create_alias("alias/a", key_id(2), NOW)
        assert not store.create_alias("alias/a", key_id(1), NOW)
        assert [a.name for a in store.list_aliases()] == ["alias/a", "alias/b"]
        assert [a.name for a in store.list_aliases(key_id(1))] == ["alias/b"]
        later = NOW + timedelta(hours=1)
        assert store.update_alias("alias/a", key_id(3), later)
        alias = store.get_alias("alias/a")
        assert alias is not None and alias.key_id == key_id(3) and alias.updated == later and alias.created == NOW
        assert not store.update_alias("alias/zzz", key_id(3), later)
        assert store.delete_alias("alias/a") and not store.delete_alias("alias/a")

    def test_concurrent_alias_creation_has_one_winner(self, store: KeyStore) -> None:
        results: list[bool] = []
        lock = threading.Lock()

        def create(n: int) -> None:
            ok = store.create_alias("alias/race", key_id(n), NOW)
            with lock:
                results.append(ok)

        threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 5 + [True]

    def test_principals(self, store: KeyStore) -> None:
        principal, secret = store.create_principal("alice")
        assert principal.access_key_id.startswith("AKIA") and len(principal.access_key_id) == 20
        assert len(secret) == 40
        assert principal.arn == f"arn:aws:iam::{store.account_id}:user/alice"
        assert store.lookup_principal(principal.access_key_id) == (principal, secret)
        assert store.lookup_principal("AKIANOTTHERE00000000") is None
        other, _ = store.create_principal("bob", "999988887777")
        assert other.account_id == "999988887777"
        with pytest.raises(ValueError):
            store.create_principal("bad name!")

    def test_nonces(self, store: KeyStore) -> None:
        digest = b"d" * 32
        assert store.use_nonce(digest, NOW + timedelta(hours=3), NOW)
        assert not store.use_nonce(digest, NOW + timedelta(hours=3), NOW + timedelta(hours=1))
        # after its expiry the record is purged (the document itself no longer verifies by then)
        assert store.use_nonce(digest, NOW + timedelta(hours=7), NOW + timedelta(hours=4))

    def test_concurrent_nonce_use_has_one_winner(self, store: KeyStore) -> None:
        results: list[bool] = []
        lock = threading.Lock()

        def use() -> None:
            ok = store.use_nonce(b"n" * 32, NOW + timedelta(hours=1), NOW)
            with lock:
                results.append(ok)

        threads = [threading.Thread(target=use) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 5 + [True]
