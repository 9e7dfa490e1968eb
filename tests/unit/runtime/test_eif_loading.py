"""How a supervisor reads an EIF: a sealed copy, unpacking from a file on disk, facts kept in the image store."""

from __future__ import annotations

import io
import mmap
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclavekit.errors import EIFFormatError, FileOperationError
from enclavekit.formats.cpio import BytesContent, CpioArchive, CpioEntry
from enclavekit.formats.eif import BuildMetadata, EIFMetadata
from enclavekit.image.eif_reader import measure_eif
from enclavekit.image.eif_writer import BytesSource, EIFContent, write_eif
from enclavekit.runtime import image_store
from enclavekit.runtime.image_store import RACY_MARGIN_NS, FileIdentity, ImageStore
from enclavekit.runtime.supervisor import (
    RunRequest,
    Supervisor,
    _LoadedImage,
    _Reporter,
    _snapshot,
    read_application,
    unpack_rootfs,
)

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644


def _image(tmp_path: Path, payload: bytes = b"\x7fELF" * 5000, name: str = "app.eif") -> Path:
    entries = [CpioEntry(path="rootfs", mode=DIR), CpioEntry(path="rootfs/bin", mode=DIR),
               CpioEntry(path="rootfs/bin/app", mode=stat.S_IFREG | 0o755, content=BytesContent(payload)),
               CpioEntry(path="rootfs/bin/small", mode=REG, content=BytesContent(b"abc")),
               CpioEntry(path="cmd", mode=REG, content=BytesContent(b"/bin/app\n")),
               CpioEntry(path="env", mode=REG, content=BytesContent(b"A=1\n"))]
    boot = [CpioEntry(path="init", mode=stat.S_IFREG | 0o755, content=BytesContent(b"#!init"))]
    meta = EIFMetadata("img", "1", BuildMetadata("2024-01-01T00:00:00+00:00", "enclavekit", "0.1.0", "Linux", "6.1"))
    out = io.BytesIO()
    write_eif(out, EIFContent(kernel=BytesSource(b"kernel" * 1000), cmdline=b"console=ttyS0", metadata=meta,
                              ramdisks=[BytesSource(CpioArchive(boot).to_bytes()),
                                        BytesSource(CpioArchive(entries).to_bytes())]))
    path = tmp_path / name
    path.write_bytes(out.getvalue())
    return path


def _age(path: Path) -> None:
    """Give ``path`` a change time older than the racy margin (by waiting it out)."""
    time.sleep(RACY_MARGIN_NS / 1e9 + 0.05)


@pytest.fixture
def store() -> Iterator[ImageStore]:
    base = Path(tempfile.mkdtemp(prefix="ekload-test-", dir="/dev/shm"))
    made = ImageStore.create(base)
    assert made is not None
    image_store.ACTIVE = made
    try:
        yield made
    finally:
        image_store.ACTIVE = None
        made.close()
        shutil.rmtree(base, ignore_errors=True)


def _supervisor(tmp_path: Path, eif: Path) -> Supervisor:
    request = RunRequest(eif_path=str(eif), memory_mib=64, cpu_count=1, run_dir=str(tmp_path / "run"),
                         state_home=str(tmp_path / "home"))
    return Supervisor(request, _Reporter(os.open(os.devnull, os.O_WRONLY)))


def _load(sup: Supervisor) -> _LoadedImage:
    """What setup() does: load, then (after the allocation) put the tree in the store when there is one."""
    loaded = sup._load()
    if loaded.share is not None:
        loaded.share()
    return loaded


def test_the_snapshot_is_sealed_and_independent_of_the_file(tmp_path: Path) -> None:
    path = _image(tmp_path)
    original = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        copy = _snapshot(fd, str(path), path.stat().st_size)
    finally:
        os.close(fd)
    with copy:
        with open(path, "r+b") as f:
            f.write(b"X" * 64)  # the file changes after the copy: the copy does not
        assert copy.read() == original
        with pytest.raises(PermissionError):
            os.write(copy.fileno(), b"no")
        with pytest.raises(PermissionError):
            os.ftruncate(copy.fileno(), 10)


