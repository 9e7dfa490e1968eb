"""Sealed state: an enclave keeps state across restarts by sealing it with a KMS data key and storing it on the
parent (enclaves have no persistent storage).  Runs INSIDE an enclave.

Protocol with the parent's store (``store.py``, vsock port 7300; frames are a 4-byte big-endian length + JSON):

* ``{"op": "config"}`` -> ``{"region", "endpoint", "proxy_port", "key_id", "credentials": {...}}``
* ``{"op": "get"}``    -> ``{"blob": <base64 JSON envelope> | null}``
* ``{"op": "put", "blob": <base64>}`` -> ``{"ok": true}``

The envelope is ``{"encrypted_key": <CiphertextBlob of the data key>, "nonce", "ciphertext"}`` (AES-256-GCM, the
key id as associated data).  To read it back, the enclave asks KMS to Decrypt the data key *with Recipient*: if
the key policy binds Decrypt to this image's PCR0, only this image (not the parent, not a changed image) can ever
open the state.  Each start increments a counter in the state and stores it back.
"""

import base64
import json
import os
import sys
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclavekit.errors import EnclaveKitError
from enclavekit.sdk import vsock
from enclavekit.sdk.kms import AWSCredentials, KMSClient

STORE_PORT = 7300


def call(request: dict) -> dict:
    while True:
        try:
            conn = vsock.connect(vsock.VMADDR_CID_PARENT, STORE_PORT, timeout=10)
            break
        except EnclaveKitError:
            time.sleep(0.2)  # the parent's store is not listening yet
    with conn:
        payload = json.dumps(request).encode()
        conn.sendall(len(payload).to_bytes(4, "big") + payload)
        data = b""
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError("the store closed the connection")
            data += chunk
    return json.loads(data[4:])


def main() -> None:
    config = call({"op": "config"})
    creds = config["credentials"]
    kms = KMSClient(config["region"], endpoint=config["endpoint"], proxy_port=int(config["proxy_port"]),
                    credentials=AWSCredentials(creds["AccessKeyId"], creds["SecretAccessKey"],
                                               creds.get("SessionToken")))
    aad = config["key_id"].encode()
    stored = call({"op": "get"})["blob"]
    if stored is None:
        state = {"starts": 0}
        data_key = kms.generate_data_key(config["key_id"])
        key, encrypted_key = data_key.plaintext, data_key.ciphertext_blob
    else:
        envelope = json.loads(base64.b64decode(stored))
        encrypted_key = base64.b64decode(envelope["encrypted_key"])
        key = kms.decrypt(encrypted_key)  # released only to the measured image
        state = json.loads(AESGCM(key).decrypt(base64.b64decode(envelope["nonce"]),
                                               base64.b64decode(envelope["ciphertext"]), aad))
    state["starts"] += 1
    print(f"[enclave] state opened: this is start number {state['starts']}", file=sys.stderr, flush=True)
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, json.dumps(state).encode(), aad)
    envelope = {"encrypted_key": base64.b64encode(encrypted_key).decode(),
                "nonce": base64.b64encode(nonce).decode(), "ciphertext": base64.b64encode(sealed).decode()}
    call({"op": "put", "blob": base64.b64encode(json.dumps(envelope).encode()).decode()})
    print("[enclave] state sealed and stored on the parent", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
