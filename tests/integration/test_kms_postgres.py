"""The key store against a real PostgreSQL started by the test (initdb + pg_ctl in a temp dir, unix socket only),
the same contract suite as SQLite, two stores sharing one database, and a SIGKILL mid-load against both stores:
no acknowledged change may be lost.  PostgreSQL missing is a FAILURE, never a skip."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "kms"))

from kms_store_contract import NOW, StoreContract, record
from kms_support import fresh_database, running_postgres

from enclavekit.kms.store import PostgresStore, RootKey, SQLiteStore, StoreError

pytestmark = pytest.mark.integration
ROOT = RootKey(bytes(range(32)))


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@pytest.fixture
def db_url(pg_url: str) -> str:
    return fresh_database(pg_url, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(db_url: str) -> Iterator[PostgresStore]:
    s = PostgresStore(db_url, root_key=ROOT)
    yield s
    s.close()


class TestPostgresStore(StoreContract):
    pass


def test_two_servers_share_one_database(db_url: str) -> None:
    a, b = PostgresStore(db_url, root_key=ROOT), PostgresStore(db_url, root_key=ROOT)
    try:
        a.create_key(record(), b"m" * 32)
        assert b.get_material(record().key_id, 1) == b"m" * 32
        assert a.create_alias("alias/shared", record().key_id, NOW)
        assert not b.create_alias("alias/shared", record().key_id, NOW)
        b.add_material(record().key_id, b"n" * 32, lambda r: r)
        current = a.get_key(record().key_id)
        assert current is not None and current.current_version == 2
        principal, secret = a.create_principal("alice")
        assert b.lookup_principal(principal.access_key_id) == (principal, secret)
        assert a.use_nonce(b"x" * 32, NOW + timedelta(hours=1), NOW)
        assert not b.use_nonce(b"x" * 32, NOW + timedelta(hours=1), NOW)
    finally:
        a.close()
        b.close()


def test_wrong_root_key_is_refused(db_url: str) -> None:
    PostgresStore(db_url, root_key=ROOT).close()
    with pytest.raises(StoreError, match="different root key"):
        PostgresStore(db_url, root_key=RootKey(bytes(32)))


def test_nothing_secret_in_clear(store: PostgresStore, db_url: str) -> None:
    import psycopg

    store.create_key(record(), b"MATERIAL" * 4)
    _, secret = store.create_principal("alice")
    with psycopg.connect(db_url) as conn:
        sealed = conn.execute("SELECT sealed FROM kms_key_material").fetchone()[0]
        sealed_secret = conn.execute("SELECT sealed_secret FROM kms_principals").fetchone()[0]
    assert b"MATERIAL" not in bytes(sealed) and secret.encode() not in bytes(sealed_secret)


def test_unreachable_database_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        PostgresStore(f"postgresql://postgres:hunter2@/postgres?host={tmp_path}", root_key=ROOT)
    assert "hunter2" not in str(info.value)


def test_service_over_postgres(db_url: str, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from enclavekit.attestation.pki import LocalPKI
    from enclavekit.attestation.verifier import TrustRoot
    from enclavekit.kms.service import KMSService
    from enclavekit.kms.types import KMSRequest, Principal

    store = PostgresStore(db_url, root_key=ROOT)
    pki = LocalPKI.open(tmp_path, now=datetime.now(UTC))
    service = KMSService(store, trust_roots=[TrustRoot.from_certificate(pki.root.certificate)],
                         account_id="111122223333", region="us-east-1")
    who = Principal("AKIAALICE00000000000", "arn:aws:iam::111122223333:user/alice", "111122223333", "alice")

    def call(op: str, **params: object) -> dict[str, object]:
        return service.handle(KMSRequest(op, params, who, "r", NOW)).response

    try:
        key_id = call("CreateKey")["KeyMetadata"]["KeyId"]  # type: ignore[index]
        blob = call("Encrypt", KeyId=key_id, Plaintext="aGk=")["CiphertextBlob"]
        call("RotateKeyOnDemand", KeyId=key_id)
        assert call("Decrypt", CiphertextBlob=blob)["Plaintext"] == "aGk="
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- SIGKILL mid-load

_LOADER = textwrap.dedent("""
    import sys, uuid
    from dataclasses import replace
    from datetime import UTC, datetime
    from enclavekit.kms.store import KeyRecord, PostgresStore, RootKey, SQLiteStore
    root = RootKey(bytes(range(32)))
    kind, where = sys.argv[1], sys.argv[2]
    store = SQLiteStore(where, root_key=root) if kind == "sqlite" else PostgresStore(where, root_key=root)
    now = datetime.now(UTC)
    n = 0
    while True:
        key_id = str(uuid.uuid4())
        rec = KeyRecord(key_id=key_id, arn="arn:aws:kms:us-east-1:111122223333:key/" + key_id,
                        account_id="111122223333", created=now, key_spec="SYMMETRIC_DEFAULT",
                        key_usage="ENCRYPT_DECRYPT", policy="{}")
        store.create_key(rec, bytes(32))
        store.modify_key(key_id, lambda r: replace(r, policy='{"v": 2}'))
        print(key_id, flush=True)   # acknowledged only after both changes returned
        n += 1
""")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_sigkill_loses_no_acknowledged_change(kind: str, tmp_path: Path, pg_url: str) -> None:
    where = str(tmp_path / "data") if kind == "sqlite" else fresh_database(pg_url, f"k_{uuid.uuid4().hex[:12]}")
    proc = subprocess.Popen([sys.executable, "-c", _LOADER, kind, where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    acknowledged: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) >= 40:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(acknowledged) >= 40, proc.stderr.read() if proc.stderr else ""
    store = SQLiteStore(Path(where), root_key=ROOT) if kind == "sqlite" else PostgresStore(where, root_key=ROOT)
    try:
        for key_id in acknowledged:
            found = store.get_key(key_id)
            assert found is not None and found.policy == '{"v": 2}', key_id
            assert store.get_material(key_id, 1) == bytes(32)
    finally:
        store.close()
