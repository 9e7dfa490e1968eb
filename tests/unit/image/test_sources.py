"""Image sources: transports, layers with whiteouts and hard links, config handling, and unsafe entries."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from image_fixtures import M, docker_archive, oci_dir

from enclavekit.errors import (
    ArchiveError,
    ConfigError,
    FileOperationError,
    ImageSourceError,
    UnsafeArchiveEntry,
)
from enclavekit.image.sources import (
    ImageConfig,
    ImagePullError,
    check_link_target,
    open_source,
    parse_cmd,
    parse_env_overrides,
    resolve_run_spec,
)

BASE = [M("bin", "dir", mode=0o755), M("bin/app", data=b"APP", mode=0o755), M("etc", "dir", mode=0o755),
        M("etc/conf", data=b"conf"), M("etc/keep/a", data=b"a"), M("etc/gone/x", data=b"x"),
        M("opaque/lower", data=b"lower"), M("tmp", "dir", mode=0o1777),
        M("home/user/file", data=b"mine", uid=1000, gid=1000), M("dev/null", "char", mode=0o666)]
UPPER = [M("etc/.wh.conf"), M("etc/.wh.gone"), M("opaque/.wh..wh..opq"), M("opaque/upper", data=b"upper"),
         M("bin/link", "hardlink", link="bin/app"), M("bin/sh", "symlink", link="app", mode=0o777),
         M("etc/new", data=b"new")]


def _content(entry) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join(bytes(c) for c in entry.content.chunks())


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive", "oci"])
@pytest.mark.parametrize("gz", [False, True])
def test_transports_apply_layers_with_whiteouts(images: Callable[..., Path], kind: str, gz: bool) -> None:
    path = images(kind, [BASE, UPPER], gzip_layers=gz)
    with open_source(f"{kind}:{path}") as image:
        tree = image.tree
        assert _content(tree["bin/app"]) == b"APP"
        assert _content(tree["bin/link"]) == b"APP"          # hard link: same content, own path
        assert tree["bin/sh"].link_target == "app"
        assert "etc/conf" not in tree                          # .wh.conf
        assert "etc/gone" not in tree and "etc/gone/x" not in tree
        assert _content(tree["etc/keep/a"]) == b"a"
        assert "opaque/lower" not in tree                      # opaque directory hides the lower layer
        assert _content(tree["opaque/upper"]) == b"upper"
        assert tree["tmp"].mode == 0o1777                      # image modes and owners are kept
        assert (tree["home/user/file"].uid, tree["home/user/file"].gid) == (1000, 1000)
        assert tree["dev/null"].file_type == stat.S_IFCHR and tree["dev/null"].rdev_major == 1
        assert image.config.cmd == ("/bin/app",)
        assert len(image.version) == 64


def test_docker_archive_name_and_info(images: Callable[..., Path]) -> None:
    path = images("docker-archive", [BASE], {"Entrypoint": ["/bin/app"], "Cmd": ["-v"]})
    with open_source(f"docker-archive:{path}") as image:
        assert image.name == "example/app"
        assert image.docker_info["RepoTags"] == ["example/app:v1"]
        assert image.docker_info["Id"] == "sha256:" + image.version


def test_oci_picks_the_requested_architecture(images: Callable[..., Path]) -> None:
    path = images("oci", [BASE])
    with open_source(f"oci:{path}", arch="aarch64") as image:
        assert set(image.tree) == {"arm-only"}
        assert image.config.cmd == ("/arm",)
    with open_source(f"oci:{path}", arch="x86_64") as image:
        assert "bin/app" in image.tree


def test_oci_blob_digest_is_verified(images: Callable[..., Path]) -> None:
    path = images("oci", [BASE], gzip_layers=False)
    index = json.loads((path / "index.json").read_text())
    nested_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest_digest = json.loads((path / "blobs/sha256" / nested_digest).read_text())["manifests"][0]["digest"]
    manifest = json.loads((path / "blobs/sha256" / manifest_digest.split(":")[1]).read_text())
    layer = path / "blobs/sha256" / manifest["layers"][0]["digest"].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[600] ^= 1
    layer.write_bytes(bytes(data))
    with pytest.raises(ImageSourceError, match="does not match its digest"):
        open_source(f"oci:{path}")


def test_oci_digest_cannot_name_a_path(images: Callable[..., Path]) -> None:
    path = images("oci", [BASE])
    index = json.loads((path / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageSourceError, match="digest"):
        open_source(f"oci:{path}")


def test_gzip_temporary_files_are_removed(images: Callable[..., Path]) -> None:
    path = images("oci", [BASE], gzip_layers=True)
    image = open_source(f"oci:{path}")
    tmp = image._tmp
    assert tmp is not None and Path(tmp.name).is_dir()
    image.close()
    assert not Path(tmp.name).exists()


# ---- unsafe entries: one test per rule; nothing is written anywhere ------------------------------------------

@pytest.mark.parametrize("member", [
    M("../evil", data=b"x"),
    M("a/../../evil", data=b"x"),
    M("/etc/passwd", data=b"x"),
    M("escape", "symlink", link="../../../etc/passwd"),
    M("a/b/escape", "symlink", link="../../../x"),
    M("abs", "symlink", link="/../../etc"),
    M("hl", "hardlink", link="../outside"),
    M("hl2", "hardlink", link="/etc/passwd"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-escape", "nested-symlink-escape", "absolute-symlink-dotdot",
        "hardlink-escape", "hardlink-absolute"])
@pytest.mark.parametrize("kind", ["docker-archive", "oci"])
def test_unsafe_entries_refused(images: Callable[..., Path], tmp_path: Path, member: M, kind: str) -> None:
    path = images(kind, [[M("a", "dir", mode=0o755), M("a/b", "dir", mode=0o755), member]])
    before = set(tmp_path.rglob("*"))
    with pytest.raises(UnsafeArchiveEntry) as info:
        open_source(f"{kind}:{path}")
    assert info.value.code == "E62"
    assert set(tmp_path.rglob("*")) == before


def test_entry_below_a_symlink_refused(images: Callable[..., Path]) -> None:
    path = images("docker-archive", [[M("etc", "symlink", link="/rootfs-escape"), M("etc/passwd", data=b"x")]])
    with pytest.raises(UnsafeArchiveEntry, match="below the symlink"):
        open_source(f"docker-archive:{path}")


def test_hardlink_to_missing_file(images: Callable[..., Path]) -> None:
    path = images("docker-archive", [[M("hl", "hardlink", link="nothing")]])
    with pytest.raises(ArchiveError, match="names no regular file"):
        open_source(f"docker-archive:{path}")


def test_absolute_symlink_inside_the_image_is_fine() -> None:
    check_link_target("usr/bin/python", "/usr/bin/python3.12")
    check_link_target("lib", "usr/lib")
    check_link_target("a/b/c", "../../d")


# ---- transports and bad sources ------------------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["hello", "hello:v1", "public.ecr.aws/aws-nitro-enclaves/hello:v1",
                                 "registry:5000/x:tag", "ubuntu:22.04"])
def test_bare_names_are_pull_errors(uri: str) -> None:
    with pytest.raises(ImagePullError) as info:
        open_source(uri)
    assert info.value.code == "E50" and "docker-archive:" in (info.value.hint or "")


@pytest.mark.parametrize("uri", ["docker://hello", "containers-storage:hello", "ftp:/x/y"])
def test_unknown_transport(uri: str) -> None:
    with pytest.raises(ImageSourceError) as info:
        open_source(uri)
    assert info.value.code == "E63"


def test_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(FileOperationError):
        open_source(f"docker-archive:{tmp_path / 'nope.tar'}")


def test_not_a_tar(tmp_path: Path) -> None:
    p = tmp_path / "x.tar"
    p.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ArchiveError):
        open_source(f"docker-archive:{p}")


def test_docker_archive_without_manifest(tmp_path: Path) -> None:
    path = docker_archive(tmp_path / "i.tar", [BASE], {"Cmd": ["/x"]})
    import tarfile
    with tarfile.open(path) as src, tarfile.open(tmp_path / "j.tar", "w") as dst:
        for m in src.getmembers():
            if m.name != "manifest.json":
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(ImageSourceError, match=r"manifest\.json"):
        open_source(f"docker-archive:{tmp_path / 'j.tar'}")


def test_oci_without_platform_match(tmp_path: Path) -> None:
    d = tmp_path / "o"
    d.mkdir()
    oci_dir(d, [BASE], {"Cmd": ["/x"]}, arm_too=False)
    with pytest.raises(ImageSourceError, match="linux/arm64"):
        open_source(f"oci:{d}", arch="aarch64")


def test_zstd_layer_refused(tmp_path: Path) -> None:
    path = docker_archive(tmp_path / "i.tar", [BASE], {"Cmd": ["/x"]})
    import tarfile
    with tarfile.open(path) as src, tarfile.open(tmp_path / "z.tar", "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith("layer.tar"):
                data = b"\x28\xb5\x2f\xfd" + data[4:]
            import io
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(ImageSourceError, match="zstd"):
        open_source(f"docker-archive:{tmp_path / 'z.tar'}")


# ---- dir: sources --------------------------------------------------------------------------------------------

def test_dir_source_normalises(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_bytes(b"APP")
    os.chmod(root / "bin" / "app", 0o700)
    (root / "data").write_bytes(b"d")
    os.chmod(root / "data", 0o600)
    os.symlink("bin/app", root / "app")
    with open_source(f"dir:{root}") as image:
        assert image.tree["bin/app"].mode == 0o755 and image.tree["data"].mode == 0o644
        assert image.tree["app"].link_target == "bin/app"
        assert all(e.uid == 0 and e.gid == 0 for e in image.tree.values())
        assert image.version.startswith("dir:sha256:")
        assert image.docker_info is None
        with pytest.raises(ImageSourceError, match="no command") as info:
            resolve_run_spec(image.config, transport="dir")
        assert "--cmd" in (info.value.hint or "")


def test_dir_source_symlink_escape_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("../../etc/shadow", root / "bad")
    with pytest.raises(UnsafeArchiveEntry):
        open_source(f"dir:{root}")


def test_dir_source_missing(tmp_path: Path) -> None:
    with pytest.raises(ImageSourceError):
        open_source(f"dir:{tmp_path / 'none'}")


# ---- run spec ------------------------------------------------------------------------------------------------

def test_entrypoint_and_cmd_are_both_kept() -> None:
    cfg = ImageConfig(entrypoint=("/entry", "--flag"), cmd=("serve",), env=("A=1", "B=2"), workdir="/app",
                      user="1000:1000")
    run = resolve_run_spec(cfg)
    assert run.argv == ("/entry", "--flag", "serve")
    assert run.env == ("A=1", "B=2") and run.workdir == "/app" and run.user == "1000:1000"


def test_overrides() -> None:
    cfg = ImageConfig(entrypoint=("/entry",), cmd=("serve",), env=("A=1", "B=2"), workdir="/app", user="app")
    run = resolve_run_spec(cfg, cmd=parse_cmd("run --port 80"), env=parse_env_overrides(["B=3", "C=4"]),
                           workdir="/srv", user="root")
    assert run.argv == ("/entry", "run", "--port", "80")
    assert run.env == ("A=1", "B=3", "C=4")
    assert (run.workdir, run.user) == ("/srv", "root")


def test_parse_cmd_forms() -> None:
    assert parse_cmd('["/bin/sh", "-c", "echo a b"]') == ("/bin/sh", "-c", "echo a b")
    assert parse_cmd("/bin/sh -c 'echo a b'") == ("/bin/sh", "-c", "echo a b")
    for bad in ("", "[1, 2]", "[not json", "'unbalanced"):
        with pytest.raises(ConfigError):
            parse_cmd(bad)


@pytest.mark.parametrize("bad", ["NOEQUALS", "=value", "A=b\nc"])
def test_bad_env_override(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_env_overrides([bad])


def test_relative_workdir_and_newlines_refused() -> None:
    with pytest.raises(ConfigError, match="absolute"):
        resolve_run_spec(ImageConfig(cmd=("/x",)), workdir="rel")
    with pytest.raises(ConfigError, match="newlines"):
        resolve_run_spec(ImageConfig(cmd=("/x", "a\nb")))


def test_docker_archive_layer_must_match_diff_id(tmp_path: Path) -> None:
    import tarfile

    path = docker_archive(tmp_path / "i.tar", [BASE], {"Cmd": ["/x"]})
    with tarfile.open(path) as src, tarfile.open(tmp_path / "t.tar", "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith("layer.tar"):
                data = data.replace(b"conf", b"CONF")
            import io
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(ImageSourceError, match="does not match its digest"):
        open_source(f"docker-archive:{tmp_path / 't.tar'}")


def test_oci_names(images: Callable[..., Path]) -> None:
    path = images("oci", [BASE])
    with open_source(f"oci:{path}") as image:
        assert image.name == path.name          # ref.name "v2" is only a tag
    path = images("oci-archive", [BASE])
    with open_source(f"oci-archive:{path}") as image:
        assert image.name == path.name.removesuffix(".tar")


def test_mutated_archives_raise_only_enclavekit_errors(tmp_path: Path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from enclavekit.errors import EnclaveKitError

    good = docker_archive(tmp_path / "good.tar", [BASE, UPPER], {"Cmd": ["/x"]}).read_bytes()

    @given(st.integers(0, len(good) - 1), st.integers(0, 255), st.sampled_from(["flip", "truncate"]))
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    def check(pos: int, value: int, kind: str) -> None:
        data = bytearray(good)
        if kind == "flip":
            data[pos] = value
        else:
            del data[pos:]
        target = tmp_path / "m.tar"
        target.write_bytes(bytes(data))
        with contextlib.suppress(EnclaveKitError):
            open_source(f"docker-archive:{target}").close()

    check()
