"""build-enclave pipeline: structure, determinism, metadata, blobs, and nothing written on failure."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from image_fixtures import M

from enclavekit.errors import ConfigError, FileOperationError, UnsafeArchiveEntry
from enclavekit.formats.cpio import decode
from enclavekit.formats.eif import SectionType, kernel_config_info
from enclavekit.image.blobs import DEFAULT_BLOBS_ROOT, load_blobs, resolve_blobs_dir
from enclavekit.image.builder import BuildOptions, build_enclave, build_time, parse_source_date_epoch
from enclavekit.image.eif_reader import measure_eif, read_section

LAYER = [M("bin", "dir", mode=0o755), M("bin/app", data=b"#!/bin/sh\necho hi\n", mode=0o755),
         M("tmp", "dir", mode=0o1777), M("srv", "dir", mode=0o755)]
CONFIG = {"Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "Env": ["PATH=/bin", "MODE=prod"], "WorkingDir": "/srv",
          "User": "1000"}
NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _build(uri: str, out: Path, **kw: object) -> tuple[object, dict[str, object]]:
    opts = BuildOptions(docker_uri=uri, output_file=str(out), environ={}, now=NOW, **kw)  # type: ignore[arg-type]
    result = build_enclave(opts)
    with open(out, "rb") as f:
        info = measure_eif(f, strict=True)
        ramdisks = [decode(read_section(f, s, max_size=1 << 24)) for s in info.sections_of(SectionType.RAMDISK)]
    return result, {"info": info, "ramdisks": ramdisks}


def test_structure_matches_nitro_cli(images: Callable[..., Path], tmp_path: Path) -> None:
    src = images("docker-archive", [LAYER], CONFIG)
    result, got = _build(f"docker-archive:{src}", tmp_path / "a.eif")
    info = got["info"]
    assert [s.section_type for s in info.sections] == [  # type: ignore[attr-defined]
        SectionType.KERNEL, SectionType.CMDLINE, SectionType.METADATA, SectionType.RAMDISK, SectionType.RAMDISK]
    boot, customer = got["ramdisks"]  # type: ignore[misc]
    assert [(m.name, m.permissions, m.file_type) for m in boot] == [
        ("dev", 0o755, stat.S_IFDIR), ("init", 0o755, stat.S_IFREG), ("nsm.ko", 0o755, stat.S_IFREG)]
    names = {m.name: m for m in customer}
    for d in ("rootfs", "rootfs/dev", "rootfs/run", "rootfs/sys", "rootfs/var", "rootfs/proc", "rootfs/tmp"):
        assert names[d].file_type == stat.S_IFDIR
    assert names["rootfs/tmp"].permissions == 0o1777   # the image's own /tmp wins
    assert names["cmd"].data == b"/bin/app\n--serve\n" and names["cmd"].permissions == 0o644
    assert names["env"].data == b"PATH=/bin\nMODE=prod\n"
    assert names["workdir"].data == b"/srv\n" and names["user"].data == b"1000\n"
    assert names["rootfs/bin/app"].data == b"#!/bin/sh\necho hi\n"
    assert all(m.mtime == 0 for m in customer)
    md = info.metadata  # type: ignore[attr-defined]
    assert md.image_name == "example/app" and len(md.image_version) == 64
    assert md.build_metadata.build_tool == "enclavekit"
    assert md.build_metadata.build_time == "2025-01-02T03:04:05+00:00"
    assert (md.build_metadata.operating_system, md.build_metadata.kernel_version) == ("Linux", "0.0.0")
    assert md.docker_info["Config"]["WorkingDir"] == "/srv"
    assert info.cmdline.startswith(b"reboot=k panic=30")  # type: ignore[attr-defined]
    assert result.measurements == info.measurements  # type: ignore[attr-defined]


def test_overrides_reach_the_ramdisk(images: Callable[..., Path], tmp_path: Path) -> None:
    src = images("oci", [LAYER], CONFIG)
    _, got = _build(f"oci:{src}", tmp_path / "a.eif", cmd='["--check", "a b"]', env=("MODE=dev", "X=1"),
                    workdir="/", user="root", name="n", version="7")
    names = {m.name: m for m in got["ramdisks"][1]}  # type: ignore[index]
    assert names["cmd"].data == b"/bin/app\n--check\na b\n"
    assert names["env"].data == b"PATH=/bin\nMODE=dev\nX=1\n"
    assert names["workdir"].data == b"/\n" and names["user"].data == b"root\n"
    assert got["info"].metadata.image_name == "n"  # type: ignore[attr-defined]
    assert got["info"].metadata.image_version == "7"  # type: ignore[attr-defined]


def test_no_workdir_user_files_when_unset(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "app").write_bytes(b"x")
    _, got = _build(f"dir:{root}", tmp_path / "a.eif", cmd="/app")
    names = {m.name for m in got["ramdisks"][1]}  # type: ignore[index]
    assert "workdir" not in names and "user" not in names and "cmd" in names


def test_source_date_epoch_gives_identical_files(images: Callable[..., Path], tmp_path: Path) -> None:
    src = images("docker-archive", [LAYER], CONFIG, gzip_layers=True)
    a, b = tmp_path / "a.eif", tmp_path / "b.eif"
    _build(f"docker-archive:{src}", a, source_date_epoch=1700000000)
    build_enclave(BuildOptions(docker_uri=f"docker-archive:{src}", output_file=str(b), environ={},
                               now=NOW + dt.timedelta(days=3), source_date_epoch=1700000000))
    assert a.read_bytes() == b.read_bytes()
    with open(a, "rb") as f:
        info = measure_eif(f)
        ramdisk = decode(read_section(f, info.sections_of(SectionType.RAMDISK)[1], max_size=1 << 24))
    assert all(m.mtime == 1700000000 for m in ramdisk)
    assert info.metadata is not None and info.metadata.build_metadata.build_time == "2023-11-14T22:13:20+00:00"


def test_without_source_date_epoch_only_build_time_differs(images: Callable[..., Path], tmp_path: Path) -> None:
    src = images("oci-archive", [LAYER], CONFIG)
    ra = build_enclave(BuildOptions(docker_uri=f"oci-archive:{src}", output_file=str(tmp_path / "a.eif"),
                                    environ={}, now=NOW))
    rb = build_enclave(BuildOptions(docker_uri=f"oci-archive:{src}", output_file=str(tmp_path / "b.eif"),
                                    environ={}, now=NOW + dt.timedelta(seconds=1, microseconds=5)))
    assert ra.measurements == rb.measurements
    infos, datas = [], []
    for name in ("a.eif", "b.eif"):
        with open(tmp_path / name, "rb") as f:
            info = measure_eif(f)
            infos.append(info)
            datas.append([read_section(f, s, max_size=1 << 24) for s in info.sections
                          if s.section_type != SectionType.METADATA])
    assert datas[0] == datas[1]
    ma, mb = (i.metadata for i in infos)
    assert ma is not None and mb is not None and ma.build_metadata.build_time != mb.build_metadata.build_time
    assert dataclasses.replace(ma, build_metadata=mb.build_metadata) == mb


def test_custom_metadata(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"z": 1, "a": {"y": 2, "b": 3}}))
    _, got = _build(f"dir:{root}", tmp_path / "a.eif", cmd="/x", metadata_file=str(meta))
    assert got["info"].metadata.custom_metadata == {"a": {"b": 3, "y": 2}, "z": 1}  # type: ignore[attr-defined]


# ---- failures leave nothing at the output path ---------------------------------------------------------------

def _assert_nothing_written(directory: Path, before: set[Path]) -> None:
    assert set(directory.iterdir()) == before


def test_metadata_too_large(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"k": "x" * 5000}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConfigError, match="4096"):
        build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(out_dir / "a.eif"), cmd="/x",
                                   metadata_file=str(meta), environ={}))
    _assert_nothing_written(out_dir, set())


@pytest.mark.parametrize("content,error", [(None, FileOperationError), (b"{not json", ConfigError)])
def test_metadata_missing_or_invalid(tmp_path: Path, content: bytes | None, error: type[Exception]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    meta = tmp_path / "meta.json"
    if content is not None:
        meta.write_bytes(content)
    with pytest.raises(error):
        build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(tmp_path / "a.eif"), cmd="/x",
                                   metadata_file=str(meta), environ={}))
    assert not (tmp_path / "a.eif").exists()


def test_metadata_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(FileOperationError, match="regular file"):
        build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(tmp_path / "a.eif"), cmd="/x",
                                   metadata_file=str(tmp_path), environ={}))


@pytest.mark.parametrize("blob", ["bzImage", "bzImage.config", "cmdline", "init", "nsm.ko"])
def test_missing_blob(tmp_path: Path, blob: str) -> None:
    blobs = tmp_path / "blobs"
    shutil.copytree(DEFAULT_BLOBS_ROOT / "x86_64", blobs)
    (blobs / blob).unlink()
    root = tmp_path / "root"
    root.mkdir()
    out = tmp_path / "out.eif"
    out.write_bytes(b"previous")
    with pytest.raises(FileOperationError) as info:
        build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(out), cmd="/x", blobs_dir=str(blobs),
                                   environ={}))
    assert info.value.code == "E19" and blob in str(info.value) and str(blobs) in str(info.value)
    assert out.read_bytes() == b"previous"


def test_blobs_from_environment(tmp_path: Path) -> None:
    assert resolve_blobs_dir(None, "x86_64", {"NITRO_CLI_BLOBS": str(tmp_path)}) == tmp_path
    assert resolve_blobs_dir("/explicit", "x86_64", {"NITRO_CLI_BLOBS": str(tmp_path)}) == Path("/explicit")
    assert resolve_blobs_dir(None, "aarch64", {}) == DEFAULT_BLOBS_ROOT / "aarch64"


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_default_blob_sets(arch: str) -> None:
    blobs = load_blobs(DEFAULT_BLOBS_ROOT / arch, arch)
    assert blobs.kernel.read_bytes().startswith(b"enclavekit stand-in kernel: the sandbox runtime does not boot")
    assert kernel_config_info(blobs.kernel_config_text) == ("Linux", "0.0.0")
    assert blobs.cmdline.startswith(b"reboot=k panic=30 pci=off nomodules console=ttyS0")
    assert not blobs.cmdline.endswith(b"\n")
    assert blobs.init.read_bytes().startswith(b"#!/bin/sh")


def test_unsafe_layer_leaves_nothing(images: Callable[..., Path], tmp_path: Path) -> None:
    src = images("docker-archive", [[M("../../evil", data=b"x")]], CONFIG)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UnsafeArchiveEntry):
        build_enclave(BuildOptions(docker_uri=f"docker-archive:{src}", output_file=str(out_dir / "a.eif"),
                                   environ={}))
    _assert_nothing_written(out_dir, set())
    assert not (tmp_path.parent / "evil").exists()


def test_failure_while_writing_removes_the_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"data")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    from enclavekit.image import builder

    def boom(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(builder, "write_eif", boom)
    with pytest.raises(FileOperationError, match="No space"):
        build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(out_dir / "a.eif"), cmd="/f",
                                   environ={}))
    _assert_nothing_written(out_dir, set())


def test_output_directory_missing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(FileOperationError, match="does not exist"):
        build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(tmp_path / "no" / "a.eif"), cmd="/x",
                                   environ={}))


def test_signing_needs_both_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ConfigError) as info:
        build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(tmp_path / "a.eif"), cmd="/x",
                                   signing_certificate="c.pem", environ={}))
    assert info.value.code == "E01"


def test_source_date_epoch_parsing() -> None:
    assert parse_source_date_epoch(None) is None and parse_source_date_epoch("") is None
    assert parse_source_date_epoch("0") == 0
    for bad in ("-1", "1.5", "abc", "99999999999"):
        with pytest.raises(ConfigError):
            parse_source_date_epoch(bad)
    assert build_time(0, None) == "1970-01-01T00:00:00+00:00"
    assert build_time(None, NOW) == "2025-01-02T03:04:05+00:00"


def test_progress_reports_every_byte(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "big").write_bytes(b"z" * (3 << 20))
    seen: list[int] = []
    total: list[int] = []
    build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(tmp_path / "a.eif"), cmd="/big",
                               environ={}), on_start=total.append, progress=seen.append)
    size = (tmp_path / "a.eif").stat().st_size
    assert total == [size]
    assert sum(seen) >= size - 548


def test_image_architecture_must_match(images: Callable[..., Path], tmp_path: Path) -> None:
    src = images("docker-archive", [LAYER], CONFIG)
    with pytest.raises(ConfigError, match="amd64") as info:
        build_enclave(BuildOptions(docker_uri=f"docker-archive:{src}", output_file=str(tmp_path / "a.eif"),
                                   arch="aarch64", environ={}))
    assert "--arch" in (info.value.hint or "")
    assert not (tmp_path / "a.eif").exists()


def test_aarch64_build_uses_the_arm_blobs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _, got = _build(f"dir:{root}", tmp_path / "a.eif", cmd="/x", arch="aarch64")
    info = got["info"]
    assert info.header.arch == "aarch64"  # type: ignore[attr-defined]
    assert info.cmdline.endswith(b"root=/dev/ram0")  # type: ignore[attr-defined]


@pytest.mark.parametrize(("value", "kind"), [("str", "string"), (1, "number"), ([1], "array"), (None, "null"),
                                             (True, "boolean")])
def test_metadata_must_be_an_object(tmp_path: Path, value: object, kind: str) -> None:
    # nitro-cli's describe-eif cannot read an EIF whose CustomMetadata is not a JSON object.
    root = tmp_path / "root"
    root.mkdir()
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(value))
    with pytest.raises(ConfigError, match=f"holds a JSON {kind}; custom metadata must be a JSON object") as info:
        build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(tmp_path / "a.eif"), cmd="/x",
                                   metadata_file=str(meta), environ={}))
    assert info.value.code == "E03"
    assert not (tmp_path / "a.eif").exists()
