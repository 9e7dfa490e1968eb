"""``kms serve`` writes its audit trail (issue 6 item 5): every boto3 request, allowed or denied, is a record; a
SIGTERM seals the trail so that ``enclavekit audit validate`` passes; pre-forked workers share one trail with one
deliverer; a SIGKILL under load loses no acknowledged request's record (the restart delivers and seals it); the
same against a real S3 server (SeaweedFS, tests/integration/audit_support.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_support import S3Server, s3_server
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kms_support import (
    INSTANCE,
    KMSServer,
    assert_trail_valid,
    attestation_document,
    audit_cli,
    pinned_key_args,
    recipient_param,
    trail_events,
)

from enclavekit.audit.trail import LocalDestination, iter_records
from enclavekit.formats.pcr import pcr4_instance_id

pytestmark = pytest.mark.integration

PCR0 = bytes.fromhex("a1" * 48)
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("kms-trail-s3")) as server:
        yield server


def _request_id(exc: ClientError) -> str:
    return str(exc.response["ResponseMetadata"]["RequestId"])


def _deliver_lock_holders(state_dir: Path) -> set[int]:
    """PIDs holding the trail's ``deliver.lock`` flock, from /proc/locks."""
    inode = os.stat(state_dir / "state" / "deliver.lock").st_ino
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:          # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            holders.add(int(fields[4]))
    return holders


def test_sigterm_seals_a_trail_that_records_every_request(tmp_path: Path) -> None:
    """Two pre-forked workers: allowed, denied and unauthenticated requests, an attested Decrypt; SIGTERM; the
    trail validates and lists every request once."""
    srv = KMSServer(tmp_path / "data", home=tmp_path / "home", workers=2, extra=["--digest-interval", "3600"])
    creds = srv.credentials("alice")
    state = tmp_path / "data" / "audit"
    expected: dict[str, str | None] = {}       # requestID -> errorCode
    with srv:
        assert srv.proc is not None
        workers = {int(p) for p in Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()}
        assert len(workers) == 2
        c = srv.client(creds)
        out = c.create_key()
        arn = out["KeyMetadata"]["Arn"]
        expected[out["ResponseMetadata"]["RequestId"]] = None
        policy = {"Version": "2012-10-17", "Statement": [
            {"Sid": "Manage", "Effect": "Allow", "Principal": {"AWS": creds["Arn"]},
             "Action": ["kms:Encrypt", "kms:PutKeyPolicy"], "Resource": "*"},
            {"Sid": "Enclave", "Effect": "Allow", "Principal": {"AWS": creds["Arn"]}, "Action": "kms:Decrypt",
             "Resource": "*", "Condition": {"StringEqualsIgnoreCase": {
                 "kms:RecipientAttestation:ImageSha384": PCR0.hex()}}}]}
        out = c.put_key_policy(KeyId=arn, PolicyName="default", Policy=json.dumps(policy))
        expected[out["ResponseMetadata"]["RequestId"]] = None
        out = c.encrypt(KeyId=arn, Plaintext=b"enclave secret")
        blob = out["CiphertextBlob"]
        expected[out["ResponseMetadata"]["RequestId"]] = None
        enclave_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        spki = enclave_key.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        document = attestation_document(srv.home, spki, PCR0)
        out = c.decrypt(CiphertextBlob=blob, Recipient=recipient_param(document))
        attested_id = out["ResponseMetadata"]["RequestId"]
        expected[attested_id] = None
        with pytest.raises(ClientError) as denied:
            c.decrypt(CiphertextBlob=blob)                      # no Recipient: the policy denies
        expected[_request_id(denied.value)] = "AccessDeniedException"
        with pytest.raises(ClientError) as missing:
            c.describe_key(KeyId="alias/none")
        expected[_request_id(missing.value)] = missing.value.response["Error"]["Code"]
        with pytest.raises(ClientError) as stranger:
            srv.client({"AccessKeyId": "AKIANOBODYNOBODY0000", "SecretAccessKey": "x" * 40}).list_keys()
        expected[_request_id(stranger.value)] = "UnrecognizedClientException"

        # load from several connections, spread over both workers
        def work() -> None:
            client = srv.client(creds)
            for _ in range(10):
                out = client.generate_random(NumberOfBytes=8)
                with lock:
                    expected[out["ResponseMetadata"]["RequestId"]] = None

        lock = threading.Lock()
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # every worker appends to the one spool; exactly one of them holds deliver.lock and delivers
        deadline = time.monotonic() + 10
        while not _deliver_lock_holders(state) and time.monotonic() < deadline:
            time.sleep(0.1)
        holders = _deliver_lock_holders(state)
        assert len(holders) == 1 and holders <= workers
    assert srv.proc.returncode == 0
    assert "Traceback" not in srv.stderr()

    trail = ["--trail", str(state)]
    assert_trail_valid(*trail)                                 # sealed: a final digest covers every log file
    events = trail_events(*trail)
    by_request = {e["requestID"]: e for e in events}
    assert len(by_request) == len(events) == len(expected)      # one record a request, none twice
    assert {rid: e.get("errorCode") for rid, e in by_request.items()} == expected
    recipient = by_request[attested_id]["additionalEventData"]["recipient"]
    assert recipient["attestationDocumentModuleId"].startswith(INSTANCE)
    assert recipient["attestationDocumentEnclaveImageDigest"] == PCR0.hex()
    assert recipient["attestationDocumentEnclavePCR1"] == "11" * 48
    assert recipient["attestationDocumentEnclavePCR2"] == "22" * 48
    assert recipient["attestationDocumentEnclavePCR4"] == pcr4_instance_id(INSTANCE).hex()
    # no record was delivered twice by two workers
    delivered = [r["eventID"] for _key, r in iter_records(LocalDestination(state))]
    assert len(delivered) == len(set(delivered)) == len(expected)
    assert not (state / "events.jsonl").exists()


