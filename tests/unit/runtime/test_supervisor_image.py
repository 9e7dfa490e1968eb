"""The supervisor's reading of an EIF: the application (cmd/env/workdir/user) and the rootfs unpacking rules."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from enclavekit.errors import EIFFormatError
from enclavekit.formats.cpio import TRAILER_NAME, BytesContent, CpioArchive, CpioEntry, encode_header
from enclavekit.formats.eif import BuildMetadata, EIFMetadata
from enclavekit.image.eif_reader import measure_eif
from enclavekit.image.eif_writer import BytesSource, EIFContent, write_eif
from enclavekit.runtime.supervisor import (
    DEFAULT_PATH,
    RunRequest,
    boot_timeout,
    load_parent_identity,
    read_application,
    unpack_rootfs,
)

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
LNK = stat.S_IFLNK | 0o777


def _file(path: str, data: bytes, mode: int = REG) -> CpioEntry:
    return CpioEntry(path=path, mode=mode, content=BytesContent(data))


def _eif(*ramdisks: list[CpioEntry]) -> io.BytesIO:
    out = io.BytesIO()
    meta = EIFMetadata("img", "1", BuildMetadata("2024-01-01T00:00:00+00:00", "enclavekit", "0.1.0", "Linux", "6.1"))
    content = EIFContent(kernel=BytesSource(b"kernel"), cmdline=b"console=ttyS0", metadata=meta,
                         ramdisks=[BytesSource(CpioArchive(r).to_bytes()) for r in ramdisks])
    write_eif(out, content)
    out.seek(0)
    return out


BOOTSTRAP = [CpioEntry(path="dev", mode=DIR), _file("init", b"#!init", stat.S_IFREG | 0o755),
             _file("nsm.ko", b"module")]


def _customer(*extra: CpioEntry, cmd: bytes = b"/bin/app\n--flag\n", env: bytes = b"A=1\nB=x=y\n") -> list[CpioEntry]:
    return [CpioEntry(path="rootfs", mode=DIR), CpioEntry(path="rootfs/bin", mode=DIR),
            _file("rootfs/bin/app", b"\x7fELF", stat.S_IFREG | 0o755), *extra,
            _file("cmd", cmd), _file("env", env)]


def _app(*ramdisks: list[CpioEntry]):  # type: ignore[no-untyped-def]
    f = _eif(*ramdisks)
    return read_application(f, measure_eif(f))


def test_application_from_cmd_and_env() -> None:
    app = _app(BOOTSTRAP, _customer())
    assert app.argv == ("/bin/app", "--flag")
    assert app.env == {"A": "1", "B": "x=y", "PATH": DEFAULT_PATH}
    assert (app.workdir, app.uid, app.gid) == ("/", 0, 0)


def test_workdir_and_named_user() -> None:
    passwd = b"root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
    app = _app(BOOTSTRAP, _customer(CpioEntry(path="rootfs/etc", mode=DIR), _file("rootfs/etc/passwd", passwd),
                                    _file("workdir", b"/srv/./app\n"), _file("user", b"app\n")))
    assert (app.workdir, app.uid, app.gid) == ("/srv/app", 1000, 1001)


def test_numeric_user_and_group() -> None:
    app = _app(BOOTSTRAP, _customer(_file("user", b"42:43\n")))
    assert (app.uid, app.gid) == (42, 43)


def test_unknown_user_is_refused() -> None:
    with pytest.raises(EIFFormatError, match="not in the image"):
        _app(BOOTSTRAP, _customer(_file("user", b"nobody\n")))


def test_missing_or_empty_cmd_is_refused() -> None:
    with pytest.raises(EIFFormatError, match="no cmd"):
        _app(BOOTSTRAP)
    with pytest.raises(EIFFormatError, match="empty"):
        _app(BOOTSTRAP, _customer(cmd=b"\n"))


def test_relative_workdir_is_refused() -> None:
    with pytest.raises(EIFFormatError, match="workdir"):
        _app(BOOTSTRAP, _customer(_file("workdir", b"srv\n")))


def _unpack(tmp_path: Path, *ramdisks: list[CpioEntry]) -> Path:
    f = _eif(*ramdisks)
    root = tmp_path / "root"
    root.mkdir()
    unpack_rootfs(f, measure_eif(f), root)
    return root


def test_only_rootfs_is_unpacked_and_bootstrap_is_not(tmp_path: Path) -> None:
    root = _unpack(tmp_path, BOOTSTRAP,
                   _customer(CpioEntry(path="rootfs/lib", mode=DIR), CpioEntry(path="rootfs/lib/l", mode=LNK,
                                                                               link_target="../bin/app")))
    assert sorted(os.listdir(root)) == ["bin", "lib"]
    assert (root / "bin" / "app").read_bytes() == b"\x7fELF"
    assert stat.S_IMODE((root / "bin" / "app").stat().st_mode) == 0o755
    assert os.readlink(root / "lib" / "l") == "../bin/app"


def test_entry_climbing_out_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EIFFormatError, match="climbs out"):
        _unpack(tmp_path, BOOTSTRAP, _customer(_file("rootfs/../../escape", b"x")))
    assert not (tmp_path / "escape").exists()


def test_write_through_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = _customer(CpioEntry(path="rootfs/etc", mode=LNK, link_target=str(outside)),
                     _file("rootfs/etc/passwd", b"owned"))
    with pytest.raises(EIFFormatError, match="not a directory"):
        _unpack(tmp_path, BOOTSTRAP, evil)
    assert os.listdir(outside) == []


def _raw_cpio(*entries: tuple[int, int, int, str, bytes]) -> bytes:
    """A newc archive with chosen inode numbers and link counts: ``(ino, mode, nlink, name, data)``."""
    out = b""
    for ino, mode, nlink, name, data in entries:
        out += encode_header(ino=ino, mode=mode, uid=0, gid=0, nlink=nlink, mtime=0, filesize=len(data),
                             rdev_major=0, rdev_minor=0, name=name)
        out += data + b"\0" * (-len(data) % 4)
    return out + encode_header(ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, filesize=0, rdev_major=0,
                               rdev_minor=0, name=TRAILER_NAME)


def test_hard_links_are_keyed_per_ramdisk(tmp_path: Path) -> None:
    # both ramdisks number their inodes from 1: inode 7 is "a" in the first and "b" in the second.  newc stores
    # a hard-linked file's data once (here with the last name); the empty names before it are its other links.
    first = _raw_cpio((1, DIR, 2, "rootfs", b""), (7, REG, 2, "rootfs/a1", b""), (7, REG, 2, "rootfs/a2", b"AAAA"))
    second = _raw_cpio((1, DIR, 2, "rootfs", b""), (7, REG, 2, "rootfs/b1", b""), (7, REG, 2, "rootfs/b2", b"BB"),
                       (2, REG, 1, "cmd", b"/a1\n"))
    out = io.BytesIO()
    meta = EIFMetadata("img", "1", BuildMetadata("2024-01-01T00:00:00+00:00", "enclavekit", "0.1.0", "Linux", "6.1"))
    write_eif(out, EIFContent(kernel=BytesSource(b"k"), cmdline=b"", metadata=meta,
                              ramdisks=[BytesSource(first), BytesSource(second)]))
    out.seek(0)
    root = tmp_path / "root"
    root.mkdir()
    unpack_rootfs(out, measure_eif(out), root)
    assert [(root / n).read_bytes() for n in ("a1", "a2", "b1", "b2")] == [b"AAAA", b"AAAA", b"BB", b"BB"]
    assert os.path.samefile(root / "a1", root / "a2") and os.path.samefile(root / "b1", root / "b2")
    assert not os.path.samefile(root / "a1", root / "b1")  # same inode number, other ramdisk: not a link


def test_not_a_cpio_ramdisk_is_e35(tmp_path: Path) -> None:
    out = io.BytesIO()
    meta = EIFMetadata("img", "1", BuildMetadata("2024-01-01T00:00:00+00:00", "enclavekit", "0.1.0", "Linux", "6.1"))
    write_eif(out, EIFContent(kernel=BytesSource(b"k"), cmdline=b"", metadata=meta,
                              ramdisks=[BytesSource(b"\x1f\x8b gzip, not cpio")]))
    out.seek(0)
    with pytest.raises(EIFFormatError, match="not an uncompressed newc"):
        read_application(out, measure_eif(out))


def test_boot_timeout_formula() -> None:
    # §3.8: 90 s per started 6 GiB of image + 90 s per started 100 GiB of memory
    assert boot_timeout(10 << 20, 512) == 180.0
    assert boot_timeout((6 << 30) + 1, 512) == 270.0
    assert boot_timeout(1, 100 * 1024 + 1) == 270.0


def test_parent_identity_file(tmp_path: Path) -> None:
    assert load_parent_identity(tmp_path) == (None, None)
    (tmp_path / "parent.json").write_text('{"role_arn": "arn:x", "instance_id": "i-1"}')
    assert load_parent_identity(tmp_path) == ("arn:x", "i-1")
    (tmp_path / "parent.json").write_text('{"role": "arn:x"}')
    with pytest.raises(Exception, match="expected an object"):
        load_parent_identity(tmp_path)


def test_run_request_round_trip_and_rules() -> None:
    req = RunRequest(eif_path="/x.eif", memory_mib=64, cpu_ids=(1,), debug_mode=True)
    assert RunRequest.from_json(req.to_json()) == req
    with pytest.raises(ValueError):
        RunRequest(eif_path="/x.eif", memory_mib=64)
    with pytest.raises(ValueError):
        RunRequest.from_json({**req.to_json(), "extra": 1})


def test_a_hard_link_to_a_path_replaced_by_a_symlink_is_refused(tmp_path: Path) -> None:
    # review: "a" holds the data of inode 5, is then replaced by a symlink to a host file, and "b" (inode 5 again,
    # mode 04777) used to be linked to that symlink and chmod'ed through it: the host file became set-uid
    host = tmp_path / "host-file"
    host.write_text("host")
    host.chmod(0o644)
    disk = _raw_cpio((1, DIR, 2, "rootfs", b""), (5, REG, 2, "rootfs/a", b"data"),
                     (6, LNK, 1, "rootfs/a", str(host).encode()), (5, stat.S_IFREG | 0o4777, 2, "rootfs/b", b""),
                     (2, REG, 1, "cmd", b"/a\n"))
    out = io.BytesIO()
    meta = EIFMetadata("img", "1", BuildMetadata("2024-01-01T00:00:00+00:00", "enclavekit", "0.1.0", "Linux", "6.1"))
    write_eif(out, EIFContent(kernel=BytesSource(b"k"), cmdline=b"", metadata=meta, ramdisks=[BytesSource(disk)]))
    out.seek(0)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(EIFFormatError, match="replaced"):
        unpack_rootfs(out, measure_eif(out), root)
    assert stat.S_IMODE(host.stat().st_mode) == 0o644
