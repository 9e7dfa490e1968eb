"""Shared test configuration.

``SHARED`` is the read-only ``../shared`` directory beside the repository (specs and real-world fixtures).
Unit tests under ``tests/unit`` run with the network cut off: any attempt to open an AF_INET/AF_INET6 socket
fails the test (habit 7: prove offline tests are offline).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
FIXTURES = SHARED / "fixtures"

# No test leaves a resident launch server behind (enclavekit.runtime.launch_server): it is off for the whole
# session, for this process and every CLI it starts; tests/integration/test_launch_server.py turns it on explicitly.
os.environ["ENCLAVEKIT_LAUNCH_SERVER"] = "off"


def pytest_configure(config: pytest.Config) -> None:
    """The suite reads real-world fixtures from ../shared/fixtures: without them, say so once, up front."""
    if not (FIXTURES / "manifest.json").is_file():
        raise pytest.UsageError(
            f"the shared fixtures directory ../shared/fixtures (beside the repository) is required: expected "
            f"{FIXTURES}/manifest.json. Check out or mount the shared directory next to the repository.")


@pytest.fixture(autouse=True)
def _offline_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    path = Path(str(request.node.fspath))
    if "unit" in path.parts or "property" in path.parts:
        real_socket = socket.socket

        class GuardedSocket(real_socket):  # type: ignore[misc,valid-type]
            def __init__(self, family: int = socket.AF_INET, *args: object, **kwargs: object) -> None:
                if family in (socket.AF_INET, socket.AF_INET6):
                    raise AssertionError("unit tests must not use the network (AF_INET/AF_INET6 socket opened)")
                if family == getattr(socket, "AF_VSOCK", -1):
                    raise AssertionError("AF_VSOCK must never be used on this machine")
                super().__init__(family, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(socket, "socket", GuardedSocket)
    yield


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No silent skips: a skipped test fails the run (a missing dependency must be installed, not ignored)."""
    if _skipped and exitstatus == 0:
        print(f"\n{len(_skipped)} test(s) were skipped; the suite does not allow skips:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
        session.exitstatus = 1
