"""eif-diff: which PCRs, sections and ramdisk files differ, and metadata reported as unmeasured."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from test_signing import signer_for

from enclavekit.errors import EIFFormatError, FileOperationError
from enclavekit.image.builder import BuildOptions, build_enclave
from enclavekit.image.diff import diff_eifs
from enclavekit.image.signing import sign_eif

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def _rootfs(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "app").write_bytes(b"v1")
    os.chmod(path / "bin" / "app", 0o755)
    (path / "etc").mkdir()
    (path / "etc" / "conf").write_bytes(b"conf")
    (path / "etc" / "old").write_bytes(b"old")
    os.symlink("app", path / "bin" / "run")
    return path


def _build(root: Path, out: Path, **kw: object) -> Path:
    build_enclave(BuildOptions(docker_uri=f"dir:{root}", output_file=str(out), cmd="/bin/app", environ={},
                               now=NOW, **kw))  # type: ignore[arg-type]
    return out


def test_reports_added_removed_changed_and_mode(tmp_path: Path) -> None:
    a_root = _rootfs(tmp_path / "a")
    b_root = _rootfs(tmp_path / "b")
    (b_root / "bin" / "app").write_bytes(b"v2-longer")
    os.chmod(b_root / "etc" / "conf", 0o755)
    (b_root / "etc" / "old").unlink()
    (b_root / "etc" / "new").write_bytes(b"new")
    os.unlink(b_root / "bin" / "run")
    os.symlink("other", b_root / "bin" / "run")
    d = diff_eifs(_build(a_root, tmp_path / "a.eif"), _build(b_root, tmp_path / "b.eif", name="a"))
    assert not d.measurements_equal
    assert set(d.pcrs) == {"PCR0", "PCR2"}   # PCR1 (kernel, cmdline, bootstrap) unchanged
    [rd] = [r for r in d.ramdisks if not r.empty]
    assert rd.index == 1
    assert [f.path for f in rd.added] == ["rootfs/etc/new"]
    assert [f.path for f in rd.removed] == ["rootfs/etc/old"]
    changed = {c.path: c.changes for c in rd.changed}
    assert set(changed["rootfs/bin/app"]) == {"sha256", "size"}
    assert changed["rootfs/etc/conf"] == {"mode": (0o644, 0o755)}
    assert changed["rootfs/bin/run"]["link_target"] == ("app", "other")
    assert [s[0].kind for s in d.sections if s[0]] == ["metadata", "ramdisk"]
    text = d.render_text()
    assert "+ rootfs/etc/new" in text and "- rootfs/etc/old" in text and "mode 0644 -> 0755" in text
    assert "does not affect any PCR" in text
    j = d.to_json()
    assert j["MeasurementsEqual"] is False and j["MetadataAffectsPCRs"] is False
    assert j["Ramdisks"][0]["changed"]


def test_metadata_only_difference_keeps_measurements_equal(tmp_path: Path) -> None:
    root = _rootfs(tmp_path / "r")
    d = diff_eifs(_build(root, tmp_path / "a.eif", version="1"), _build(root, tmp_path / "b.eif", version="2"))
    assert d.measurements_equal and not d.identical
    assert d.metadata == {"ImageVersion": ("1", "2")}
    assert all(r.empty for r in d.ramdisks)
    assert "Measurements are identical" in d.render_text()


def test_identical(tmp_path: Path) -> None:
    root = _rootfs(tmp_path / "r")
    a = _build(root, tmp_path / "a.eif")
    d = diff_eifs(a, a)
    assert d.identical and "identical" in d.render_text()


def test_mtime_and_cmdline_differences(tmp_path: Path) -> None:
    import shutil

    from enclavekit.image.blobs import DEFAULT_BLOBS_ROOT

    blobs = tmp_path / "blobs"
    shutil.copytree(DEFAULT_BLOBS_ROOT / "x86_64", blobs)
    (blobs / "cmdline").write_text("console=ttyS0 quiet\n")
    root = _rootfs(tmp_path / "r")
    d = diff_eifs(_build(root, tmp_path / "a.eif", source_date_epoch=1),
                  _build(root, tmp_path / "b.eif", source_date_epoch=2, blobs_dir=str(blobs)))
    assert set(d.pcrs) == {"PCR0", "PCR1", "PCR2"}
    assert d.cmdline is not None and d.cmdline[1] == "console=ttyS0 quiet"
    changed = {c.path: c.changes for r in d.ramdisks for c in r.changed}
    assert changed["rootfs/bin/app"] == {"mtime": (1, 2)}


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileOperationError):
        diff_eifs(tmp_path / "none.eif", tmp_path / "none.eif")
    bad = tmp_path / "bad.eif"
    bad.write_bytes(b"not an eif" * 100)
    with pytest.raises(EIFFormatError):
        diff_eifs(bad, bad)


def test_text_says_absent_for_a_missing_pcr8(tmp_path: Path) -> None:
    root = _rootfs(tmp_path / "r")
    a = _build(root, tmp_path / "a.eif")
    b = _build(root, tmp_path / "b.eif")
    sign_eif(b, signer_for(ec.SECP384R1()))
    d = diff_eifs(a, b)
    assert set(d.pcrs) == {"PCR8"} and d.pcrs["PCR8"][0] is None
    text = d.render_text()
    assert "    a: absent" in text and "None" not in text
    assert "    b: absent" in diff_eifs(b, a).render_text()
