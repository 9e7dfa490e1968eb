"""Processes that detach: a double fork, the highest descriptor to close, stdio on /dev/null."""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["max_fd", "detach_stdio", "double_fork"]


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


def double_fork(run: Callable[[], int]) -> int:
    """Run ``run()`` in a grandchild in a new session that is nobody's child (the intermediate process exits at
    once and is reaped here), and end the grandchild with its result.

    Returns the intermediate's exit status: 0, or 1 when its ``setsid`` or second fork failed.  The first fork's
    OSError propagates.  Call it from a single-threaded process only (fork).
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, then the grandchild
        code = 1
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            code = run()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
