"""``enclavekit quickstart --json`` end to end (issue 7): the README's first command, run as CI runs it.

It builds (or reuses) the example images, starts the KMS and vsock-proxy, shows the parent denied, runs the
enclave, shows the changed image denied, validates the audit trail, and must leave nothing behind.  Needs root;
without it the end-to-end tests FAIL.

Another quickstart may run at the same time on this machine (another checkout, another CI job): every check of
"nothing left behind" looks only at this run's own things.  Each run gets a private ``TMPDIR``, so its work
directory, its processes (their environment names it), its mounts and its Unix sockets (paths below it) and its
cgroups (named after its enclaves) are told apart from anyone else's.

Also here: Python enclave images are reproducible (two pyroot + build-enclave runs give the same PCR0 and an
empty eif-diff), the image cache's eviction and locking, and ``--json`` on failure.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclavekit import quickstart as qs_module
from enclavekit.quickstart import SECRET, QuickstartError, _cached_images, _evict, run_quickstart

pytestmark = pytest.mark.integration

ENCLAVEKIT = str(Path(sys.executable).with_name("enclavekit"))
REPO = Path(__file__).resolve().parents[2]
STEPS = ["prepare", "build", "kms", "proxy", "key", "parent", "enclave", "denied", "audit"]


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the quickstart runs enclaves and needs root")


@pytest.fixture
def private_tmp() -> Iterator[Path]:
    """A TMPDIR of this test's own (short: Unix socket paths below it must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ekq", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp)}


def _processes_of(tmp: Path) -> set[int]:
    """PIDs whose command line or environment names ``tmp`` (every process the run started inherits TMPDIR)."""
    needle = str(tmp).encode()
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes() or needle in (proc / "environ").read_bytes():
                found.add(int(proc.name))
        except OSError:
            continue  # gone meanwhile
    return found


def _mounts_of(tmp: Path) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp) in line]


def _sockets_of(tmp: Path) -> list[str]:
    return [line for line in Path("/proc/net/unix").read_text().splitlines() if str(tmp) in line]


def _cgroups_named(names: set[str]) -> list[str]:
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(top, d) for d in dirs if d in names]
    return found


def _assert_nothing_left(tmp: Path, enclave_ids: list[str]) -> None:
    deadline = time.monotonic() + 10  # processes being reaped after their parent exited
    while _processes_of(tmp) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(tmp.iterdir()) == [], "the run left files in its temporary directory"
    assert _processes_of(tmp) == set()
    assert _mounts_of(tmp) == []
    assert _sockets_of(tmp) == []
    cgroups = {f"enclavekit-{eid.rsplit('-enc', 1)[1]}" for eid in enclave_ids}
    assert _cgroups_named(cgroups) == []


