"""File descriptors of processes that detach: the highest one to close, and stdio on /dev/null."""

from __future__ import annotations

import os

__all__ = ["max_fd", "detach_stdio"]


def max_fd() -> int:
    """One past the highest descriptor number this process may have (for ``os.closerange``)."""
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):  # pragma: no cover
        return 1024


def detach_stdio() -> None:
    """stdin, stdout and stderr on /dev/null: a detached process must not hold its starter's pipes open."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
