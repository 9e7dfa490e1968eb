"""KMS server throughput, in one run: Decrypt with Recipient vs. the raw crypto floor, Encrypt+Decrypt vs. moto.

* **Decrypt with Recipient** requests/s against a real ``enclavekit kms serve`` (``--workers`` processes), driven
  by ``--clients`` client processes over keep-alive HTTP/1.1 with SigV4, vs. the raw crypto floor measured in the
  same run on one core: one P-384 ECDSA verification (the attestation document) + one RSA-2048 OAEP-SHA-256
  encryption (the CMS key transport) + AES-256-GCM decrypt (the ciphertext blob) + AES-256-CBC (the CMS content)
  per request.  Target ratio >= 0.3.
* **Encrypt+Decrypt** requests/s against ``enclavekit kms serve`` vs. ``moto_server`` on the same machine with the
  same clients.  Target ratio >= 3.
* p50 / p99 latency of every load.

The clients sign with their own small SigV4 implementation (hmac/hashlib, signing key cached per day) so that
client cost stays low; the server checks every signature with botocore's signer.  The attestation document and its
RSA key are made once, before any timed loop (a real client has them ready too); the server still verifies the
whole document on every request.  Server and clients share the machine's cores, for both servers alike, so the
ratios include the clients' CPU.

Run: ``.venv/bin/python benchmarks/kms.py [--seconds 5] [--clients 3] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

REGION = "us-east-1"
_SCRIPT = Path(sys.executable).with_name("enclavekit")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "enclavekit.cli.main"]


# --------------------------------------------------------------------------------------------- client


class Signer:
    """Minimal SigV4 for POST / with content-type, host, x-amz-date, x-amz-target signed."""

    def __init__(self, akid: str, secret: str, host: str) -> None:
        self.akid, self.secret, self.host = akid, secret, host
        self._day = ""
        self._key = b""

    def headers(self, target: str, body: bytes) -> dict[str, str]:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        if day != self._day:
            k = hmac.new(f"AWS4{self.secret}".encode(), day.encode(), hashlib.sha256).digest()
            for part in (REGION, "kms", "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._day, self._key = day, k
        ctype = "application/x-amz-json-1.1"
        canonical = "\n".join([
            "POST", "/", "",
            f"content-type:{ctype}\nhost:{self.host}\nx-amz-date:{stamp}\nx-amz-target:{target}\n",
            "content-type;host;x-amz-date;x-amz-target", hashlib.sha256(body).hexdigest()])
        scope = f"{day}/{REGION}/kms/aws4_request"
        sts = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        sig = hmac.new(self._key, sts.encode(), hashlib.sha256).hexdigest()
        return {"Content-Type": ctype, "Host": self.host, "X-Amz-Date": stamp, "X-Amz-Target": target,
                "Authorization": f"AWS4-HMAC-SHA256 Credential={self.akid}/{scope}, "
                                 f"SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature={sig}"}


class Client:
    def __init__(self, endpoint: str, akid: str, secret: str) -> None:
        hostport = endpoint.split("://", 1)[1]
        host, port = hostport.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.signer = Signer(akid, secret, hostport)

    def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(params).encode()
        self.conn.request("POST", "/", body=body, headers=self.signer.headers(f"TrentService.{operation}", body))
        response = self.conn.getresponse()
        data = response.read()
        result: dict[str, Any] = json.loads(data) if data else {}
        if response.status != 200:
            raise RuntimeError(f"{operation}: HTTP {response.status} {result}")
        return result


def _load_worker(endpoint: str, creds: tuple[str, str], kind: str, payload: dict[str, Any],  # noqa: PLR0917
                 seconds: float, start_at: float, threads: int, out: Any) -> None:
    import threading

    results: list[list[float]] = [[] for _ in range(threads)]

    def run(index: int) -> None:
        client = Client(endpoint, *creds)
        step = _steps(kind, payload)
        for _ in range(5):  # warm-up: connection, caches
            step(client)
        while time.time() < start_at:
            time.sleep(0.001)
        latencies = results[index]
        deadline = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            n = step(client)
            t1 = time.perf_counter()
            latencies.extend([(t1 - t0) / n] * n)
            if t1 >= deadline:
                break

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put([x for r in results for x in r])


def _steps(kind: str, payload: dict[str, Any]) -> Callable[[Client], int]:
    if kind == "recipient":
        def recipient(c: Client) -> int:
            r = c.call("Decrypt", payload["decrypt"])
            assert "CiphertextForRecipient" in r and "Plaintext" not in r
            return 1
        return recipient

    def encrypt_decrypt(c: Client) -> int:
        r = c.call("Encrypt", {"KeyId": payload["key_id"], "Plaintext": payload["plaintext"]})
        c.call("Decrypt", {"CiphertextBlob": r["CiphertextBlob"], "KeyId": payload["key_id"]})
        return 2
    return encrypt_decrypt


def load(endpoint: str, creds: tuple[str, str], kind: str, payload: dict[str, Any], *, clients: int,
         seconds: float, threads: int = 1) -> dict[str, float]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.5
    procs = [ctx.Process(target=_load_worker, args=(endpoint, creds, kind, payload, seconds, start_at, threads, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    lat: list[float] = []
    for _ in procs:
        lat.extend(out.get(timeout=seconds + 120))
    for p in procs:
        p.join()
    lat.sort()
    return {"requests_per_s": len(lat) / seconds, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], "requests": len(lat)}


# --------------------------------------------------------------------------------------------- floor


def crypto_floor(document: bytes, seconds: float) -> float:
    """One P-384 verify + one RSA-2048 OAEP-SHA-256 encryption + AES-GCM + AES-CBC, per 'request', one core."""
    ec_key = ec.generate_private_key(ec.SECP384R1())
    message = document[:-96] if len(document) > 200 else document
    signature = ec_key.sign(message, ec.ECDSA(hashes.SHA384()))
    pub = ec_key.public_key()
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    gcm_key = os.urandom(32)
    nonce = os.urandom(12)
    blob = AESGCM(gcm_key).encrypt(nonce, b"x" * 32, b"aad")

    def one() -> None:
        pub.verify(signature, message, ec.ECDSA(hashes.SHA384()))
        AESGCM(gcm_key).decrypt(nonce, blob, b"aad")
        cek, iv = os.urandom(32), os.urandom(16)
        rsa_pub.encrypt(cek, oaep)
        enc = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
        enc.update(b"x" * 48)
        enc.finalize()

    for _ in range(20):
        one()
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            one()
        n += 20
        if time.perf_counter() - start >= seconds:
            return n / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_kms(data: Path, env: dict[str, str], workers: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([*CLI, "kms", "serve", "--port", "0", "--workers", str(workers), "--data-dir",
                             str(data)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("kms serve did not start")
    return proc, json.loads(line)["Endpoint"]


def start_moto(port: int) -> subprocess.Popen[bytes]:
    moto = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("moto_server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load")
    parser.add_argument("--clients", type=int, default=3, help="client processes (2-4)")
    parser.add_argument("--workers", type=int, default=2, help="kms serve --workers")
    parser.add_argument("--threads", type=int, default=4,
                        help="connections per client process for the Encrypt+Decrypt comparison (both servers)")
    args = parser.parse_args()

    from enclavekit.attestation.issuer import DocumentIssuer
    from enclavekit.attestation.pki import LocalPKI
    from enclavekit.formats.pcr import pcr4_instance_id

    base = Path(tempfile.mkdtemp(prefix="ek-kms-bench-"))
    env = {**os.environ, "ENCLAVEKIT_HOME": str(base / "home")}
    os.environ["ENCLAVEKIT_HOME"] = env["ENCLAVEKIT_HOME"]
    procs: list[subprocess.Popen[Any]] = []
    try:
        creds_out = subprocess.run([*CLI, "kms", "create-credentials", "--name", "bench", "--data-dir",
                                    str(base / "kms")], check=True, capture_output=True, text=True, env=env)
        creds = json.loads(creds_out.stdout)
        akid, secret = creds["AccessKeyId"], creds["SecretAccessKey"]
        kms, endpoint = start_kms(base / "kms", env, args.workers)
        procs.append(kms)
        c = Client(endpoint, akid, secret)
        key_id = c.call("CreateKey", {})["KeyMetadata"]["KeyId"]
        plaintext = base64.b64encode(os.urandom(32)).decode()
        blob = c.call("Encrypt", {"KeyId": key_id, "Plaintext": plaintext})["CiphertextBlob"]

        now = datetime.now(UTC)
        pki = LocalPKI.open(Path(env["ENCLAVEKIT_HOME"]), now=now)
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        spki = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        instance = "i-0123456789abcdef0"
        pcrs = {i: b"\x00" * 48 for i in range(16)}
        pcrs.update({0: os.urandom(48), 1: os.urandom(48), 2: os.urandom(48), 4: pcr4_instance_id(instance)})
        document = DocumentIssuer(pki).issue(module_id=f"{instance}-enc0199546b533fd5d0",
                                             timestamp_ms=int(now.timestamp() * 1000), pcrs=pcrs,
                                             public_key=spki, user_data=None, nonce=None)
        recipient = {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                     "AttestationDocument": base64.b64encode(document).decode()}
        c.call("Decrypt", {"CiphertextBlob": blob, "Recipient": recipient})  # sanity

        print(f"machine: {os.cpu_count()} CPUs; kms serve --workers {args.workers}; {args.clients} client "
              f"processes (Recipient: 1 connection each; Encrypt+Decrypt: {args.threads} each); "
              f"{args.seconds:.0f} s per load")
        floor = crypto_floor(document, min(args.seconds, 3.0))
        print(f"raw crypto floor (P-384 verify + RSA-OAEP encrypt + AES, one core): {floor:8.1f} /s")
        rec = load(endpoint, (akid, secret), "recipient",
                   {"decrypt": {"CiphertextBlob": blob, "Recipient": recipient}},
                   clients=args.clients, seconds=args.seconds)
        print(f"Decrypt with Recipient:  {rec['requests_per_s']:8.1f} req/s  p50 {rec['p50_ms']:.2f} ms  "
              f"p99 {rec['p99_ms']:.2f} ms   ratio to floor {rec['requests_per_s'] / floor:.2f} (target >= 0.3)")
        ours = load(endpoint, (akid, secret), "encdec", {"key_id": key_id, "plaintext": plaintext},
                    clients=args.clients, seconds=args.seconds, threads=args.threads)
        print(f"enclavekit Encrypt+Decrypt: {ours['requests_per_s']:8.1f} req/s  p50 {ours['p50_ms']:.2f} ms  "
              f"p99 {ours['p99_ms']:.2f} ms")
        kms.send_signal(signal.SIGTERM)
        kms.wait(30)

        port = free_port()
        moto = start_moto(port)
        procs.append(moto)
        m = Client(f"http://127.0.0.1:{port}", "AKIAMOTOBENCH0000001", "secret")
        moto_key = m.call("CreateKey", {})["KeyMetadata"]["KeyId"]
        theirs = load(f"http://127.0.0.1:{port}", ("AKIAMOTOBENCH0000001", "secret"), "encdec",
                      {"key_id": moto_key, "plaintext": plaintext}, clients=args.clients, seconds=args.seconds,
                      threads=args.threads)
        print(f"moto_server Encrypt+Decrypt: {theirs['requests_per_s']:8.1f} req/s  p50 {theirs['p50_ms']:.2f} ms"
              f"  p99 {theirs['p99_ms']:.2f} ms")
        print(f"ratio enclavekit / moto: {ours['requests_per_s'] / theirs['requests_per_s']:.2f} (target >= 3)")
        print(json.dumps({"floor_per_s": floor, "recipient": rec, "encrypt_decrypt": ours, "moto": theirs}))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