def test_quickstart_json(private_tmp: Path) -> None:
    _require_root()
    proc = subprocess.run([ENCLAVEKIT, "quickstart", "--json"], capture_output=True, text=True, timeout=600,
                          check=False, env=_env(private_tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert result["Result"] == "SUCCESS"
    pcr0, changed = result["Image"]["PCR0"], result["ChangedImage"]["PCR0"]
    assert len(pcr0) == 96 and pcr0 != changed
    assert result["Condition"] == {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": pcr0}}
    # the parent's statement excludes every plaintext-releasing action; Decrypt only under the PCR0 condition
    admin, enclave_only = result["Policy"]["Statement"]
    assert admin["NotAction"] == ["kms:Decrypt", "kms:ReEncrypt*"]
    assert enclave_only["Action"] == "kms:Decrypt" and enclave_only["Condition"] == result["Condition"]
    parent = result["ParentDenied"]
    assert parent["Decrypt"].startswith("AccessDeniedException: ")
    assert parent["ReEncrypt"].startswith("AccessDeniedException: ") and "kms:ReEncryptFrom" in parent["ReEncrypt"]
    enclave = result["Enclave"]
    assert enclave["Attestation"]["PCR0"] == pcr0
    assert enclave["Attestation"]["ModuleId"] == enclave["EnclaveID"]
    assert enclave["SecretSHA256"] == hashlib.sha256(SECRET).hexdigest()
    assert SECRET.decode() not in proc.stdout and SECRET.decode() not in proc.stderr
    denied = result["Denied"]
    assert denied["Error"] == "AccessDeniedException"
    assert denied["Attestation"]["PCR0"] == changed
    assert "DecryptOnlyInTheMeasuredEnclave" in denied["Message"]
    assert "kms:RecipientAttestation:ImageSha384" in denied["Message"]
    audit = result["Audit"]
    assert audit["Valid"] is True
    assert (audit["Allowed"], audit["Denied"], audit["ReEncryptDenied"]) == (1, 2, 1)
    assert audit["Trail"] == "removed" and "WorkDirectory" not in result  # no name of a deleted directory
    assert [s["Name"] for s in result["Steps"]] == STEPS
    _assert_nothing_left(private_tmp, [enclave["EnclaveID"], denied["EnclaveID"]])


def test_sigterm_cleans_up_and_exits_143(private_tmp: Path) -> None:
    _require_root()
    proc = subprocess.Popen([ENCLAVEKIT, "quickstart", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(private_tmp))
    assert proc.stderr is not None
    seen = []
    try:
        for line in proc.stderr:  # SIGTERM once the KMS and vsock-proxy run
            seen.append(line)
            if line.startswith("Creating credentials"):
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, "".join(seen) + stderr
    result = json.loads(stdout)
    assert result["Result"] == "FAILED" and result["FailedStep"] in ("key", "parent")
    assert "interrupted" in stderr and "Cleaning up" in stderr
    _assert_nothing_left(private_tmp, [])


def test_json_reports_a_foreign_exception_naming_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def broken(self: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qs_module.Quickstart, "prepare", broken)
    with pytest.raises(QuickstartError, match=r"step 'prepare'.*OSError.*No space left"):
        run_quickstart(json_output=True)
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["Result"] == "FAILED" and result["FailedStep"] == "prepare"
    assert "No space left on device" in result["Error"]
    assert result["Steps"] == [{"Name": "prepare", "Title": "Checking the machine", "Seconds": result["Steps"][0][
        "Seconds"], "Failed": True}]
    assert "failed" in err and "Cleaning up" in err
    assert list(tmp_path.iterdir()) == []  # the work directory was removed


# ------------------------------------------------------------------------------------ reproducible images


def _pyroot_eif(base: Path, seed: str) -> tuple[str, Path]:
    base.mkdir()
    shutil.copyfile(REPO / "examples" / "quickstart" / "main.py", base / "main.py")
    env = {**os.environ, "PYTHONHASHSEED": seed, "SOURCE_DATE_EPOCH": "0"}
    subprocess.run([sys.executable, "-m", "enclavekit.runtime.pyroot", "root", "--app", "main.py"], cwd=base,
                   env=env, check=True, capture_output=True, timeout=300)
    out = subprocess.run([ENCLAVEKIT, "build-enclave", "--docker-uri", f"dir:{base / 'root'}", "--output-file",
                          str(base / "app.eif"), "--cmd", json.dumps(["/usr/bin/python3", "/app/main.py"])],
                         env=env, check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout)["Measurements"]["PCR0"], base / "app.eif"


def test_two_python_image_builds_are_identical(tmp_path: Path) -> None:
    # different build directories, working directories and hash seeds of the building process
    first_pcr0, first = _pyroot_eif(tmp_path / "first", "1")
    second_pcr0, second = _pyroot_eif(tmp_path / "second-build-elsewhere", "2")
    assert first_pcr0 == second_pcr0
    diff = subprocess.run([ENCLAVEKIT, "eif-diff", str(first), str(second)], capture_output=True, text=True,
                          check=False, timeout=120)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert "differ" not in diff.stdout
    assert first.read_bytes() == second.read_bytes()


# --------------------------------------------------------------------------------------------- image cache


def _entry(base: Path, name: str, age: float, now: float) -> Path:
    entry = base / name
    entry.mkdir()
    (entry / "images.json").write_text("{}")
    os.utime(entry / "images.json", (now - age, now - age))
    return entry


def test_eviction_removes_only_old_unlocked_entries(tmp_path: Path) -> None:
    now = time.time()
    day = qs_module.CACHE_MAX_AGE
    current = _entry(tmp_path, "current", 2 * day, now)        # this run's: never
    recent = _entry(tmp_path, "recent", day / 2, now)          # used today: kept
    old = _entry(tmp_path, "old", 2 * day, now)                # unused for two days, unlocked: evicted
    in_use = _entry(tmp_path, "in-use", 2 * day, now)          # old but locked by another run: kept
    staging = tmp_path / ".crashed.abc"
    staging.mkdir()
    os.utime(staging, (now - 2 * day, now - 2 * day))
    fresh_staging = tmp_path / ".building.def"                  # a build in progress: kept
    fresh_staging.mkdir()
    with (tmp_path / "in-use.lock").open("ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_SH)
        removed = _evict(tmp_path, keep="current", now=now)
    assert sorted(removed) == [".crashed.abc", "old"]
    assert current.is_dir() and recent.is_dir() and in_use.is_dir() and fresh_staging.is_dir()
    assert not old.exists() and not staging.exists()


def test_eviction_keeps_the_most_recently_used_entries(tmp_path: Path) -> None:
    now = time.time()
    for n in range(5):                                           # all used today; e0 most recently
        _entry(tmp_path, f"e{n}", 60.0 * (n + 1), now)
    with (tmp_path / "e4.lock").open("ab") as lock:              # the least recent, but in use
        fcntl.flock(lock.fileno(), fcntl.LOCK_SH)
        removed = _evict(tmp_path, keep="current", now=now, max_entries=3)
    assert sorted(removed) == ["e2", "e3"]                       # "current", e0 and e1 are the three kept
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["e0", "e1", "e4"]


def test_an_incomplete_cache_entry_is_not_used(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    assert _cached_images(entry) is None                       # no images.json
    (entry / "images.json").write_text("{not json")
    assert _cached_images(entry) is None
    eif = entry / "quickstart.eif"
    (entry / "images.json").write_text(json.dumps({"App": {"Path": str(eif)}, "Changed": {"Path": str(eif)}}))
    assert _cached_images(entry) is None                       # the EIF is missing
    eif.write_bytes(b"x")
    cached = _cached_images(entry)
    assert cached is not None and cached["Cached"] is True
