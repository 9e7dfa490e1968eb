"""Merging layers safely: non-directories hide lower subtrees, no write-through-a-link, bounded gzip, many entries.

Review findings (issue 2): a tarball could make the ramdisk write through a symlink (E62 bypass), gzip layers had no
decompression limit, whiteouts were quadratic in the image size, and the entry limit was not documented.
"""

from __future__ import annotations

import gzip
import io
import json
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from image_fixtures import M, docker_archive

from enclavekit.errors import ArchiveError, ConfigError, ImageSourceError, UnsafeArchiveEntry
from enclavekit.formats.cpio import BytesContent, CpioEntry, decode
from enclavekit.formats.eif import SectionType
from enclavekit.image import sources
from enclavekit.image.builder import BuildOptions, build_enclave, customer_ramdisk
from enclavekit.image.eif_reader import measure_eif, read_section
from enclavekit.image.sources import (
    FileContent,
    ImageConfig,
    LoadedImage,
    RunSpec,
    TreeEntry,
    open_source,
    parse_size,
)

CONFIG = {"Cmd": ["/bin/app"]}
RUN = RunSpec(argv=("/bin/app",), env=())


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


# ---- item 1: a non-directory must never end up as the parent of another entry -----------------------------------

@pytest.mark.parametrize("members", [
    [M("a/init", data=b"x"), M("a", "symlink", link="/")],                       # contents first, then the link
    [M("a", "dir", mode=0o755), M("a/init", data=b"x"), M("a", "symlink", link="/")],
    [M("a/b/init", data=b"x"), M("a", "symlink", link="/etc")],                  # a grandchild, no dir entries
    [M("a", "symlink", link="/"), M("a/init", data=b"x")],                       # the link first
], ids=["file-then-link", "dir-file-then-link", "grandchild-then-link", "link-then-file"])
def test_one_layer_cannot_put_entries_below_its_own_symlink(images: Callable[..., Path], tmp_path: Path,
                                                            members: list[M]) -> None:
    path = images("docker-archive", [members], CONFIG)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = _files(tmp_path)
    with pytest.raises(UnsafeArchiveEntry) as info:
        build_enclave(BuildOptions(docker_uri=f"docker-archive:{path}", output_file=str(out_dir / "a.eif"),
                                   environ={}))
    assert info.value.code == "E62"
    assert _files(tmp_path) == before  # nothing written, not even a partial EIF


def test_one_layer_non_directory_over_its_own_entries_refused(images: Callable[..., Path]) -> None:
    path = images("docker-archive", [[M("a/init", data=b"x"), M("a", data=b"a file now")]], CONFIG)
    with pytest.raises(UnsafeArchiveEntry, match="already put 'a/init' below it"):
        open_source(f"docker-archive:{path}")


@pytest.mark.parametrize("lower", [
    [M("a/b/x", data=b"lower")],                                                  # parents implicit
    [M("a", "dir", mode=0o755), M("a/b", "dir", mode=0o755), M("a/b/x", data=b"lower")],
], ids=["implicit-parents", "explicit-parents"])
@pytest.mark.parametrize("upper", [
    M("a", "symlink", link="/etc"),
    M("a", data=b"file"),
    M("a", "fifo"),
], ids=["symlink", "file", "fifo"])
def test_upper_non_directory_hides_the_lower_subtree(images: Callable[..., Path], tmp_path: Path, lower: list[M],
                                                     upper: M) -> None:
    path = images("docker-archive", [lower, [upper]], CONFIG)
    with open_source(f"docker-archive:{path}") as image:
        assert set(image.tree) == {"a"}
        assert image.tree["a"].file_type == {"symlink": stat.S_IFLNK, "file": stat.S_IFREG,
                                             "fifo": stat.S_IFIFO}[upper.kind]
    out = tmp_path / "a.eif"
    build_enclave(BuildOptions(docker_uri=f"docker-archive:{path}", output_file=str(out), environ={}))
    with open(out, "rb") as f:
        info = measure_eif(f, strict=True)
        ramdisk = decode(read_section(f, info.sections_of(SectionType.RAMDISK)[1], max_size=1 << 24))
    names = {m.name for m in ramdisk}
    assert "rootfs/a" in names
    assert not any(n.startswith("rootfs/a/") for n in names)