def _load_until_killed(srv: KMSServer, creds: dict[str, str], *, at_least: int) -> list[str]:
    """Four clients send requests; SIGKILL the server once ``at_least`` were acknowledged; the acknowledged ids."""
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(n: int) -> None:
        client = srv.client(creds, connect_timeout=2, read_timeout=5)
        while not stop.is_set():
            try:
                out: dict[str, Any] = client.generate_random(NumberOfBytes=4) if n % 2 else client.list_keys()
            except Exception:
                return                      # the server died under us: what got no answer may be lost
            with lock:
                acked.append(out["ResponseMetadata"]["RequestId"])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            if len(acked) >= at_least:
                break
        time.sleep(0.02)
    srv.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    with lock:
        return list(acked)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_under_load_then_restart_keeps_every_acknowledged_record(where: str, tmp_path: Path,
                                                                        request: pytest.FixtureRequest) -> None:
    extra: list[str] = []
    trail_args = ["--trail", str(tmp_path / "data" / "audit")]
    env: dict[str, str] = {}
    if where == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        s3.client().create_bucket(Bucket="kms-trail")
        extra = ["--trail", "s3://kms-trail/org", "--audit-endpoint-url", s3.endpoint]
        trail_args = ["--trail", "s3://kms-trail/org", "--endpoint-url", s3.endpoint,
                      "--state", str(tmp_path / "data" / "audit")]
        env = S3_ENV
    srv = KMSServer(tmp_path / "data", home=tmp_path / "home", extra=extra, env=env)
    creds = srv.credentials("bob")
    srv.start()
    acked = _load_until_killed(srv, creds, at_least=60)
    assert len(acked) >= 60

    restarted = KMSServer(tmp_path / "data", home=tmp_path / "home", extra=extra, env=env)
    with restarted:
        with pytest.raises(ClientError) as denied:
            restarted.client(creds).describe_key(KeyId="alias/none")
        after = _request_id(denied.value)
        after_code = denied.value.response["Error"]["Code"]
    assert restarted.proc is not None and restarted.proc.returncode == 0
    assert_trail_valid(*trail_args, env=env)       # the restart delivered the spool and sealed the chain
    events = trail_events(*trail_args, env=env)
    logged = {e["requestID"]: e for e in events}
    assert set(acked) <= set(logged)
    assert logged[after]["errorCode"] == after_code
    if where == "s3":
        keys = [o["Key"] for o in request.getfixturevalue("s3").client().list_objects_v2(
            Bucket="kms-trail", Prefix="org/AWSLogs/").get("Contents", [])]
        assert any("/CloudTrail-Digest/" in k for k in keys) and any("/CloudTrail/" in k for k in keys)
        assert not (tmp_path / "data" / "audit" / "AWSLogs").exists()    # nothing delivered locally


def test_trail_options_are_checked(tmp_path: Path) -> None:
    for extra, message in ((["--digest-interval", "0"], "positive number of seconds"),
                           (["--trail", "s3://x"], "bucket names are 3-63 characters"),
                           (["--audit-endpoint-url", "http://127.0.0.1:1"], "goes with --trail s3://")):
        srv = KMSServer(tmp_path / "data", home=tmp_path / "home", extra=extra)
        with pytest.raises(AssertionError, match="did not start"):
            srv.start(timeout=30)
        assert message in srv.stderr(), srv.stderr()


def test_two_named_trails_share_one_prefix(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """``kms serve --trail-name``: two servers deliver to one bucket prefix; each trail validates on its own chain
    (the head log of one says nothing about the other)."""
    s3: S3Server = request.getfixturevalue("s3")
    s3.client().create_bucket(Bucket="kms-shared")
    trails: dict[str, list[str]] = {}
    for name in ("kms-east", "kms-west"):
        data = tmp_path / name
        srv = KMSServer(data, home=tmp_path / "home", env=S3_ENV,
                        extra=["--trail", "s3://kms-shared/org", "--audit-endpoint-url", s3.endpoint,
                               "--trail-name", name])
        creds = srv.credentials("carol")
        with srv:
            srv.client(creds).list_keys()
        assert srv.proc is not None and srv.proc.returncode == 0
        trails[name] = ["--trail", "s3://kms-shared/org", "--endpoint-url", s3.endpoint, "--state",
                        str(data / "audit")]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="kms-shared", Prefix="org/").get("Contents", [])]
    assert any("_CloudTrail-Digest_us-east-1_kms-east_" in k for k in keys)
    assert any("_CloudTrail-Digest_us-east-1_kms-west_" in k for k in keys)
    for _name, args in trails.items():
        assert_trail_valid(*args, env=S3_ENV)          # trail.json's trailName selects the chain
    # validating every chain with one trail's key and head log: the other chain is not ours to verify
    east = trails["kms-east"]
    out = audit_cli("validate", *east, *pinned_key_args(*east, env=S3_ENV), "--trail-name", "kms-west",
                    env=S3_ENV)
    assert out.returncode == 1 and "public key not found" in out.stderr, out.stdout + out.stderr
