"""Runs on the PARENT: connect to the echo enclave (CID from describe-enclaves) and check the echo.

    python examples/vsock-echo/client.py CID [MESSAGE]
"""

import sys

from enclavekit.sdk import vsock

cid = int(sys.argv[1])
message = (sys.argv[2] if len(sys.argv) > 2 else "hello, enclave").encode()
with vsock.connect(cid, 5005, timeout=10) as conn:
    conn.sendall(message)
    received = b""
    while len(received) < len(message):
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
print(received.decode(errors="replace"))
sys.exit(0 if received == message else 1)
