"""cgroup layout detection (pure) and the v1/v2 backends against FAKE cgroup trees in a temp dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from enclavekit.errors import CgroupError
from enclavekit.runtime.cgroups import (
    CgroupV1,
    CgroupV2,
    create_cgroup,
    parse_layout,
)

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
3:cpuset:/
1:cpu:/
0::/
"""
V2_MOUNTINFO = """\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
V2_PROC_CGROUP = "0::/user.slice/user-1000.slice/session-2.scope\n"


def test_hybrid_layout_uses_v1(tmp_path: Path) -> None:
    layout = parse_layout(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP, root=tmp_path)
    assert layout.version == 1
    assert layout.own_dir("memory") == tmp_path / "sys/fs/cgroup/memory/process_api/abc"
    assert layout.own_dir("pids") == tmp_path / "sys/fs/cgroup/pids"
    assert layout.own_dir("cpuset") == tmp_path / "sys/fs/cgroup/cpuset"


def test_v2_layout(tmp_path: Path) -> None:
    layout = parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path)
    assert layout.version == 2
    assert layout.own_dir("") == tmp_path / "sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope"


def test_v2_layout_with_a_subtree_mount(tmp_path: Path) -> None:
    # inside a container the cgroup2 mount exposes only the container's subtree
    mountinfo = "30 22 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    layout = parse_layout(mountinfo, "0::/docker/abc/app\n", root=tmp_path)
    assert layout.own_dir("") == tmp_path / "sys/fs/cgroup/app"
    with pytest.raises(CgroupError, match="not visible"):
        parse_layout(mountinfo, "0::/other\n", root=tmp_path)


def test_mountinfo_octal_escapes(tmp_path: Path) -> None:
    mountinfo = "30 22 0:26 / /sys/fs/cgroup\\040v2 rw - cgroup2 cgroup2 rw\n"
    assert parse_layout(mountinfo, "0::/\n", root=tmp_path).own_dir("") == tmp_path / "sys/fs/cgroup v2"


def test_partial_v1_falls_back_to_v2(tmp_path: Path) -> None:
    mountinfo = V2_MOUNTINFO + "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    assert parse_layout(mountinfo, V2_PROC_CGROUP, root=tmp_path).version == 2


@pytest.mark.parametrize(("mountinfo", "proc_cgroup", "why"), [
    ("", "0::/\n", "no cgroup v2 mount"),
    (V2_MOUNTINFO, "4:memory:/\n", "no cgroup v2 mount"),
    ("garbage line\n", "0::/\n", "malformed"),
    (V2_MOUNTINFO, "nonsense\n", "malformed"),
    (V2_MOUNTINFO, "0::/a/../b\n", "not canonical"),
    (HYBRID_MOUNTINFO, "8:pids:/\n3:cpuset:/\n", "no line for the memory"),
])
def test_bad_layouts(tmp_path: Path, mountinfo: str, proc_cgroup: str, why: str) -> None:
    with pytest.raises(CgroupError, match=why):
        parse_layout(mountinfo, proc_cgroup, root=tmp_path)


# ---------------------------------------------------------------- v2 backend on a fake tree


def _fake_v2(tmp_path: Path, controllers: str = "cpuset cpu io memory pids", enabled: str = "") -> Path:
    own = tmp_path / "sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.subtree_control").write_text(enabled + "\n")
    return own


def test_v2_create_and_limits(tmp_path: Path) -> None:
    own = _fake_v2(tmp_path)
    layout = parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path)
    group = create_cgroup("enclave-1", layout=layout)
    assert isinstance(group, CgroupV2) and group.dirs == (own / "enclave-1",)
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids +cpuset"
    path = own / "enclave-1"
    for name in ("memory.swap.max", "memory.oom.group"):
        (path / name).write_text("")
    group.set_memory_limit(256 * 1024 * 1024)
    group.set_pids_max(64)
    assert group.set_cpus([1, 2, 3])
    assert (path / "memory.max").read_text() == str(256 * 1024 * 1024)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "memory.oom.group").read_text() == "1"
    assert (path / "pids.max").read_text() == "64"
    assert (path / "cpuset.cpus").read_text() == "1-3"
    group.add_pid(4242)
    assert (path / "cgroup.procs").read_text() == "4242"


def test_v2_without_swap_accounting_skips_swap_max(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    group = create_cgroup("e", layout=parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path))
    assert isinstance(group, CgroupV2)
    group.set_memory_limit(1 << 26)
    assert not (group.path / "memory.swap.max").exists()


def test_v2_already_enabled_controllers_are_not_rewritten(tmp_path: Path) -> None:
    own = _fake_v2(tmp_path, enabled="memory pids cpuset")
    create_cgroup("e", layout=parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path))
    assert (own / "cgroup.subtree_control").read_text() == "memory pids cpuset\n"


def test_v2_without_cpuset_does_not_pin(tmp_path: Path) -> None:
    own = _fake_v2(tmp_path, controllers="memory pids")
    group = create_cgroup("e", layout=parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path))
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert group.set_cpus([1]) is False


def test_v2_missing_memory_controller(tmp_path: Path) -> None:
    _fake_v2(tmp_path, controllers="cpu pids")
    with pytest.raises(CgroupError, match="not delegated"):
        create_cgroup("e", layout=parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path))


def test_v2_oom_events(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    group = create_cgroup("e", layout=parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path))
    assert isinstance(group, CgroupV2)
    (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n")
    assert group.oom_kills() == 1
    (group.path / "memory.events").write_text("low 0\n")
    assert group.oom_kills() == 0


def test_existing_group_and_bad_names(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    layout = parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path)
    create_cgroup("e", layout=layout)
    with pytest.raises(CgroupError, match="already exists"):
        create_cgroup("e", layout=layout)
    for bad in ("../escape", "a/b", "", ".."):
        with pytest.raises(ValueError):
            create_cgroup(bad, layout=layout)


def test_kill_all_signals_the_listed_processes(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    group = create_cgroup("e", layout=parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path))
    assert isinstance(group, CgroupV2)
    (group.path / "cgroup.kill").write_text("0")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        group.add_pid(child.pid)
        # the fake tree never empties itself: kill_all gives up after its timeout, but the process is dead
        with pytest.raises(CgroupError, match="survive"):
            group.kill_all(timeout=0.2)
        assert child.wait(5) == -signal.SIGKILL
        assert (group.path / "cgroup.kill").read_text() == "1"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_empty_group_is_removed(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    group = create_cgroup("e", layout=parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path))
    assert isinstance(group, CgroupV2)
    group.destroy()
    assert not group.path.exists()
    group.destroy()  # idempotent


def test_remove_failure_is_cgroup_error(tmp_path: Path) -> None:
    _fake_v2(tmp_path)
    group = create_cgroup("e", layout=parse_layout(V2_MOUNTINFO, V2_PROC_CGROUP, root=tmp_path))
    group.set_pids_max(5)  # a regular file makes the fake directory non-empty
    with pytest.raises(CgroupError, match="cannot remove"):
        group.remove(timeout=0.1)


# ---------------------------------------------------------------- v1 backend on a fake tree


def _fake_v1(tmp_path: Path) -> None:
    base = tmp_path / "sys/fs/cgroup"
    (base / "memory/process_api/abc").mkdir(parents=True)
    (base / "pids").mkdir(parents=True)
    (base / "cpuset").mkdir(parents=True)
    (base / "cpuset/cpuset.cpus").write_text("0-1\n")
    (base / "cpuset/cpuset.mems").write_text("0\n")


def test_v1_create_and_limits(tmp_path: Path) -> None:
    _fake_v1(tmp_path)
    group = create_cgroup("enc", layout=parse_layout(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP, root=tmp_path))
    assert isinstance(group, CgroupV1)
    mem = tmp_path / "sys/fs/cgroup/memory/process_api/abc/enc"
    assert group.paths["memory"] == mem
    cpuset = group.paths["cpuset"]
    assert (cpuset / "cpuset.mems").read_text() == "0"
    assert (cpuset / "cpuset.cpus").read_text() == "0-1"
    (mem / "memory.memsw.limit_in_bytes").write_text("")
    group.set_memory_limit(1 << 27)
    group.set_pids_max(32)
    group.set_cpus([1])
    assert (mem / "memory.limit_in_bytes").read_text() == str(1 << 27)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(1 << 27)
    assert (group.paths["pids"] / "pids.max").read_text() == "32"
    assert (cpuset / "cpuset.cpus").read_text() == "1"
    group.add_pid(77)
    assert all((d / "cgroup.procs").read_text() == "77" for d in group.dirs)


def test_v1_oom_control_and_failcnt(tmp_path: Path) -> None:
    _fake_v1(tmp_path)
    group = create_cgroup("enc", layout=parse_layout(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP, root=tmp_path))
    assert isinstance(group, CgroupV1)
    mem = group.paths["memory"]
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert group.oom_kills() == 3
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")  # kernels before 4.13
    (mem / "memory.failcnt").write_text("0\n")
    assert group.oom_kills() == 0
    (mem / "memory.failcnt").write_text("9\n")
    assert group.oom_kills() == 1


def test_v1_failed_create_removes_partial_groups(tmp_path: Path) -> None:
    _fake_v1(tmp_path)
    (tmp_path / "sys/fs/cgroup/cpuset/cpuset.mems").unlink()  # the cpuset step fails
    with pytest.raises(CgroupError):
        create_cgroup("enc", layout=parse_layout(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP, root=tmp_path))
    assert not (tmp_path / "sys/fs/cgroup/memory/process_api/abc/enc").exists()
    assert not (tmp_path / "sys/fs/cgroup/pids/enc").exists()


def test_add_pid_rejects_nonsense(tmp_path: Path) -> None:
    _fake_v1(tmp_path)
    group = create_cgroup("enc", layout=parse_layout(HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP, root=tmp_path))
    with pytest.raises(ValueError):
        group.add_pid(0)
    assert os.getpid() > 0
