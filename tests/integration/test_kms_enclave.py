"""An enclave decrypts through vsock-proxy only when its PCR0 matches the key policy (issue 5, "Real clients").

Everything is real: ``enclavekit kms serve`` on 127.0.0.1 (its own data directory), credentials from
``kms create-credentials``, a key created and a secret encrypted with boto3, ``enclavekit vsock-proxy`` forwarding
(3, 8000) to the KMS port with an allow-list naming it, and Python enclave images (``enclavekit.runtime.pyroot``)
started with ``run-enclave``.  The application inside connects to the parent on (3, 7200), receives a job (the
credentials and the ciphertext), decrypts with ``enclavekit.sdk.kms`` or ``enclavekit kmstool decrypt`` and sends
the outcome back.  The key policy allows kms:Decrypt only for kms:RecipientAttestation:ImageSha384 = the image's
PCR0 (StringEqualsIgnoreCase), so:

* the image itself decrypts (SDK and kmstool);
* the same application with one byte changed (another PCR0) is denied, and the denial names the condition;
* the right image in --debug-mode (PCR0 reads as zeros) is denied;
* the parent itself (same credentials, no attestation) can neither Decrypt nor ReEncrypt the secret to a key of
  its own (issue 7: a policy excluding only kms:Decrypt would have allowed kms:ReEncryptFrom).

Clean-up: ``terminate-enclave --all``, then the proxy and the KMS are stopped by PID.  Needs root (the sandbox);
without it the test FAILS.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from kms_support import KMSServer

from enclavekit.quickstart import enclave_key_policy
from enclavekit.sdk import vsock
from enclavekit.vsock.transport import UnixVsockTransport

pytestmark = pytest.mark.integration

ENCLAVEKIT = str(Path(sys.executable).with_name("enclavekit"))
JOB_PORT = 7200
PROXY_PORT = 8000
SECRET = b"attested secret: the launch code is 0000"

APP = '''
"""Runs INSIDE an enclave: fetch a job from the parent, decrypt with KMS (Recipient), send the outcome back."""
import base64
import contextlib
import io
import json
import time

from enclavekit.cli.main import main as enclavekit_main
from enclavekit.errors import EnclaveKitError
from enclavekit.kms.types import KMSError
from enclavekit.sdk import vsock
from enclavekit.sdk.kms import AWSCredentials, KMSClient

MARKER = "image variant 0"


def receive(conn):
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError
        data += chunk
    return json.loads(data[4:])


def handle(job):
    if job["mode"] == "kmstool":
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = enclavekit_main(["kmstool", "decrypt", "--region", "us-east-1", "--proxy-port", "8000",
                                      "--endpoint", job["endpoint"], "--aws-access-key-id", job["akid"],
                                      "--aws-secret-access-key", job["secret"], "--ciphertext", job["ciphertext"]])
        return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}
    client = KMSClient("us-east-1", credentials=AWSCredentials(job["akid"], job["secret"]),
                       endpoint=job["endpoint"], proxy_port=8000)
    try:
        plaintext = client.decrypt(base64.b64decode(job["ciphertext"]))
    except KMSError as exc:
        return {"error": exc.aws_code, "message": exc.aws_message}
    except EnclaveKitError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"plaintext": base64.b64encode(plaintext).decode()}


while True:
    try:
        conn = vsock.connect(vsock.VMADDR_CID_PARENT, 7200, timeout=10)
    except EnclaveKitError:
        time.sleep(0.1)
        continue
    with conn:
        try:
            job = receive(conn)
        except (EOFError, OSError):
            continue
        result = json.dumps(handle(job)).encode()
        conn.sendall(len(result).to_bytes(4, "big") + result)
'''


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the enclave KMS test needs root (namespaces, cgroups, mounts); run it as root")


def _build(base: Path, name: str, source: str) -> tuple[Path, str]:
    app_dir = base / name
    app_dir.mkdir()
    (app_dir / "main.py").write_text(source)
    root = app_dir / "rootfs"
    subprocess.run([sys.executable, "-m", "enclavekit.runtime.pyroot", str(root), "--app", str(app_dir / "main.py"),
                    "--module", "enclavekit.cli.kmstool"],
                   check=True, capture_output=True)
    eif = app_dir / f"{name}.eif"
    out = subprocess.run([ENCLAVEKIT, "build-enclave", "--docker-uri", f"dir:{root}", "--output-file", str(eif),
                          "--cmd", json.dumps(["/usr/bin/python3", "/app/main.py"])],
                         check=True, capture_output=True, text=True)
    return eif, json.loads(out.stdout)["Measurements"]["PCR0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    _require_root()
    base = tmp_path_factory.mktemp("kms-enclave")
    return {"app": _build(base, "app", APP),
            "changed": _build(base, "changed", APP.replace("image variant 0", "image variant 1"))}


@dataclass
class World:
    run_dir: Path
    home: Path
    kms: KMSServer
    proxy: subprocess.Popen[bytes]
    creds: dict[str, str]
    key_id: str
    ciphertext: bytes

    def env(self) -> dict[str, str]:
        return {**os.environ, "ENCLAVEKIT_RUN_DIR": str(self.run_dir), "ENCLAVEKIT_HOME": str(self.home)}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ENCLAVEKIT, *args], env=self.env(), capture_output=True, text=True, timeout=180,
                              check=False)

    def run_job(self, eif: Path, job: dict[str, Any], *, debug: bool = False) -> dict[str, Any]:
        """Start ``eif``, hand its application ``job`` on (3, 7200), return its answer; terminate the enclave."""
        transport = UnixVsockTransport(self.run_dir / "vsock", local_cid=3)
        with vsock.listen(JOB_PORT, transport=transport) as listener:
            proc = self.cli("run-enclave", "--eif-path", str(eif), "--cpu-count", "1", "--memory", "384",
                            *(["--debug-mode"] if debug else []))
            assert proc.returncode == 0, proc.stderr
            info = json.loads(proc.stdout)
            try:
                conn, _ = listener.accept(timeout=60)
                with conn:
                    conn.settimeout(120)
                    payload = json.dumps(job).encode()
                    conn.sendall(len(payload).to_bytes(4, "big") + payload)
                    data = b""
                    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                        chunk = conn.recv(65536)
                        assert chunk, (self.run_dir / info["EnclaveID"] / "console.log").read_text()
                        data += chunk
            finally:
                term = self.cli("terminate-enclave", "--enclave-id", info["EnclaveID"])
                assert term.returncode == 0, term.stderr
        result: dict[str, Any] = json.loads(data[4:])
        return result

    def job(self, mode: str = "sdk") -> dict[str, Any]:
        return {"mode": mode, "akid": self.creds["AccessKeyId"], "secret": self.creds["SecretAccessKey"],
                "endpoint": "http://kms.us-east-1.amazonaws.com",
                "ciphertext": base64.b64encode(self.ciphertext).decode()}


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "vsock-proxy exited early"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world(images: dict[str, tuple[Path, str]]) -> Iterator[World]:
    _require_root()
    with tempfile.TemporaryDirectory(prefix="ekk", dir="/tmp") as tmp:
        base = Path(tmp)
        run_dir, home = base / "run", base / "home"
        home.mkdir()
        (home / "allocator.yaml").write_text("---\nmemory_mib: 2048\ncpu_pool: 1\ncpu_sharing: true\n")
        (run_dir / "vsock" / "3").mkdir(parents=True)
        kms = KMSServer(base / "kms", home=home).start()
        proxy: subprocess.Popen[bytes] | None = None
        try:
            port = int(kms.endpoint.rsplit(":", 1)[1])
            (base / "allow.yaml").write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n")
            proxy = subprocess.Popen([ENCLAVEKIT, "vsock-proxy", "--config", str(base / "allow.yaml"), "--vsock-dir",
                                      str(run_dir / "vsock"), str(PROXY_PORT), "127.0.0.1", str(port)],
                                     stderr=subprocess.DEVNULL)
            _wait_for(run_dir / "vsock" / "3" / f"{PROXY_PORT}.sock", proxy)
            creds = kms.credentials("parent")
            client = kms.client(creds)
            pcr0 = images["app"][1]
            key_id = client.create_key(Policy=json.dumps(enclave_key_policy(creds["Arn"], pcr0)))[
                "KeyMetadata"]["KeyId"]
            ciphertext = client.encrypt(KeyId=key_id, Plaintext=SECRET)["CiphertextBlob"]
            yield World(run_dir, home, kms, proxy, creds, key_id, ciphertext)
        finally:
            subprocess.run([ENCLAVEKIT, "terminate-enclave", "--all"], capture_output=True, timeout=120, check=False,
                           env={**os.environ, "ENCLAVEKIT_RUN_DIR": str(run_dir), "ENCLAVEKIT_HOME": str(home)})
            if proxy is not None:
                proxy.send_signal(signal.SIGTERM)
                try:
                    proxy.wait(20)
                except subprocess.TimeoutExpired:
                    proxy.kill()
                    proxy.wait()
            kms.stop()


def test_the_measured_image_decrypts(world: World, images: dict[str, tuple[Path, str]]) -> None:
    result = world.run_job(images["app"][0], world.job())
    assert result == {"plaintext": base64.b64encode(SECRET).decode()}


def test_kmstool_inside_the_enclave_prints_kmstools_line(world: World, images: dict[str, tuple[Path, str]]) -> None:
    result = world.run_job(images["app"][0], world.job("kmstool"))
    assert result["status"] == 0, result["stderr"]
    assert result["stdout"] == f"PLAINTEXT: {base64.b64encode(SECRET).decode()}\n"


def test_a_different_image_is_denied_naming_the_condition(world: World,
                                                          images: dict[str, tuple[Path, str]]) -> None:
    assert images["changed"][1] != images["app"][1]  # one byte of the application changes PCR0
    result = world.run_job(images["changed"][0], world.job())
    assert result["error"] == "AccessDeniedException", result
    assert "kms:RecipientAttestation:ImageSha384" in result["message"]
    assert base64.b64encode(SECRET).decode() not in json.dumps(result)


def test_a_debug_mode_enclave_is_denied(world: World, images: dict[str, tuple[Path, str]]) -> None:
    result = world.run_job(images["app"][0], world.job(), debug=True)
    assert result["error"] == "AccessDeniedException", result
    kmstool = world.run_job(images["app"][0], world.job("kmstool"), debug=True)
    assert kmstool["status"] == 84 and kmstool["stdout"] == ""
    assert "AccessDeniedException" in kmstool["stderr"]


def test_the_parent_itself_can_neither_decrypt_nor_reencrypt(world: World) -> None:
    client = world.kms.client(world.creds)
    own = client.create_key(Description="the parent's own key")["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as decrypt:
        client.decrypt(CiphertextBlob=world.ciphertext)
    assert decrypt.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "kms:Decrypt" in decrypt.value.response["Error"]["Message"]
    # ReEncrypt checks kms:ReEncryptFrom on the source key: the policy must not grant it to the parent
    with pytest.raises(ClientError) as reencrypt:
        client.re_encrypt(CiphertextBlob=world.ciphertext, DestinationKeyId=own)
    assert reencrypt.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "kms:ReEncryptFrom" in reencrypt.value.response["Error"]["Message"]
    # what the parent may still do: encrypt, and make data keys (new keys, nothing the policy protects)
    assert client.encrypt(KeyId=world.key_id, Plaintext=b"x")["CiphertextBlob"]
    assert len(client.generate_data_key(KeyId=world.key_id, KeySpec="AES_256")["Plaintext"]) == 32
