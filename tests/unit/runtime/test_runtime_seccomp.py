"""The seccomp filter: rules as data, compiled to classic BPF, checked with a small BPF interpreter and, for a
few rules, installed for real in a forked child."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

from enclavekit.errors import SeccompError
from enclavekit.runtime.seccomp import (
    ALLOW,
    AUDIT_ARCH_AARCH64,
    AUDIT_ARCH_X86_64,
    KILL_PROCESS,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_USER_NOTIF,
    SYSCALLS,
    USER_NOTIF,
    Action,
    ArgMatch,
    SeccompFilter,
    SyscallRule,
    describe,
    install_filter,
    native_arch,
    sandbox_filter,
)


def run_bpf(program: bytes, nr: int, arch: int = AUDIT_ARCH_X86_64, args: tuple[int, ...] = ()) -> int:
    """Interpret a classic BPF seccomp program on one ``struct seccomp_data``."""
    full = (*args, *([0] * (6 - len(args))))
    data = struct.pack("<iIQ6Q", nr, arch, 0x401000, *full)
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    for _ in range(len(insns) + 1):
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x05:  # ja
            pc += 1 + k
        elif code in (0x15, 0x35, 0x45):
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:
            return int(k)
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("program did not return")


def _errno(value: int) -> int:
    assert value & 0xFFFF0000 == SECCOMP_RET_ERRNO, hex(value)
    return value & 0xFFFF


@pytest.mark.parametrize("arch", [AUDIT_ARCH_X86_64, AUDIT_ARCH_AARCH64])
def test_sandbox_policy(arch: int) -> None:
    flt = sandbox_filter(arch)
    prog = flt.compile()
    nr = SYSCALLS[arch]
    for family in (40, 16, 17):
        for call in ("socket", "socketpair"):
            assert _errno(run_bpf(prog, nr[call], arch, (family, 1, 0))) == errno.EAFNOSUPPORT
        # the upper half of an int argument is ignored, like the kernel does
        assert _errno(run_bpf(prog, nr["socket"], arch, ((0xFFFFFFFF << 32) | family, 1))) == errno.EAFNOSUPPORT
    for family in (1, 2, 10):  # AF_UNIX, AF_INET, AF_INET6 may be created
        assert run_bpf(prog, nr["socket"], arch, (family, 1, 0)) == ALLOW.value
    for call in ("ptrace", "mount", "umount2", "pivot_root", "init_module", "finit_module", "delete_module",
                 "kexec_load", "kexec_file_load", "clock_settime", "clock_adjtime", "settimeofday", "adjtimex",
                 "reboot", "swapon", "swapoff", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key",
                 "request_key", "unshare", "setns", "open_by_handle_at", "process_vm_readv",
                 "process_vm_writev", "fsopen", "move_mount", "open_tree"):
        assert _errno(run_bpf(prog, nr[call], arch)) == errno.EPERM, call
    assert _errno(run_bpf(prog, nr["io_uring_setup"], arch)) == errno.ENOSYS
    assert _errno(run_bpf(prog, nr["clone3"], arch)) == errno.ENOSYS
    # clone: plain fork/thread flags pass, any namespace flag is refused
    assert run_bpf(prog, nr["clone"], arch, (0x01200011,)) == ALLOW.value
    assert run_bpf(prog, nr["clone"], arch, (0x003D0F00,)) == ALLOW.value  # pthread_create's flags
    for flag in (0x00020000, 0x10000000, 0x20000000, 0x40000000):
        assert _errno(run_bpf(prog, nr["clone"], arch, (flag | 0x11,))) == errno.EPERM
    for call in ("ioctl", "connect", "bind", "accept4"):
        assert run_bpf(prog, nr[call], arch) == ALLOW.value
    assert run_bpf(prog, 0, arch) == ALLOW.value  # read / io_setup


def test_foreign_architecture_is_killed() -> None:
    prog = sandbox_filter(AUDIT_ARCH_X86_64).compile()
    assert run_bpf(prog, 41, AUDIT_ARCH_AARCH64, (40,)) == KILL_PROCESS.value
    assert run_bpf(prog, 41, 0x40000003) == KILL_PROCESS.value  # i386


def test_x32_syscalls_are_killed() -> None:
    prog = sandbox_filter(AUDIT_ARCH_X86_64).compile()
    assert run_bpf(prog, 0x40000000 | 41, AUDIT_ARCH_X86_64, (40,)) == KILL_PROCESS.value
    assert run_bpf(prog, 0x40000000, AUDIT_ARCH_X86_64) == KILL_PROCESS.value


def test_aarch64_has_no_x32_check() -> None:
    prog = sandbox_filter(AUDIT_ARCH_AARCH64).compile()
    assert run_bpf(prog, 0x40000000, AUDIT_ARCH_AARCH64) == ALLOW.value


def test_user_notif_rules_are_prepended_and_win() -> None:
    # what a later stage does: serve socket(AF_VSOCK) and the NSM ioctl through a supervisor
    base = sandbox_filter(AUDIT_ARCH_X86_64)
    extended = base.with_rules([
        SyscallRule("socket", USER_NOTIF, (ArgMatch(0, 40),)),
        SyscallRule("ioctl", USER_NOTIF, (ArgMatch(1, 0xC0200A00),)),
    ])
    prog = extended.compile()
    assert run_bpf(prog, 41, args=(40, 1)) == SECCOMP_RET_USER_NOTIF
    assert _errno(run_bpf(prog, 41, args=(16, 3))) == errno.EAFNOSUPPORT  # base rules still apply
    assert run_bpf(prog, 16, args=(3, 0xC0200A00)) == SECCOMP_RET_USER_NOTIF
    assert run_bpf(prog, 16, args=(3, 0x5401)) == ALLOW.value
    appended = base.with_rules([SyscallRule("socket", USER_NOTIF, (ArgMatch(0, 40),))], first=False)
    assert _errno(run_bpf(appended.compile(), 41, args=(40, 1))) == errno.EAFNOSUPPORT


def test_multiple_argument_tests_all_must_match() -> None:
    flt = SeccompFilter((SyscallRule(41, Action.errno(errno.EACCES), (ArgMatch(0, 2), ArgMatch(1, 3))),))
    prog = flt.compile()
    assert _errno(run_bpf(prog, 41, args=(2, 3))) == errno.EACCES
    assert run_bpf(prog, 41, args=(2, 1)) == ALLOW.value
    assert run_bpf(prog, 41, args=(10, 3)) == ALLOW.value


def test_default_action_and_long_programs() -> None:
    # more than 255 instructions between the dispatch and the blocks: the 32-bit `ja` keeps it valid
    rules = tuple(SyscallRule(n, Action.errno(1 + n % 100), (ArgMatch(0, n),)) for n in range(200))
    flt = SeccompFilter(rules, default=Action.errno(errno.ENOSYS))
    prog = flt.compile()
    assert len(prog) // 8 > 600
    assert _errno(run_bpf(prog, 150, args=(150,))) == 1 + 150 % 100
    assert _errno(run_bpf(prog, 150, args=(151,))) == errno.ENOSYS
    assert _errno(run_bpf(prog, 999)) == errno.ENOSYS


def test_program_size_limit() -> None:
    rules = tuple(SyscallRule(n, ALLOW, (ArgMatch(0, 1),)) for n in range(1000))
    with pytest.raises(SeccompError, match="instructions"):
        SeccompFilter(rules).compile()


def test_invalid_rule_data() -> None:
    with pytest.raises(ValueError):
        ArgMatch(6, 1)
    with pytest.raises(ValueError):
        ArgMatch(0, 1 << 32)
    with pytest.raises(ValueError):
        ArgMatch(0, 1, "lt")
    with pytest.raises(ValueError):
        Action.errno(0)
    with pytest.raises(ValueError):
        SeccompFilter((), arch=0x1234)
    with pytest.raises(ValueError, match="no number"):
        SeccompFilter((SyscallRule("no_such_call", ALLOW),)).compile()
    with pytest.raises(ValueError):
        install_filter(b"\x00" * 7)


def test_describe_names_rules() -> None:
    lines = describe(sandbox_filter(AUDIT_ARCH_X86_64))
    # socket families are an allow-list: AF_UNIX, AF_INET, AF_INET6, then everything else refused
    assert lines.index("socket if arg0 == 0x1 -> ALLOW") < lines.index("socket -> ERRNO(EAFNOSUPPORT)")
    assert "socket if arg0 == 0x28 -> ALLOW" not in lines
    assert "socketpair -> ERRNO(EAFNOSUPPORT)" in lines
    assert "fsetxattr -> ERRNO(EPERM)" in lines
    assert "pidfd_getfd -> ERRNO(EPERM)" in lines
    assert "ptrace -> ERRNO(EPERM)" in lines
    assert "clone3 -> ERRNO(ENOSYS)" in lines


def test_install_in_a_child_refuses_for_real() -> None:
    """Fork, install the sandbox filter, and make a few refused calls through libc (no network, no vsock)."""
    prog = sandbox_filter().compile()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            install_filter(prog)
            libc = ctypes.CDLL(None, use_errno=True)
            results = []
            rc = libc.ptrace(ctypes.c_long(0), ctypes.c_long(0), None, None)  # PTRACE_TRACEME
            results.append(ctypes.get_errno() if rc < 0 else 0)
            rc = libc.socket(ctypes.c_int(16), ctypes.c_int(3), ctypes.c_int(0))  # AF_NETLINK
            results.append(ctypes.get_errno() if rc < 0 else 0)
            rc = libc.unshare(ctypes.c_int(0x00020000))
            results.append(ctypes.get_errno() if rc < 0 else 0)
            status = open("/proc/self/status").read()  # noqa: SIM115
            results.append(int(status.split("Seccomp:")[1].split()[0]))
            os.write(w, repr(results).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 100):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert out.decode() == repr([errno.EPERM, errno.EAFNOSUPPORT, errno.EPERM, 2])


def test_native_arch() -> None:
    assert native_arch() in (AUDIT_ARCH_X86_64, AUDIT_ARCH_AARCH64)
