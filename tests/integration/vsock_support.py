"""A parent-side vsock echo listener shared by the integration tests of enclaves and unmodified programs."""

from __future__ import annotations

import threading
from pathlib import Path

from enclavekit.vsock.transport import UnixVsockTransport


class EchoParent:
    """The parent's side: an SDK listener on (3, port) answering ``echo:<data>`` (a thread of the test)."""

    def __init__(self, root: Path, port: int) -> None:
        self.listener = UnixVsockTransport(root, local_cid=3).listen(port)
        self.peers: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except Exception:
                return
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                self.peers.append(str(peer))
                conn.sendall(b"echo:" + data)

    def close(self) -> None:
        self.listener.close()