def test_unpacking_from_a_file_on_disk_copies_in_the_kernel(tmp_path: Path) -> None:
    # the descriptor path (pread headers, sendfile data) gives the same tree as the in-memory path
    path = _image(tmp_path)
    root_disk, root_mem = tmp_path / "disk", tmp_path / "mem"
    root_disk.mkdir()
    root_mem.mkdir()
    with open(path, "rb") as f:
        info = measure_eif(f)
        unpack_rootfs(f, info, root_disk)
        app = read_application(f, info)
    mem = io.BytesIO(path.read_bytes())
    unpack_rootfs(mem, measure_eif(mem), root_mem)
    assert app.argv == ("/bin/app",) and app.env["A"] == "1"
    for rel in ("bin/app", "bin/small"):
        assert (root_disk / rel).read_bytes() == (root_mem / rel).read_bytes()
    assert (root_disk / "bin/app").read_bytes() == b"\x7fELF" * 5000
    assert stat.S_IMODE((root_disk / "bin/app").stat().st_mode) == 0o755


def test_a_truncated_file_on_disk_is_refused(tmp_path: Path) -> None:
    path = _image(tmp_path)
    with open(path, "rb") as f:
        info = measure_eif(f)
    path.write_bytes(path.read_bytes()[:-4000])  # cut into the application's data
    root = tmp_path / "root"
    root.mkdir()
    with open(path, "rb") as f, pytest.raises(EIFFormatError, match=r"truncated|ends"):
        unpack_rootfs(f, info, root)


def test_without_a_store_every_launch_reads_a_sealed_copy(tmp_path: Path) -> None:
    path = _image(tmp_path)
    sup = _supervisor(tmp_path, path)
    loaded = _load(sup)
    assert loaded.lower is None and loaded.populate is not None and sup.snapshot is not None
    root = tmp_path / "root"
    root.mkdir()
    with open(path, "r+b") as f:
        f.seek(-2000, os.SEEK_END)
        f.write(b"Z" * 100)  # changed after the copy: the root still comes from the copy that was measured
    loaded.populate(root)
    assert (root / "bin" / "app").read_bytes() == b"\x7fELF" * 5000
    assert loaded.measurements["PCR0"] == measure_eif(io.BytesIO(_image(tmp_path, name="same.eif").read_bytes())
                                                      ).measurements.pcr0.hex()
    sup._close_snapshot()


def test_an_eif_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.eif"
    os.mkfifo(fifo)
    with pytest.raises(FileOperationError, match="not a regular file"):
        _load(_supervisor(tmp_path, fifo))


def test_a_second_launch_of_an_unchanged_file_reads_nothing_of_it(tmp_path: Path, store: ImageStore) -> None:
    path = _image(tmp_path)
    _age(path)
    first = _supervisor(tmp_path, path)
    loaded = _load(first)
    assert loaded.lower is not None and loaded.populate is None
    assert (Path(loaded.lower) / "bin" / "app").read_bytes() == b"\x7fELF" * 5000
    assert first.snapshot is not None  # read (and measured) once
    second = _supervisor(tmp_path, path)
    again = _load(second)
    assert second.snapshot is None  # facts from the store: the file was not read
    assert again.lower == loaded.lower and again.measurements == loaded.measurements
    assert again.app == loaded.app and again.file_size == loaded.file_size and again.metadata == loaded.metadata
    for sup in (first, second):
        sup._close_snapshot()
        assert sup.image_entry is not None
        sup.image_entry.release()


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_a_file_written_through_a_mapping_runs_as_what_was_measured(tmp_path: Path, store: ImageStore,
                                                                    where: str) -> None:
    # A shared writable mapping can change the contents without new timestamps (tmpfs never updates them for
    # it).  The next launch may then use what the store holds, but tree and PCRs always come from the same read:
    # never new content with old PCRs.
    folder = tmp_path if where == "disk" else Path(tempfile.mkdtemp(prefix="ekload-", dir="/dev/shm"))
    try:
        path = _image(folder)
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            at = m.rfind(b"\x7fELF")
            m[at:at + 4] = b"\x7fELF"  # a writer dirties the page first (this write updates the timestamps) ...
            _age(path)
            first = _supervisor(tmp_path, path)
            loaded = _load(first)
            identity = FileIdentity.of(path.stat())
            m[at:at + 4] = b"EVIL"  # ... so that this later write to the dirty page updates nothing
        second = _supervisor(tmp_path, path)
        if FileIdentity.of(path.stat()) == identity:  # no new timestamps: the store's read is used, consistently
            again = _load(second)
            assert second.snapshot is None
            assert again.measurements == loaded.measurements and again.lower == loaded.lower
            assert b"EVIL" not in (Path(again.lower or "") / "bin" / "app").read_bytes()
            assert b"EVIL" in path.read_bytes()  # (the file did change)
        else:  # new timestamps: read again; the changed contents no longer match the EIF's CRC
            with pytest.raises(EIFFormatError, match="CRC32"):
                _load(second)
        for sup in (first, second):
            sup._close_snapshot()
            if sup.image_entry is not None:
                sup.image_entry.release()
    finally:
        if where == "tmpfs":
            shutil.rmtree(folder, ignore_errors=True)


