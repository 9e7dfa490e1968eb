"""Runs on the PARENT: the sealed-state example's store (vsock port 7300).  It keeps the sealed blob in a file and
hands the enclave its KMS configuration; it never sees the state in the clear.

    python examples/sealed-state/store.py --state sealed.bin --key-id KEY \
        --endpoint http://kms.us-east-1.amazonaws.com --access-key-id AKID --secret-access-key SECRET \
        [--region us-east-1] [--proxy-port 8000]
"""

import argparse
import base64
import json
from pathlib import Path

from enclavekit.sdk import vsock

parser = argparse.ArgumentParser()
parser.add_argument("--state", type=Path, required=True)
parser.add_argument("--key-id", required=True)
parser.add_argument("--endpoint", required=True)
parser.add_argument("--access-key-id", required=True)
parser.add_argument("--secret-access-key", required=True)
parser.add_argument("--region", default="us-east-1")
parser.add_argument("--proxy-port", type=int, default=8000)
args = parser.parse_args()


def answer(request: dict) -> dict:
    if request.get("op") == "config":
        return {"region": args.region, "endpoint": args.endpoint, "proxy_port": args.proxy_port,
                "key_id": args.key_id, "credentials": {"AccessKeyId": args.access_key_id,
                                                       "SecretAccessKey": args.secret_access_key}}
    if request.get("op") == "get":
        return {"blob": base64.b64encode(args.state.read_bytes()).decode() if args.state.exists() else None}
    if request.get("op") == "put":
        args.state.write_bytes(base64.b64decode(request["blob"]))
        return {"ok": True}
    return {"error": "unknown op"}


with vsock.listen(7300) as listener:
    while True:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            if len(data) >= 4:
                reply = json.dumps(answer(json.loads(data[4:]))).encode()
                conn.sendall(len(reply).to_bytes(4, "big") + reply)
