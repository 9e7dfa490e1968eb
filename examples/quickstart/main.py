"""The quickstart's enclave application: attest, decrypt a secret with KMS, report a result derived from it.

Runs INSIDE an enclave (built by ``enclavekit quickstart``; see README.md here).  It needs no configuration baked
into the image: the parent hands it a job over vsock, as a real parent application would.

1. Connect to the parent on vsock (CID 3, port 7200) and read one job: a 4-byte big-endian length and a JSON
   object ``{"region", "endpoint", "proxy_port", "credentials": {AccessKeyId, SecretAccessKey, SessionToken?},
   "ciphertext": <base64>, "encryption_context": {...}}``.
2. Decrypt the ciphertext with ``enclavekit.sdk.kms``: a fresh RSA key, an attestation document from the NSM
   carrying it, KMS Decrypt with ``Recipient`` through vsock-proxy, the answer opened here.  KMS releases the
   secret only if the key policy's PCR0 condition matches this image.
3. Send back (same framing) what the attestation said and a result derived from the secret: its SHA-256 and
   length, never the secret itself.  On a denial, send the AWS error name and message.

The same code runs on real Nitro Enclaves: there ``NSMClient.open()`` uses /dev/nsm and ``ENCLAVEKIT_REAL_VSOCK=1``
selects AF_VSOCK (see docs/real-nitro.md).
"""

import base64
import hashlib
import json
import sys
import time

from enclavekit.errors import EnclaveKitError
from enclavekit.formats.attestation_doc import parse_document
from enclavekit.kms.types import KMSError
from enclavekit.sdk import vsock
from enclavekit.sdk.kms import AWSCredentials, KMSClient

JOB_PORT = 7200


def log(message: str) -> None:
    print(f"[enclave] {message}", file=sys.stderr, flush=True)


def receive(conn: vsock.VsockConnection) -> dict:
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError("the parent closed the connection")
        data += chunk
    return json.loads(data[4:])


def attestation_summary(document: bytes | None) -> dict:
    if document is None:
        return {}
    _, parsed = parse_document(document)
    return {"ModuleId": parsed.module_id, "PCR0": parsed.pcrs[0].hex(), "DocumentBytes": len(document),
            "PublicKeyBytes": len(parsed.public_key or b"")}


def handle(job: dict) -> dict:
    creds = job["credentials"]
    client = KMSClient(job["region"], endpoint=job["endpoint"], proxy_port=int(job["proxy_port"]),
                       credentials=AWSCredentials(creds["AccessKeyId"], creds["SecretAccessKey"],
                                                  creds.get("SessionToken")))
    try:
        secret = client.decrypt(base64.b64decode(job["ciphertext"]), job.get("encryption_context") or None)
    except KMSError as exc:
        log(f"KMS said {exc.aws_code}: {exc.aws_message}")
        return {"Attestation": attestation_summary(client.last_attestation_document), "Error": exc.aws_code,
                "Message": exc.aws_message}
    except EnclaveKitError as exc:
        log(f"failed: {exc}")
        return {"Attestation": attestation_summary(client.last_attestation_document),
                "Error": type(exc).__name__, "Message": str(exc)}
    digest = hashlib.sha256(secret).hexdigest()
    log(f"decrypted a {len(secret)}-byte secret, SHA-256 {digest}")
    return {"Attestation": attestation_summary(client.last_attestation_document), "SecretSHA256": digest,
            "SecretLength": len(secret),
            "Message": f"Hello from the enclave: I hold a {len(secret)}-byte secret whose SHA-256 is {digest[:16]}..."}


def main() -> None:
    log("up; waiting for a job from the parent on vsock port 7200")
    while True:
        try:
            conn = vsock.connect(vsock.VMADDR_CID_PARENT, JOB_PORT, timeout=10)
        except EnclaveKitError:
            time.sleep(0.1)  # the parent is not listening yet
            continue
        with conn:
            try:
                job = receive(conn)
            except (EOFError, OSError, ValueError):
                continue
            result = json.dumps(handle(job)).encode()
            conn.sendall(len(result).to_bytes(4, "big") + result)


if __name__ == "__main__":
    main()