def test_a_freshly_written_file_is_read_again(tmp_path: Path, store: ImageStore) -> None:
    path = _image(tmp_path)  # changed just now: within the racy margin, its facts are not kept
    first = _supervisor(tmp_path, path)
    _load(first)
    second = _supervisor(tmp_path, path)
    _load(second)
    assert second.snapshot is not None
    for sup in (first, second):
        sup._close_snapshot()
        if sup.image_entry is not None:
            sup.image_entry.release()


def test_a_changed_file_is_read_again(tmp_path: Path, store: ImageStore) -> None:
    path = _image(tmp_path)
    _age(path)
    first = _supervisor(tmp_path, path)
    loaded = _load(first)
    path.write_bytes(_image(tmp_path, payload=b"other" * 4000, name="other.eif").read_bytes())
    second = _supervisor(tmp_path, path)
    again = _load(second)
    assert second.snapshot is not None and again.measurements != loaded.measurements
    assert again.lower != loaded.lower
    for sup in (first, second):
        sup._close_snapshot()
        if sup.image_entry is not None:
            sup.image_entry.release()


@pytest.mark.parametrize("damage", ["key", "argv", "env", "ids", "measurements"])
def test_facts_that_do_not_have_their_shape_are_refused(damage: str) -> None:
    good: dict[str, Any] = {"key": "a" * 96, "measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": "a" * 96},
                            "file_size": 10, "metadata": None, "argv": ["/app"], "env": {"A": "1"},
                            "workdir": "/", "uid": 0, "gid": 0}
    assert _LoadedImage.from_facts(dict(good)).app.argv == ("/app",)
    bad = dict(good)
    if damage == "key":
        bad["key"] = 5
    elif damage == "argv":
        bad["argv"] = []
    elif damage == "env":
        bad["env"] = {"A": 1}
    elif damage == "ids":
        bad["uid"] = True
    else:
        bad["measurements"] = "PCR0"
    with pytest.raises((TypeError, ValueError)):
        _LoadedImage.from_facts(bad)


def test_the_store_key_tells_apart_images_with_the_same_pcr0(tmp_path: Path) -> None:
    # review: PCR0 hashes the sections end to end; relabelling a ramdisk as a kernel keeps PCR0 but drops a layer
    from enclavekit.formats.eif import SectionType
    from enclavekit.runtime.supervisor import _store_key

    path = _image(tmp_path)
    data = bytearray(path.read_bytes())
    info = measure_eif(io.BytesIO(bytes(data)))
    last = [s for s in info.sections if s.section_type == SectionType.RAMDISK][-1]
    data[last.offset:last.offset + 2] = int(SectionType.KERNEL).to_bytes(2, "big")
    relabelled = measure_eif(io.BytesIO(bytes(data)))
    assert relabelled.measurements.pcr0 == info.measurements.pcr0
    assert _store_key(relabelled) != _store_key(info)
    assert len(_store_key(info)) == 96


def test_an_image_too_large_for_the_memory_is_refused_before_it_is_copied(tmp_path: Path) -> None:
    from enclavekit.errors import AllocatorError

    path = tmp_path / "big.eif"
    with open(path, "wb") as f:
        f.truncate(40 << 20)  # sparse: 40 MiB needs 160 MiB of enclave memory
    sup = _supervisor(tmp_path, path)  # 64 MiB
    with pytest.raises(AllocatorError, match="at least 160 MB") as caught:
        sup._load()
    assert caught.value.code == "E26" and sup.snapshot is None