def test_upper_directory_over_lower_directory_merges(images: Callable[..., Path]) -> None:
    path = images("docker-archive", [[M("a/x", data=b"1")], [M("a", "dir", mode=0o700), M("a/y", data=b"2")]],
                  CONFIG)
    with open_source(f"docker-archive:{path}") as image:
        assert set(image.tree) == {"a/x", "a", "a/y"} and image.tree["a"].mode == 0o700


def test_upper_layer_entry_below_a_lower_symlink_refused(images: Callable[..., Path]) -> None:
    path = images("docker-archive", [[M("a", "symlink", link="/etc")], [M("a/passwd", data=b"x")]], CONFIG)
    with pytest.raises(UnsafeArchiveEntry, match="below the symlink"):
        open_source(f"docker-archive:{path}")


def _image(tree: dict[str, TreeEntry]) -> LoadedImage:
    return LoadedImage("test:", "test", "test", "1", tree, ImageConfig())


@pytest.mark.parametrize("parent", [
    TreeEntry("a", stat.S_IFLNK, 0o777, link_target="/"),
    TreeEntry("a", stat.S_IFREG, 0o644, content=BytesContent(b"")),
], ids=["symlink", "file"])
@pytest.mark.parametrize("child", ["a/init", "a/b/init"])
def test_customer_ramdisk_refuses_a_non_directory_ancestor(parent: TreeEntry, child: str) -> None:
    # The last line of defence, for trees that did not come through the layer merge.
    tree = {"a": parent, child: TreeEntry(child, stat.S_IFREG, 0o644, content=BytesContent(b"x"))}
    with pytest.raises(UnsafeArchiveEntry, match="write through it") as info:
        customer_ramdisk(_image(tree), RUN)
    assert info.value.code == "E62"


def test_customer_ramdisk_adds_missing_parents_as_directories() -> None:
    tree = {"a/b/c": TreeEntry("a/b/c", stat.S_IFREG, 0o644, content=BytesContent(b"x"))}
    entries = {e.path: e for e in customer_ramdisk(_image(tree), RUN).entries}
    assert all(entries[p].file_type == stat.S_IFDIR for p in ("rootfs", "rootfs/a", "rootfs/a/b"))


# ---- whiteouts: correctness at a realistic size (they used to cost entries x whiteouts) ---------------------------

def test_many_whiteouts(tmp_path: Path) -> None:
    # 20k files in 200 directories, then a layer with 5k whiteouts: 4.9k files and 100 whole directories.
    n_dirs, per_dir = 200, 100
    lower = [M(f"d{d:03d}/f{i:03d}") for d in range(n_dirs) for i in range(per_dir)]
    whiteouts = [M(f"d{d:03d}/.wh.f{i:03d}") for d in range(100) for i in range(49)]
    whiteouts += [M(f".wh.d{d:03d}") for d in range(100, 200)]
    whiteouts.append(M("d000/.wh..wh..opq"))
    whiteouts.append(M("d000/new", data=b"new"))
    assert len(whiteouts) == 5002
    path = docker_archive(tmp_path / "img.tar", [lower, whiteouts], CONFIG)
    with open_source(f"docker-archive:{path}") as image:
        tree = image.tree
    expected = {f"d{d:03d}/f{i:03d}" for d in range(1, 100) for i in range(49, per_dir)} | {"d000/new"}
    assert set(tree) == expected


def test_opaque_whiteout_keeps_this_layers_entries_only(images: Callable[..., Path]) -> None:
    lower = [M("o/sub/old", data=b"old"), M("o/top", data=b"top"), M("keep/x", data=b"x")]
    upper = [M("o/sub/new", data=b"new"), M("o/.wh..wh..opq")]
    path = images("docker-archive", [lower, upper], CONFIG)
    with open_source(f"docker-archive:{path}") as image:
        assert set(image.tree) == {"o/sub/new", "keep/x"}


def test_whiteout_of_an_implicit_directory(images: Callable[..., Path]) -> None:
    path = images("docker-archive", [[M("a/b/x", data=b"x"), M("c", data=b"c")], [M(".wh.a")]], CONFIG)
    with open_source(f"docker-archive:{path}") as image:
        assert set(image.tree) == {"c"}


def test_whiteout_then_recreate_in_a_later_layer(images: Callable[..., Path]) -> None:
    path = images("docker-archive", [[M("a/x", data=b"1")], [M(".wh.a")], [M("a/y", data=b"2")]], CONFIG)
    with open_source(f"docker-archive:{path}") as image:
        assert set(image.tree) == {"a/y"}


