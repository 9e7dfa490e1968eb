"""tests/conftest.py: without ../shared/fixtures the suite stops at once with a clear message, not N bare errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[2] / "conftest.py"


def _run_suite_copy(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(CONFTEST, tests / "conftest.py")
    (tests / "test_one.py").write_text("def test_one() -> None:\n    assert 1 + 1 == 2\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                          cwd=tmp_path / "repo", capture_output=True, text=True, timeout=60, check=False)


def test_missing_shared_fixtures_is_a_usage_error(tmp_path: Path) -> None:
    proc = _run_suite_copy(tmp_path)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's "usage error" status
    assert "the shared fixtures directory ../shared/fixtures (beside the repository) is required" in proc.stderr
    assert "FileNotFoundError" not in proc.stdout + proc.stderr


def test_present_shared_fixtures_lets_the_suite_run(tmp_path: Path) -> None:
    (tmp_path / "shared" / "fixtures").mkdir(parents=True)
    (tmp_path / "shared" / "fixtures" / "manifest.json").write_text("{}")
    proc = _run_suite_copy(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
