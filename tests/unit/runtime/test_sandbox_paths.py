"""Paths inside a sandbox root are resolved inside it: an image's symlinks never lead the launcher to the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enclavekit.runtime._sandbox_init import _inside, _StageError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    stage = tmp_path / "stage"
    (stage / "usr" / "lib").mkdir(parents=True)
    (stage / "var").mkdir()
    return stage


def test_plain_paths_join(root: Path) -> None:
    assert _inside(str(root), "/usr/lib/x") == str(root / "usr/lib/x")
    assert _inside(str(root), "/missing/a/b") == str(root / "missing/a/b")


def test_an_absolute_symlink_starts_again_at_the_root(root: Path) -> None:
    (root / "tmp").symlink_to("/etc")  # in the image: /tmp -> /etc, which is the image's /etc, not the host's
    assert _inside(str(root), "/tmp") == str(root / "etc")
    assert _inside(str(root), "/tmp/x/y") == str(root / "etc/x/y")


def test_relative_symlinks_and_dot_dot_stop_at_the_root(root: Path) -> None:
    (root / "var" / "run").symlink_to("../../../../run")  # climbs past the root: clamped there
    assert _inside(str(root), "/var/run/enclavekit") == str(root / "run/enclavekit")
    (root / "lib").symlink_to("usr/lib")
    assert _inside(str(root), "/lib/x") == str(root / "usr/lib/x")


def test_a_symlink_as_the_last_component_is_resolved(root: Path) -> None:
    (root / "dev").symlink_to("/usr/lib")
    assert _inside(str(root), "/dev") == str(root / "usr/lib")


def test_a_symlink_loop_is_refused(root: Path) -> None:
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    with pytest.raises(_StageError, match="too many symlinks"):
        _inside(str(root), "/a/x")


@pytest.mark.parametrize("bad", ["relative", "/a/../b", "/./a"])
def test_non_canonical_paths_are_refused(root: Path, bad: str) -> None:
    with pytest.raises(_StageError, match="absolute and canonical"):
        _inside(str(root), bad)


def test_the_result_never_passes_through_a_symlink(root: Path) -> None:
    (root / "run").symlink_to("/")
    (root / "usr" / "lib" / "deep").symlink_to("/var")
    for path in ("/run/enclavekit/vsock", "/usr/lib/deep/x", "/run/run/run/usr"):
        resolved = Path(_inside(str(root), path))
        current = resolved
        while current != root:
            assert not current.is_symlink(), (path, current)
            current = current.parent
        assert os.path.commonpath([resolved, root]) == str(root)


def test_the_copy_fallback_keeps_modes_owners_and_links(tmp_path: Path) -> None:
    # used when overlayfs cannot be mounted: the shared tree is copied into the private root instead
    from enclavekit.runtime._sandbox_init import _copy_tree

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "app").write_bytes(b"\x7fELF" * 1000)
    (src / "bin" / "app").chmod(0o750)
    (src / "lib").symlink_to("bin")
    (src / "etc").mkdir()
    (src / "etc").chmod(0o700)
    os.chown(src / "etc", 1234, 5678)
    dst.mkdir()
    _copy_tree(str(src), str(dst))
    assert (dst / "bin" / "app").read_bytes() == b"\x7fELF" * 1000
    assert (dst / "bin" / "app").stat().st_mode & 0o777 == 0o750
    assert os.readlink(dst / "lib") == "bin"
    st = (dst / "etc").stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o700, 1234, 5678)


def test_dot_dot_after_a_missing_component_stays_inside(root: Path) -> None:
    # review: the rest of a path after a missing component was joined raw, so x/../../.. climbed out on the host
    (root / "tmp").symlink_to("x/" + "../" * 12 + "etc")
    assert _inside(str(root), "/tmp") == str(root / "etc")
    (root / "run").symlink_to("y/" + "../" * 12 + "run")  # loops back to itself: refused, never resolved outside
    with pytest.raises(_StageError, match="too many symlinks"):
        _inside(str(root), "/run/enclavekit")
    (root / "var" / "lib").symlink_to("/nothing/here/" + "../" * 12 + "usr")
    assert _inside(str(root), "/var/lib/lib") == str(root / "usr/lib")
