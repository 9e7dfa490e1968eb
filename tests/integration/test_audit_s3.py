"""Continuous delivery to a real S3 server (SeaweedFS) that is stopped and restarted in the middle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from audit_support import S3Server, s3_server

from enclavekit.audit.events import runtime_event
from enclavekit.audit.s3 import S3Destination
from enclavekit.audit.trail import Trail, TrailConfig

pytestmark = pytest.mark.integration
ENV = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as srv:
        yield srv


def _event(n: int) -> dict[str, object]:
    return runtime_event("RunEnclave", event_time=datetime.now(UTC), event_id=str(uuid.uuid4()), region="us-east-1",
                         account_id="111122223333", enclave_id=f"i-{n}")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enclavekit.cli.main", *args], check=False, capture_output=True,
                          text=True,
                          env=ENV, timeout=120)


def test_delivery_survives_store_outage(server: S3Server, tmp_path: Path) -> None:
    server.client().create_bucket(Bucket="trail-outage")
    dest = S3Destination("trail-outage", endpoint_url=server.endpoint, client=server.client())
    config = TrailConfig(prefix="org", max_log_age=0.2, poll_interval=0.05, retry_initial=0.1, retry_max=0.5)
    trail = Trail(tmp_path / "state", config=config, destination=dest, destination_url="s3://trail-outage/org")
    sent = []
    for i in range(20):
        e = _event(i)
        trail.append(e)
        sent.append(e["eventID"])
    assert trail.wait_delivered(30)
    server.stop()
    for i in range(20, 60):                      # the store is down: appends still return (spooled, fsync'd)
        e = _event(i)
        trail.append(e)
        sent.append(e["eventID"])
    time.sleep(1.0)
    assert trail.last_error is not None          # delivery is failing and retrying meanwhile
    server.start()
    assert trail.wait_delivered(60)
    trail.close()                                # seals with a final digest

    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="trail-outage", Prefix="org/").get("Contents", [])]
    assert any("/CloudTrail-Digest/" in k for k in keys)
    # the trust anchor: the public key exported once, kept outside the state directory
    exported = _cli("audit", "public-key", "--trail", str(tmp_path / "state"))
    assert exported.returncode == 0, exported.stderr
    (tmp_path / "trail-key.pem").write_text(exported.stdout)
    pinned = ("--public-key", str(tmp_path / "trail-key.pem"))
    got = _cli("audit", "events", "--trail", "s3://trail-outage/org", "--endpoint-url", server.endpoint, "--json",
               *pinned)
    assert got.returncode == 0, got.stderr
    ids = {r["eventID"] for r in json.loads(got.stdout)}
    assert set(sent) <= ids                      # nothing lost during the outage
    no_key = _cli("audit", "events", "--trail", "s3://trail-outage/org", "--endpoint-url", server.endpoint)
    assert no_key.returncode != 0 and "--unverified" in no_key.stderr
    valid = _cli("audit", "validate", "--trail", "s3://trail-outage/org", "--endpoint-url", server.endpoint,
                 "--state", str(tmp_path / "state"), "--verbose", *pinned)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    # keys read from the state directory (beside the private key) are not an anchor: exit 2 with a warning
    unanchored = _cli("audit", "validate", "--trail", "s3://trail-outage/org", "--endpoint-url", server.endpoint,
                      "--state", str(tmp_path / "state"))
    assert unanchored.returncode == 2 and "WARNING: unanchored" in unanchored.stderr
    # the health the deliverer recorded: the outage was seen and is over
    health = json.loads((tmp_path / "state" / "state" / "health.json").read_text())
    assert health["lastError"] is None and health["deliveredLogs"] >= 1

    # tampering in the bucket is detected: overwrite a log file with other content
    log_key = next(k for k in keys if "/CloudTrail/" in k)
    client.put_object(Bucket="trail-outage", Key=log_key, Body=b"\x1f\x8b tampered")
    bad = _cli("audit", "validate", "--trail", "s3://trail-outage/org", "--endpoint-url", server.endpoint,
               "--state", str(tmp_path / "state"), *pinned)
    assert bad.returncode == 1 and "INVALID" in bad.stderr
    # `audit events` skips the tampered file with a warning instead of stopping
    got = _cli("audit", "events", "--trail", "s3://trail-outage/org", "--endpoint-url", server.endpoint, "--json",
               "--state", str(tmp_path / "state"), *pinned)
    assert got.returncode == 0 and "validation problem" in got.stderr, got.stderr
    # a trail directory whose trail.json names the endpoint: no --endpoint-url needed (item 14)
    by_dir = _cli("audit", "validate", "--trail", str(tmp_path / "state"), *pinned)
    assert by_dir.returncode == 1 and "INVALID" in by_dir.stderr, by_dir.stdout + by_dir.stderr


def test_object_lock_and_no_overwrite(server: S3Server, tmp_path: Path) -> None:
    client = server.client()
    client.create_bucket(Bucket="trail-locked", ObjectLockEnabledForBucket=True)
    dest = S3Destination("trail-locked", endpoint_url=server.endpoint, client=client, object_lock_mode="GOVERNANCE")
    with Trail(tmp_path / "state", config=TrailConfig(max_log_age=3600), destination=dest,
               destination_url="s3://trail-locked", deliver=False) as trail:
        trail.append(_event(1))
        trail.flush()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="trail-locked").get("Contents", [])]
    assert keys
    for key in keys:
        head = client.head_object(Bucket="trail-locked", Key=key)
        assert head.get("ObjectLockMode") == "GOVERNANCE"
    from enclavekit.errors import AuditHistoryError
    with pytest.raises(AuditHistoryError):
        dest.put_new(keys[0], b"other bytes")
