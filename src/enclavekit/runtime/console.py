"""Enclave consoles: a log file per enclave that outlives it, and live followers (``enclavekit console``).

nitro-cli's console is a vsock stream from the hypervisor that nobody keeps (spec eif-pcr-cli §3.6; users cannot
debug an enclave that crashed at boot, aws-nitro-enclaves-cli#664).  Here the supervisor reads the application's
stdout and stderr (one pipe) and :class:`ConsoleRecorder` appends every byte to ``<run>/<id>/console.log`` *and*
hands it to the followers currently attached.  The log is kept after the enclave exits; when it reaches
``max_bytes`` it is rotated once to ``console.log.1``.

Followers are fed through bounded queues: a follower that does not keep up is dropped rather than slowing the
enclave down (its connection is closed; the log still has everything).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["DEFAULT_MAX_BYTES", "ConsoleRecorder", "ConsoleFollower", "tail_lines", "copy_stream"]

DEFAULT_MAX_BYTES = 16 << 20
_READ_SIZE = 1024  # §3.6: nitro-cli's console copies in 1024-byte reads
_FOLLOWER_QUEUE = 1024


def tail_lines(path: Path, lines: int = 20, *, max_bytes: int = 64 << 10) -> list[str]:
    """The last ``lines`` lines of a console log (decoded leniently); ``[]`` if it does not exist."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace")
    return [line for line in text.splitlines() if line.strip()][-lines:]


class ConsoleFollower:
    """One attached reader: bytes are queued for it; ``None`` in the queue means the console ended."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes | None] = queue.Queue(_FOLLOWER_QUEUE)
        self.dropped = False

    def offer(self, data: bytes | None) -> bool:
        try:
            self.queue.put_nowait(data)
            return True
        except queue.Full:
            self.dropped = True
            return False


class ConsoleRecorder:
    """Copies a console stream into ``path`` and to the attached followers.

    :meth:`start` spawns the reader thread on the stream's file descriptor ``fd``; :meth:`wait` returns when the
    stream reached EOF (every writer — the application and its children — closed it).
    """

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 on_data: Callable[[bytes], None] | None = None) -> None:
        self.path = Path(path)
        self._max = max_bytes
        self._lock = threading.Lock()
        self._followers: list[ConsoleFollower] = []
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_data = on_data
        self._file: IO[bytes] = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in _finish
        os.chmod(self.path, 0o640)
        self._size = self._file.tell()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def start(self, fd: int) -> None:
        self._thread = threading.Thread(target=self._pump, args=(fd,), name="console", daemon=True)
        self._thread.start()

    def _pump(self, fd: int) -> None:
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except InterruptedError:  # pragma: no cover - PEP 475 retries
                    continue
                except OSError:
                    break
                if not data:
                    break
                self.write(data)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            self._finish()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._size + len(data) > self._max and self._size > 0:
                self._rotate()
            self._file.write(data)
            self._size += len(data)
            for follower in list(self._followers):
                if not follower.offer(data):
                    self._followers.remove(follower)
        if self._on_data is not None:
            self._on_data(data)

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115
        os.chmod(self.path, 0o640)
        self._size = 0

    def _finish(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._file.close()
            for follower in self._followers:
                follower.offer(None)
            self._followers.clear()

    def close(self) -> None:
        self._finish()

    def wait(self, timeout: float | None = None) -> bool:
        return self._closed.wait(timeout)

    def attach(self, *, backlog: int = 0) -> tuple[ConsoleFollower | None, bytes]:
        """A new follower receiving bytes written from now on (None if the console already ended), and the last
        ``backlog`` bytes already written, taken atomically so that nothing is lost or repeated in between."""
        follower = ConsoleFollower()
        past = b""
        with self._lock:
            if backlog > 0:
                with contextlib.suppress(OSError), open(self.path, "rb") as fh:
                    fh.seek(max(0, self._size - backlog))
                    past = fh.read(backlog)
            if self._closed.is_set():
                return None, past
            self._followers.append(follower)
        return follower, past

    def detach(self, follower: ConsoleFollower) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._followers.remove(follower)

    def serve_follower(self, sock: socket.socket, *, backlog: int = 64 << 10) -> None:
        """Stream to ``sock`` (the last ``backlog`` bytes first) until the console ends, the follower is dropped
        or the peer goes away."""
        follower, past = self.attach(backlog=backlog)
        try:
            if past:
                sock.sendall(past)
            if follower is None:
                return
            while True:
                try:
                    data = follower.queue.get(timeout=0.5)
                except queue.Empty:
                    if follower.dropped:
                        return
                    continue
                if data is None:
                    return
                sock.sendall(data)
        except OSError:
            return
        finally:
            if follower is not None:
                self.detach(follower)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def copy_stream(sock: socket.socket, out: IO[bytes], *, disconnect_timeout: float | None = None,
                clock: Callable[[], float] = time.monotonic) -> None:
    """The client side of ``console``: copy ``sock`` to ``out`` until EOF or ``disconnect_timeout`` seconds."""
    deadline = None if disconnect_timeout is None else clock() + disconnect_timeout
    while True:
        if deadline is not None:
            remaining = deadline - clock()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
        else:
            sock.settimeout(None)
        try:
            data = sock.recv(_READ_SIZE)
        except TimeoutError:
            return
        if not data:
            return
        out.write(data)
        out.flush()
