"""A minimal vsock echo server: runs INSIDE an enclave and echoes every byte back on vsock port 5005.

Uses only ``enclavekit.sdk.vsock``, so the same file runs on real Nitro (set ENCLAVEKIT_REAL_VSOCK=1 in the image's
environment) and in enclavekit's sandbox.  See README.md for building and talking to it from the parent.
"""

import sys
import threading

from enclavekit.sdk import vsock

PORT = 5005


def serve(conn: vsock.VsockConnection) -> None:
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def main() -> None:
    with vsock.listen(PORT) as listener:
        print(f"echo server listening on vsock port {PORT}", file=sys.stderr, flush=True)
        while True:
            conn, peer = listener.accept()
            print(f"connection from {peer}", file=sys.stderr, flush=True)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
