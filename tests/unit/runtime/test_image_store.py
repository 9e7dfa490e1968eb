"""The launch server's image store (runtime.image_store): fill once, share while held, remove when unused.

Stores live on a memory filesystem: each test uses its own directory under /dev/shm and removes it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavekit.runtime.image_store import ImageStore

KEY_A = "a" * 96
KEY_B = "b" * 96


@pytest.fixture
def base() -> Iterator[Path]:
    if not Path("/dev/shm").is_dir():
        pytest.fail("/dev/shm (a tmpfs) is needed for the image store tests")
    path = Path(tempfile.mkdtemp(prefix="ekstore-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _fill_with(text: str, calls: list[str]):  # type: ignore[no-untyped-def]
    def fill(directory: Path) -> None:
        calls.append(text)
        (directory / "bin").mkdir()
        (directory / "bin" / "app").write_text(text)

    return fill


def test_an_image_is_filled_once_and_shared(base: Path) -> None:
    store = ImageStore.create(base)
    assert store is not None
    calls: list[str] = []
    first = store.acquire(KEY_A, _fill_with("one", calls), size_hint=1000)
    second = store.acquire(KEY_A, _fill_with("two", calls), size_hint=1000)
    assert first is not None and second is not None
    assert calls == ["one"] and first.path == second.path == store.directory / KEY_A
    assert (first.path / "bin" / "app").read_text() == "one"
    parent = base / f"enclavekit-images-{os.geteuid()}"
    assert stat.S_IMODE(parent.stat().st_mode) == 0o700
    first.release()
    second.release()
    store.close()
    assert not store.directory.exists()


def test_an_entry_in_use_survives_the_server_and_goes_with_its_last_user(base: Path) -> None:
    store = ImageStore.create(base)
    assert store is not None
    entry = store.acquire(KEY_A, _fill_with("x", []), size_hint=10)
    assert entry is not None
    store.close()  # the server leaves while an enclave runs on the tree
    assert (entry.path / "bin" / "app").read_text() == "x"
    entry.release()
    assert not entry.path.exists() and not store.directory.exists()


def test_a_failed_fill_leaves_nothing(base: Path) -> None:
    store = ImageStore.create(base)
    assert store is not None

    def broken(directory: Path) -> None:
        (directory / "half").write_text("partial")
        raise RuntimeError("bad ramdisk")

    with pytest.raises(RuntimeError, match="bad ramdisk"):
        store.acquire(KEY_A, broken, size_hint=10)
    assert os.listdir(store.directory) == [".server"]
    store.close()


def test_keys_are_pcr0_hex(base: Path) -> None:
    store = ImageStore.create(base)
    assert store is not None
    for bad in ("../x", "A" * 96, "a" * 95, ""):
        with pytest.raises(ValueError, match="PCR0"):
            store.acquire(bad, _fill_with("x", []), size_hint=1)
    store.close()


def test_no_room_means_no_store(base: Path) -> None:
    store = ImageStore.create(base)
    assert store is not None
    assert store.acquire(KEY_A, _fill_with("x", []), size_hint=1 << 60) is None
    store.close()


def test_eviction_spares_entries_in_use(base: Path) -> None:
    store = ImageStore.create(base)
    assert store is not None
    store.max_entries = 1
    held = store.acquire(KEY_A, _fill_with("a", []), size_hint=1)
    assert held is not None
    other = store.acquire(KEY_B, _fill_with("b", []), size_hint=1)
    assert other is not None and held.path.exists()  # A is in use: kept although over the limit
    held.release()
    other.release()
    third = store.acquire("c" * 96, _fill_with("c", []), size_hint=1)
    assert third is not None
    assert sorted(p.name for p in store.directory.iterdir() if not p.name.startswith(".")) == ["c" * 96]
    third.release()
    store.close()


def test_a_store_on_disk_or_in_a_foreign_directory_is_refused(base: Path, tmp_path: Path) -> None:
    assert ImageStore.create(tmp_path) is None or _is_tmpfs(tmp_path)  # /tmp on disk here: refused
    parent = base / f"enclavekit-images-{os.geteuid()}"
    parent.mkdir(mode=0o777)
    parent.chmod(0o777)  # someone else's (or an open) directory in the shared /dev/shm: not used
    assert ImageStore.create(base) is None
    parent.rmdir()
    parent.symlink_to(tmp_path)
    assert ImageStore.create(base) is None


def test_a_dead_servers_leftovers_are_removed_by_the_next(base: Path) -> None:
    # a server killed with SIGKILL leaves its directory; the lock it held died with it
    code = ("import sys; from pathlib import Path; from enclavekit.runtime.image_store import ImageStore\n"
            "s = ImageStore.create(Path(sys.argv[1])); e = s.acquire('a' * 96, lambda d: (d / 'f').write_text('x'),"
            " size_hint=1); print(s.directory, flush=True); import os; os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, str(base)], capture_output=True, text=True, check=True)
    dead = Path(out.stdout.strip())
    assert (dead / KEY_A / "f").exists()
    store = ImageStore.create(base)  # a store made in the last seconds may be one still being set up: kept
    assert store is not None and dead.exists()
    store.close()
    os.utime(dead, (time.time() - 60, time.time() - 60))
    store = ImageStore.create(base)
    assert store is not None
    assert not dead.exists()
    store.close()


def _is_tmpfs(path: Path) -> bool:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False)
    return "tmpfs" in out.stdout


def test_facts_are_kept_per_file_identity_and_only_when_safe(base: Path, tmp_path: Path) -> None:
    from enclavekit.runtime.image_store import RACY_MARGIN_NS, FileIdentity

    store = ImageStore.create(base)
    assert store is not None
    f = tmp_path / "x.eif"
    f.write_bytes(b"eif")
    identity = FileIdentity.of(f.stat())
    facts = {"key": KEY_A, "n": 1}
    old_enough = identity.ctime_ns + RACY_MARGIN_NS + 1
    assert not store.remember(identity, facts, read_from_ns=identity.ctime_ns + 1, identity_after=identity)
    changed = FileIdentity(identity.dev, identity.ino, identity.size + 1, identity.mtime_ns, identity.ctime_ns + 5)
    assert not store.remember(identity, facts, read_from_ns=old_enough, identity_after=changed)
    assert store.facts_for(identity) is None
    assert store.remember(identity, facts, read_from_ns=old_enough, identity_after=identity)
    assert store.facts_for(identity) == facts
    assert store.facts_for(changed) is None
    assert stat.S_IMODE((store.directory / "facts").stat().st_mode) == 0o700
    entry_file = next((store.directory / "facts").glob("*.json"))
    entry_file.write_text("{")  # damaged: a miss, never an error
    assert store.facts_for(identity) is None
    store.close()
    assert not store.directory.exists()
