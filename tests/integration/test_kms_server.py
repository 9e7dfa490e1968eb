"""The ``kms serve`` process itself: raw-HTTP SigV4 tampering, bad input, the audit trail, signals, workers, TLS,
and a SIGKILL in the middle of a load (issue 5: Bad input; items 1, 2, 7, 8).  tests/integration/test_kms_trail.py
covers the trail in depth (workers, attested Decrypt records, S3).
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from kms_support import REGION, KMSServer, assert_trail_valid, trail_events

from enclavekit.kms.sigv4 import sign_request_headers

pytestmark = pytest.mark.integration

PLAINTEXT_MARKER = b"do-not-log-this-plaintext"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KMSServer, dict[str, str]]]:
    base = tmp_path_factory.mktemp("kms-server")
    srv = KMSServer(base / "data", home=base / "home")
    creds = srv.credentials("bob")
    srv.start()
    try:
        yield srv, creds
    finally:
        srv.stop()


def raw(srv: KMSServer, body: bytes, *, target: str | None = "TrentService.ListKeys",
        creds: dict[str, str] | None = None, now: datetime | None = None, region: str = REGION,
        tamper: dict[str, str] | None = None, drop: tuple[str, ...] = (),
        content_length: int | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One raw HTTP request (signed unless ``creds`` is None), optionally altered after signing."""
    hostport = srv.endpoint.split("://", 1)[1]
    headers = {"Host": hostport, "Content-Type": "application/x-amz-json-1.1"}
    if target is not None:
        headers["X-Amz-Target"] = target
    if creds is not None:
        headers = sign_request_headers(url=srv.endpoint + "/", body=body, headers=headers,
                                       access_key_id=creds["AccessKeyId"], secret=creds["SecretAccessKey"],
                                       region=region, now=now or datetime.now(UTC))
    headers.update(tamper or {})
    for name in drop:
        headers.pop(name, None)
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/", skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body) if content_length is None else content_length))
        conn.endheaders()
        conn.send(body)
        response = conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else {}), {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def assert_aws_error(result: tuple[int, dict[str, Any], dict[str, str]], code: str, status: int = 400) -> None:
    got, body, headers = result
    assert (got, body.get("__type")) == (status, code), body
    assert isinstance(body.get("message"), str)
    assert headers["content-type"] == "application/x-amz-json-1.1"
    assert headers["x-amzn-requestid"]


def assert_alive(srv: KMSServer, creds: dict[str, str]) -> None:
    assert srv.proc is not None and srv.proc.poll() is None
    status, body, _ = raw(srv, b"{}", creds=creds)
    assert status == 200 and "Keys" in body


# --------------------------------------------------------------------------------------------- start-up


def test_serve_prints_the_endpoint_and_credentials_have_the_documented_shape(
        server: tuple[KMSServer, dict[str, str]]) -> None:
    srv, creds = server
    assert srv.endpoint.startswith("http://127.0.0.1:")
    assert set(creds) == {"AccessKeyId", "SecretAccessKey", "Arn"}
    assert creds["Arn"] == "arn:aws:iam::111122223333:user/bob"
    assert_alive(srv, creds)


# --------------------------------------------------------------------------------------------- SigV4 over the wire


def test_sigv4_tampering_over_raw_http(server: tuple[KMSServer, dict[str, str]]) -> None:
    srv, creds = server
    body = b"{}"
    assert_aws_error(raw(srv, body), "MissingAuthenticationToken", 403)
    assert_aws_error(raw(srv, body, creds=creds, tamper={"X-Amz-Target": "TrentService.CreateKey"}),
                     "InvalidSignatureException")
    good = sign_request_headers(url=srv.endpoint + "/", body=body, headers={"Host": "x"},
                                access_key_id=creds["AccessKeyId"], secret=creds["SecretAccessKey"], region=REGION,
                                now=datetime.now(UTC))
    sig = good["Authorization"][-64:]
    assert_aws_error(raw(srv, body, creds=creds, tamper={"Authorization": good["Authorization"].replace(
        sig, "0" * 64)}), "InvalidSignatureException")
    assert_aws_error(raw(srv, body, creds=creds, now=datetime.now(UTC) - timedelta(minutes=10)),
                     "InvalidSignatureException")
    _, expired, _ = raw(srv, body, creds=creds, now=datetime.now(UTC) - timedelta(minutes=10))
    assert expired["message"].startswith("Signature expired")
    assert_aws_error(raw(srv, body, creds=dict(creds, AccessKeyId="AKIANOBODYNOBODY0000")),
                     "UnrecognizedClientException")
    assert_aws_error(raw(srv, body, creds=creds, region="eu-west-1"), "InvalidSignatureException")
    assert_aws_error(raw(srv, body, creds=creds, tamper={"Authorization": "AWS4-HMAC-SHA256 Credential=x"}),
                     "IncompleteSignature")
    assert_aws_error(raw(srv, body, creds=creds, drop=("X-Amz-Date",)), "IncompleteSignature")
    assert_alive(srv, creds)


def test_tampered_body_after_signing_is_refused(server: tuple[KMSServer, dict[str, str]]) -> None:
    srv, creds = server
    body = b'{"Limit": 5}'
    headers = sign_request_headers(url=srv.endpoint + "/", body=body,
                                   headers={"Host": srv.endpoint.split("://", 1)[1],
                                            "Content-Type": "application/x-amz-json-1.1",
                                            "X-Amz-Target": "TrentService.ListKeys"},
                                   access_key_id=creds["AccessKeyId"], secret=creds["SecretAccessKey"],
                                   region=REGION, now=datetime.now(UTC))
    assert_aws_error(raw(srv, b'{"Limit": 6}', creds=None, tamper=headers), "InvalidSignatureException")


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_gets_aws_errors_and_the_server_stays_up(server: tuple[KMSServer, dict[str, str]]) -> None:
    srv, creds = server
    client = srv.client(creds)
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    blob = client.encrypt(KeyId=key_id, Plaintext=PLAINTEXT_MARKER, EncryptionContext={"k": "v"})["CiphertextBlob"]

    def call(target: str, body: bytes, **kw: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        return raw(srv, body, target=f"TrentService.{target}", creds=creds, **kw)

    assert_aws_error(call("Encrypt", b'{"KeyId": '), "SerializationException")
    assert_aws_error(call("Encrypt", b"[1, 2]"), "SerializationException")
    assert_aws_error(call("Encrypt", b"\xff\xfe"), "SerializationException")
    assert_aws_error(call("Encrypt", json.dumps({"KeyId": 5, "Plaintext": "aGk="}).encode()),
                     "SerializationException")
    assert_aws_error(call("Encrypt", json.dumps({"KeyId": key_id, "Plaintext": "!!not base64!!"}).encode()),
                     "SerializationException")
    assert_aws_error(call("MakeCoffee", b"{}"), "UnknownOperationException")
    assert_aws_error(raw(srv, b"{}", target="Nonsense", creds=creds), "UnknownOperationException")
    # oversize: refused from Content-Length alone, before the body is read
    assert_aws_error(call("Encrypt", b"{}", content_length=2 << 20), "ValidationException", 413)
    truncated = base64.b64encode(blob[: len(blob) // 2]).decode()
    assert_aws_error(call("Decrypt", json.dumps({"CiphertextBlob": truncated,
                                                 "EncryptionContext": {"k": "v"}}).encode()),
                     "InvalidCiphertextException")
    assert_aws_error(call("Decrypt", json.dumps({"CiphertextBlob": base64.b64encode(blob).decode(),
                                                 "EncryptionContext": {"k": "other"}}).encode()),
                     "InvalidCiphertextException")
    assert_aws_error(call("Decrypt", json.dumps({"CiphertextBlob": base64.b64encode(blob).decode(),
                                                 "EncryptionContext": {"k": "v"},
                                                 "Recipient": {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                                                               "AttestationDocument": "AAAA"}}).encode()),
                     "ValidationException")
    with pytest.raises(ClientError) as too_much:
        client.encrypt(KeyId=key_id, Plaintext=b"x" * 4097)
    assert too_much.value.response["Error"]["Code"] == "ValidationException"
    assert_alive(srv, creds)
    # nothing secret reached the server's output
    stderr = srv.stderr()
    assert creds["SecretAccessKey"] not in stderr
    assert PLAINTEXT_MARKER.decode() not in stderr
    assert base64.b64encode(PLAINTEXT_MARKER).decode() not in stderr


def test_keep_alive_serves_many_requests_on_one_connection(server: tuple[KMSServer, dict[str, str]]) -> None:
    srv, creds = server
    hostport = srv.endpoint.split("://", 1)[1]
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for _ in range(5):
            headers = sign_request_headers(url=srv.endpoint + "/", body=b"{}", headers={
                "Host": hostport, "Content-Type": "application/x-amz-json-1.1",
                "X-Amz-Target": "TrentService.ListKeys"}, access_key_id=creds["AccessKeyId"],
                secret=creds["SecretAccessKey"], region=REGION, now=datetime.now(UTC))
            conn.request("POST", "/", body=b"{}", headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            assert response.getheader("Connection") != "close"
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------- audit, signals


def test_every_request_leaves_one_record_in_the_trail(tmp_path: Path) -> None:
    srv = KMSServer(tmp_path / "data", home=tmp_path / "home")
    creds = srv.credentials("carol")
    with srv:
        client = srv.client(creds)
        key_id = client.create_key()["KeyMetadata"]["KeyId"]
        client.encrypt(KeyId=key_id, Plaintext=b"x")
        with pytest.raises(ClientError):
            client.describe_key(KeyId="alias/none")
        raw(srv, b"{}")                                          # unauthenticated
        raw(srv, b"{}", creds=dict(creds, AccessKeyId="AKIANOBODYNOBODY0000"))
    assert srv.proc is not None and srv.proc.returncode == 0    # SIGTERM: clean exit
    trail = ["--trail", str(tmp_path / "data" / "audit")]
    assert_trail_valid(*trail)                                  # sealed on SIGTERM: every record is covered
    events = trail_events(*trail)
    # `audit events` orders by eventTime (whole seconds), then eventID: compare as a set, not a sequence
    by_kind = {(e["eventName"], e.get("errorCode")): e for e in events}
    assert len(events) == 5
    assert set(by_kind) == {("CreateKey", None), ("Encrypt", None), ("DescribeKey", "NotFoundException"),
                            ("ListKeys", "MissingAuthenticationToken"), ("ListKeys", "UnrecognizedClientException")}
    assert by_kind["CreateKey", None]["userIdentity"]["userName"] == "carol"
    assert by_kind["Encrypt", None]["resources"][0]["type"] == "AWS::KMS::Key"
    assert by_kind["ListKeys", "MissingAuthenticationToken"]["userIdentity"]["type"] == "Unknown"
    assert all(e["eventSource"] == "kms.amazonaws.com" and e["eventType"] == "AwsApiCall" for e in events)
    assert "eA==" not in json.dumps(events)  # base64 of the plaintext "x"
    assert not (tmp_path / "data" / "audit" / "events.jsonl").exists()  # one audit path: the trail


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    srv = KMSServer(tmp_path / "data", home=tmp_path / "home").start()
    assert srv.stop(signal.SIGINT) == 0


def test_workers_share_one_socket_and_one_trail(tmp_path: Path) -> None:
    srv = KMSServer(tmp_path / "data", home=tmp_path / "home", workers=2)
    creds = srv.credentials("dave")
    with srv:
        assert srv.proc is not None
        children = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
        assert len(children) == 2

        def work() -> None:
            client = srv.client(creds)
            for _ in range(10):
                client.generate_random(NumberOfBytes=8)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert srv.proc.returncode == 0
    trail = ["--trail", str(tmp_path / "data" / "audit")]
    assert_trail_valid(*trail)
    assert len(trail_events(*trail, "--event-name", "GenerateRandom")) == 40
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_tls_with_the_local_ca(tmp_path: Path) -> None:
    srv = KMSServer(tmp_path / "data", home=tmp_path / "home", extra=["--tls"])
    creds = srv.credentials("erin")
    with srv:
        assert srv.endpoint.startswith("https://127.0.0.1:")
        ca = srv.info["CABundle"]
        client = boto3.client("kms", endpoint_url=srv.endpoint, region_name=REGION, verify=ca,
                              aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                              config=Config(retries={"max_attempts": 0}))
        assert len(client.generate_random(NumberOfBytes=4)["Plaintext"]) == 4
        # a client that does not trust the CA cannot connect
        hostport = srv.endpoint.split("://", 1)[1]
        host, port = hostport.rsplit(":", 1)
        conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=ssl.create_default_context())
        with pytest.raises(ssl.SSLError):
            conn.request("POST", "/", body=b"{}")
        conn.close()


# --------------------------------------------------------------------------------------------- SIGKILL


def test_sigkill_mid_load_loses_no_acknowledged_change(tmp_path: Path) -> None:
    """Writers create keys, aliases and policies; the server is SIGKILLed mid-load; everything acknowledged is
    there after a restart, and every acknowledged request has its audit event."""
    srv = KMSServer(tmp_path / "data", home=tmp_path / "home")
    creds = srv.credentials("frank")
    srv.start()
    acked_keys: list[str] = []
    acked_aliases: list[tuple[str, str]] = []
    acked_policies: list[tuple[str, str]] = []
    acked_requests: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(n: int) -> None:
        client = srv.client(creds, connect_timeout=2, read_timeout=5)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                out = client.create_key(Description=f"w{n}-{i}")
                key_id = out["KeyMetadata"]["KeyId"]
                with lock:
                    acked_keys.append(key_id)
                    acked_requests.append(out["ResponseMetadata"]["RequestId"])
                alias = f"alias/w{n}-{i}"
                out = client.create_alias(AliasName=alias, TargetKeyId=key_id)
                with lock:
                    acked_aliases.append((alias, key_id))
                    acked_requests.append(out["ResponseMetadata"]["RequestId"])
                sid = f"S{n}x{i}"
                policy = json.dumps({"Version": "2012-10-17", "Statement": [{
                    "Sid": sid, "Effect": "Allow", "Principal": {"AWS": creds["Arn"]}, "Action": "kms:*",
                    "Resource": "*"}]})
                out = client.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy)
                with lock:
                    acked_policies.append((key_id, sid))
                    acked_requests.append(out["ResponseMetadata"]["RequestId"])
            except Exception:
                return  # the server died under us: whatever was not acknowledged may be lost

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            if len(acked_policies) >= 10:
                break
        time.sleep(0.05)
    srv.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    assert len(acked_keys) >= 10

    restarted = KMSServer(tmp_path / "data", home=tmp_path / "home")
    with restarted:
        client = restarted.client(creds)
        for key_id in acked_keys:
            assert client.describe_key(KeyId=key_id)["KeyMetadata"]["KeyId"] == key_id
        for alias, key_id in acked_aliases:
            assert client.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"] == key_id
        for key_id, sid in acked_policies:
            assert json.loads(client.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])[
                "Statement"][0]["Sid"] == sid
    trail = ["--trail", str(tmp_path / "data" / "audit")]
    assert_trail_valid(*trail)                                   # the restart delivered and sealed the spool
    logged = {e["requestID"] for e in trail_events(*trail)}
    assert set(acked_requests) <= logged


def test_tls_with_a_given_certificate_and_key(tmp_path: Path) -> None:
    from enclavekit.kms.server import local_tls_context

    _, ca = local_tls_context(tmp_path / "mine", "127.0.0.1")
    srv = KMSServer(tmp_path / "data", home=tmp_path / "home",
                    extra=["--tls-cert", str(tmp_path / "mine" / "server.pem"),
                           "--tls-key", str(tmp_path / "mine" / "server.key")])
    creds = srv.credentials("gina")
    with srv:
        assert srv.endpoint.startswith("https://")
        assert "CABundle" not in srv.info
        client = boto3.client("kms", endpoint_url=srv.endpoint, region_name=REGION, verify=str(ca),
                              aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                              config=Config(retries={"max_attempts": 0}))
        assert client.list_keys()["Keys"] == []
