"""The state directory: where enclavekit keeps what must survive a process (the local attestation PKI, …).

Location, first match wins:

1. ``$ENCLAVEKIT_HOME`` if set and non-empty;
2. ``/var/lib/enclavekit`` when running as root (effective uid 0), like nitro-cli's system state;
3. ``$XDG_DATA_HOME/enclavekit`` if ``XDG_DATA_HOME`` is set, else ``~/.local/share/enclavekit``.

Directories are created mode 0700 and private files mode 0600.  Writes are atomic (a temporary file in the same
directory, fsync, then ``os.replace``) so a reader never sees half a file, and :func:`file_lock` serializes
processes that create or renew shared state.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["state_home", "ensure_private_dir", "atomic_write", "file_lock"]


def state_home(environ: Mapping[str, str] | None = None, *, euid: int | None = None) -> Path:
    """The state directory (not created).  ``environ`` and ``euid`` default to the process's own."""
    env = os.environ if environ is None else environ
    explicit = env.get("ENCLAVEKIT_HOME", "")
    if explicit:
        return Path(explicit).expanduser()
    uid = os.geteuid() if euid is None else euid
    if uid == 0:
        return Path("/var/lib/enclavekit")
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg:
        return Path(xdg) / "enclavekit"
    home = env.get("HOME", "")
    return (Path(home) if home else Path.home()) / ".local" / "share" / "enclavekit"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed; the leaf directory is made mode 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode`` (the file never exists with wider ones)."""
    import tempfile  # noqa: PLC0415 - run-enclave's start-up imports this module (state_home) but never writes

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