# ---- item 4: the entry limit and the per-entry footprint --------------------------------------------------------

def test_entry_limit(images: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert sources._MAX_ENTRIES == 1_000_000
    monkeypatch.setattr(sources, "_MAX_ENTRIES", 5)
    path = images("docker-archive", [[M(f"f{i}") for i in range(6)]], CONFIG)
    with pytest.raises(ArchiveError, match="more than 5 entries"):
        open_source(f"docker-archive:{path}")


def test_per_entry_objects_have_no_instance_dict() -> None:
    # slots=True: no per-instance __dict__ (about 100 bytes less per entry, twice per file).
    objs = [TreeEntry("a", stat.S_IFREG, 0o644), FileContent("a", 0, "/root"), BytesContent(b""),
            CpioEntry("a", stat.S_IFREG | 0o644), sources.FileRegionContent("/x", 0, 0)]
    for obj in objs:
        assert not hasattr(obj, "__dict__"), type(obj).__name__


def test_dir_source_content_is_read_through_the_shared_root(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_bytes(b"data")
    with open_source(f"dir:{tmp_path}") as image:
        content = image.tree["sub/f"].content
        assert isinstance(content, FileContent)
        assert content.root == str(tmp_path) and content.file_path == str(tmp_path / "sub" / "f")
        assert b"".join(bytes(c) for c in content.chunks()) == b"data"


# ---- item 2: gzip layers decompress into a bounded amount of temporary space ------------------------------------

def _bomb_archive(tmp_path: Path, size: int) -> Path:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    return _docker_with_raw_layers(tmp_path / "bomb.tar", [gzip.compress(layer.getvalue(), mtime=0)])


def _docker_with_raw_layers(path: Path, layers: list[bytes]) -> Path:
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": CONFIG}).encode()
    files = {f"l{i}/layer.tar": data for i, data in enumerate(layers)}
    files["c.json"] = config
    files["manifest.json"] = json.dumps([{"Config": "c.json", "Layers": list(files)[:len(layers)]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def test_gzip_layer_above_the_limit_refused_and_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _bomb_archive(tmp_path, 4 << 20)  # 4 MiB of zeros: a few KiB compressed
    assert archive.stat().st_size < 64 << 10
    workspaces: list[sources._Workspace] = []
    real = sources._Workspace

    def tracking(*args: int) -> sources._Workspace:
        ws = real(*args)
        workspaces.append(ws)
        return ws

    monkeypatch.setattr(sources, "_Workspace", tracking)
    with pytest.raises(ImageSourceError, match="--max-layer-size") as info:
        open_source(f"docker-archive:{archive}", max_layer_size=1 << 20)
    assert info.value.code == "E63"
    [ws] = workspaces
    assert ws.expanded <= 1 << 20      # stopped at the limit, not after decompressing everything
    assert ws.tmp is None              # the partial temporary file is gone
    with open_source(f"docker-archive:{archive}", max_layer_size=5 << 20) as image:
        assert image.tree["zeros"].size == 4 << 20


def test_gzip_limit_counts_all_layers(tmp_path: Path) -> None:
    def layer(name: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 600 << 10
            tar.addfile(info, io.BytesIO(bytes(info.size)))
        return gzip.compress(buf.getvalue(), mtime=0)

    archive = _docker_with_raw_layers(tmp_path / "two.tar", [layer("a"), layer("b")])
    with pytest.raises(ImageSourceError, match="decompress to more than"):
        open_source(f"docker-archive:{archive}", max_layer_size=1 << 20)


def test_build_options_carry_the_layer_limit(tmp_path: Path) -> None:
    archive = _bomb_archive(tmp_path, 2 << 20)
    out = tmp_path / "a.eif"
    with pytest.raises(ImageSourceError):
        build_enclave(BuildOptions(docker_uri=f"docker-archive:{archive}", output_file=str(out), environ={},
                                   max_layer_size=1 << 20))
    assert not out.exists()


@pytest.mark.parametrize(("text", "value"), [("1048576", 1 << 20), ("512M", 512 << 20), ("16G", 16 << 30),
                                             ("16GiB", 16 << 30), ("2k", 2048), ("1T", 1 << 40)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5G", "G", "12X", "1" * 17])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)
