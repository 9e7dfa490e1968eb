"""The enclave's system-call filter: rules as data, compiled by hand to classic BPF, installed with ctypes.

A sandbox has exactly ONE filter (a second ``SECCOMP_FILTER_FLAG_NEW_LISTENER`` filter gives ``EBUSY``, and an
``ERRNO`` from any filter beats ``USER_NOTIF`` from another: unmodified-apps.md §5).  So the policy is a list of
:class:`SyscallRule` values, first match wins, and a later stage that serves vsock or the NSM through a supervisor
prepends its ``USER_NOTIF`` rules with :meth:`SeccompFilter.with_rules` before the filter is compiled.

Program shape (``struct seccomp_data``: nr @0, arch @4, instruction_pointer @8, args[i] @16+8i):

1. load ``arch``; anything but the filter's architecture → ``foreign_action`` (kill);
2. load ``nr``; on x86_64 numbers ≥ 0x40000000 are the x32 ABI → ``foreign_action``;
3. one ``jeq nr`` per syscall with rules, each jumping (``ja``, 32-bit offset, so no 255-instruction limit) to
   that syscall's block; no match → ``default``;
4. a block tests its rules in order; an argument test loads the low 32 bits of ``args[i]`` (the kernel ignores
   the upper half of ``int``/``unsigned int`` arguments such as a socket family or an ioctl command).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import platform
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from enclavekit.errors import SeccompError

__all__ = [
    "AUDIT_ARCH_X86_64",
    "AUDIT_ARCH_AARCH64",
    "SYSCALLS",
    "Action",
    "ALLOW",
    "KILL_PROCESS",
    "USER_NOTIF",
    "ArgMatch",
    "SyscallRule",
    "SeccompFilter",
    "sandbox_filter",
    "native_arch",
    "install_filter",
    "describe",
]

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
_X32_SYSCALL_BIT = 0x40000000

# linux/seccomp.h return values
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_JMP_JA = 0x05
_JMP_JEQ_K = 0x15
_JMP_JGE_K = 0x35
_JMP_JSET_K = 0x45
_RET_K = 0x06

_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARGS = 16
_BPF_MAXINSNS = 4096

# Syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl; include/uapi/asm-generic/unistd.h for arm64).
_COMMON_NEW = {  # numbers ≥ 403 are the same on every architecture
    "io_uring_setup": 425, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "clone3": 435, "openat2": 437, "mount_setattr": 442, "fchmodat2": 452,
    "pidfd_getfd": 438, "setxattrat": 463,
}
SYSCALLS: dict[int, dict[str, int]] = {
    AUDIT_ARCH_X86_64: {
        "socket": 41, "socketpair": 53, "clone": 56, "ptrace": 101, "mount": 165, "umount2": 166,
        "pivot_root": 155, "chroot": 161, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "kexec_load": 246, "kexec_file_load": 320, "clock_settime": 227, "clock_adjtime": 305,
        "settimeofday": 164, "adjtimex": 159, "reboot": 169, "swapon": 167, "swapoff": 168, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
        "unshare": 272, "setns": 308, "open_by_handle_at": 304, "process_vm_readv": 310,
        "process_vm_writev": 311, "ioctl": 16, "connect": 42, "bind": 49, "accept": 43, "accept4": 288,
        "getsockname": 51, "getpeername": 52, "open": 2, "creat": 85, "chmod": 90, "fchmod": 91, "openat": 257,
        "fchmodat": 268, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, **_COMMON_NEW,
    },
    AUDIT_ARCH_AARCH64: {
        "socket": 198, "socketpair": 199, "clone": 220, "ptrace": 117, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "kexec_load": 104, "kexec_file_load": 294, "clock_settime": 112, "clock_adjtime": 266,
        "settimeofday": 170, "adjtimex": 171, "reboot": 142, "swapon": 224, "swapoff": 225, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219, "add_key": 217, "request_key": 218,
        "unshare": 97, "setns": 268, "open_by_handle_at": 265, "process_vm_readv": 270,
        "process_vm_writev": 271, "ioctl": 29, "connect": 203, "bind": 200, "accept": 202, "accept4": 242,
        "getsockname": 204, "getpeername": 205, "openat": 56, "fchmod": 52, "fchmodat": 53, "setxattr": 5,
        "lsetxattr": 6, "fsetxattr": 7, **_COMMON_NEW,
    },
}
_SECCOMP_SYSCALL = {AUDIT_ARCH_X86_64: 317, AUDIT_ARCH_AARCH64: 277}

AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
AF_PACKET = 17
AF_VSOCK = 40
# Namespace flags of clone(2): creating namespaces is refused once the sandbox is set up.
# (CLONE_NEWTIME, 0x80, overlaps the exit-signal byte of clone(2) and is accepted by clone3/unshare only.)
_CLONE_NAMESPACE_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                          | 0x40000000)  # NEWNS CGROUP UTS IPC USER PID NET


@dataclass(frozen=True)
class Action:
    """A filter verdict.  ``value`` is the 32-bit ``SECCOMP_RET_*`` word."""

    value: int

    @classmethod
    def errno(cls, number: int) -> Action:
        if not 0 < number < 4096:
            raise ValueError("errno must be in 1..4095")
        return cls(SECCOMP_RET_ERRNO | number)

    @property
    def name(self) -> str:
        kind = self.value & 0xFFFF0000
        names = {SECCOMP_RET_KILL_PROCESS: "KILL_PROCESS", SECCOMP_RET_KILL_THREAD: "KILL_THREAD",
                 SECCOMP_RET_TRAP: "TRAP", SECCOMP_RET_USER_NOTIF: "USER_NOTIF", SECCOMP_RET_LOG: "LOG",
                 SECCOMP_RET_ALLOW: "ALLOW"}
        if kind == SECCOMP_RET_ERRNO:
            return f"ERRNO({errno_mod.errorcode.get(self.value & 0xFFFF, self.value & 0xFFFF)})"
        return names.get(kind, hex(self.value))


ALLOW = Action(SECCOMP_RET_ALLOW)
KILL_PROCESS = Action(SECCOMP_RET_KILL_PROCESS)
USER_NOTIF = Action(SECCOMP_RET_USER_NOTIF)


@dataclass(frozen=True)
class ArgMatch:
    """A test on the low 32 bits of ``args[index]``: ``eq`` (== value) or ``mask_any`` (value & bits != 0)."""

    index: int
    value: int
    op: str = "eq"

    def __post_init__(self) -> None:
        if not 0 <= self.index < 6:
            raise ValueError("syscall argument index must be 0..5")
        if not 0 <= self.value <= 0xFFFFFFFF:
            raise ValueError("argument value must fit 32 bits")
        if self.op not in ("eq", "mask_any"):
            raise ValueError(f"unknown argument test {self.op!r}")


@dataclass(frozen=True)
class SyscallRule:
    """``syscall`` (name or number) with every ``args`` test true → ``action``."""

    syscall: str | int
    action: Action
    args: tuple[ArgMatch, ...] = ()


@dataclass(frozen=True)
class SeccompFilter:
    """An ordered rule list for one architecture; the first matching rule decides, else ``default``."""

    rules: tuple[SyscallRule, ...]
    arch: int = AUDIT_ARCH_X86_64
    default: Action = ALLOW
    foreign_action: Action = KILL_PROCESS
    flags: int = 0

    def __post_init__(self) -> None:
        if self.arch not in SYSCALLS:
            raise ValueError(f"unsupported seccomp architecture {self.arch:#x}")

    def with_rules(self, rules: Iterable[SyscallRule], *, first: bool = True) -> SeccompFilter:
        """A copy with ``rules`` added, ahead of the existing ones (``first``) or after them."""
        extra = tuple(rules)
        merged = extra + self.rules if first else self.rules + extra
        return SeccompFilter(merged, arch=self.arch, default=self.default, foreign_action=self.foreign_action,
                             flags=self.flags)

    def number(self, syscall: str | int) -> int:
        if isinstance(syscall, int):
            return syscall
        try:
            return SYSCALLS[self.arch][syscall]
        except KeyError:
            raise ValueError(f"syscall {syscall!r} has no number for arch {self.arch:#x}") from None

    def compile(self) -> bytes:
        """The filter as an array of ``struct sock_filter`` (8 bytes each: u16 code, u8 jt, u8 jf, u32 k)."""
        prog = _Assembler()
        prog.ld(_OFF_ARCH)
        prog.jeq(self.arch, "arch_ok", None)
        prog.ret(self.foreign_action.value)
        prog.label("arch_ok")
        prog.ld(_OFF_NR)
        if self.arch == AUDIT_ARCH_X86_64:
            prog.jump(_JMP_JGE_K, _X32_SYSCALL_BIT, None, "abi_ok")
            prog.ret(self.foreign_action.value)
            prog.label("abi_ok")
        order: list[int] = []
        by_nr: dict[int, list[SyscallRule]] = {}
        for rule in self.rules:
            nr = self.number(rule.syscall)
            if nr not in by_nr:
                order.append(nr)
                by_nr[nr] = []
            by_nr[nr].append(rule)
        for nr in order:
            prog.jeq(nr, None, f"next_{nr}")  # jt: fall through to the long jump below
            prog.ja(f"block_{nr}")
            prog.label(f"next_{nr}")
        prog.ret(self.default.value)
        for nr in order:
            prog.label(f"block_{nr}")
            for i, rule in enumerate(by_nr[nr]):
                fail = f"rule_{nr}_{i + 1}"
                for match in rule.args:
                    prog.ld(_OFF_ARGS + 8 * match.index)  # low word (little-endian)
                    op = _JMP_JEQ_K if match.op == "eq" else _JMP_JSET_K
                    prog.jump(op, match.value, None, fail)
                prog.ret(rule.action.value)
                prog.label(fail)
            prog.ret(self.default.value)
        code = prog.assemble()
        if len(code) // 8 > _BPF_MAXINSNS:
            raise SeccompError(f"filter has {len(code) // 8} instructions, above the kernel's {_BPF_MAXINSNS}")
        return code


class _Assembler:
    """A tiny classic-BPF assembler with labels (``None`` as a jump target means the next instruction)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, str | None, str | None, int | str]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"duplicate label {name}")
        self.labels[name] = len(self.items)

    def ld(self, offset: int) -> None:
        self.items.append((_LD_W_ABS, None, None, offset))

    def jeq(self, k: int, jt: str | None, jf: str | None) -> None:
        self.jump(_JMP_JEQ_K, k, jt, jf)

    def jump(self, op: int, k: int, jt: str | None, jf: str | None) -> None:
        self.items.append((op, jt, jf, k))

    def ja(self, target: str) -> None:
        self.items.append((_JMP_JA, None, None, target))

    def ret(self, value: int) -> None:
        self.items.append((_RET_K, None, None, value))

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (op, jt, jf, k) in enumerate(self.items):
            def offset(target: str | None, *, wide: bool = False, at: int = i) -> int:
                if target is None:
                    return 0
                delta = self.labels[target] - (at + 1)
                if delta < 0 or (not wide and delta > 255):
                    raise SeccompError(f"BPF jump to {target} out of range ({delta})")
                return delta
            if op == _JMP_JA:
                assert isinstance(k, str)
                out += struct.pack("<HBBI", op, 0, 0, offset(k, wide=True))
            else:
                assert isinstance(k, int)
                out += struct.pack("<HBBI", op, offset(jt), offset(jf), k)
        return bytes(out)


def native_arch() -> int:
    machine = platform.machine()
    if machine in ("x86_64", "amd64"):
        return AUDIT_ARCH_X86_64
    if machine in ("aarch64", "arm64"):
        return AUDIT_ARCH_AARCH64
    raise SeccompError(f"no seccomp support for machine {machine!r}")


# The sandbox policy (issue 4, "seccomp"): syscalls an enclave application must never make.
# Set-user/group-id bits (S_ISUID | S_ISGID) and the open flags that create a file (O_CREAT, __O_TMPFILE).
_SET_ID_BITS = 0o6000
_O_CREATING = 0o100 | 0o20000000
# (syscall, index of the mode argument, index of the flags argument or None): calls that can give a file set-id
# bits.  The sandbox shares writable host directories (its vsock channel directory) and inside root is the host's
# uid 0 (identity map), so a set-uid-root file written there would be one on the host: refused.
_SET_ID_CALLS = (("chmod", 1, None), ("fchmod", 1, None), ("fchmodat", 2, None), ("fchmodat2", 2, None),
                 ("creat", 1, None), ("open", 2, 1), ("openat", 3, 2))

_REFUSED = (
    "ptrace", "mount", "umount2", "pivot_root", "chroot", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "clock_settime", "clock_adjtime", "settimeofday", "adjtimex", "reboot",
    "swapon", "swapoff", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "unshare", "setns", "open_by_handle_at", "process_vm_readv", "process_vm_writev",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # extended attributes: with the identity uid map, security.capability written into a shared host directory
    # would be a file capability on the host
    "setxattr", "lsetxattr", "fsetxattr", "setxattrat",
    # taking another process's file descriptors (PID 1's heartbeat socket and status pipe during boot)
    "pidfd_getfd",
)
# Socket families an enclave may create; every other family is refused (an allow-list, so families a host kernel
# happens to build in (RDS, TIPC, ALG, XDP, ...) never become reachable).  AF_VSOCK is translated, not created, by
# the device emulation's USER_NOTIF rules, which are placed ahead of these.
_SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)


def sandbox_filter(arch: int | None = None) -> SeccompFilter:
    """The base policy of every sandbox.

    * ``socket`` of any family but AF_UNIX, AF_INET, AF_INET6 (so AF_VSOCK, AF_NETLINK, AF_PACKET, ...) and
      ``socketpair`` of any family but AF_UNIX → ``EAFNOSUPPORT``.  AF_INET/AF_INET6 sockets may be created: the
      sandbox's network namespace has only ``lo``, so nothing leaves it.
    * ``io_uring_setup`` → ``ENOSYS`` (io_uring operations bypass seccomp and could open vsock sockets).
    * ``clone3`` → ``ENOSYS`` (its flags sit behind a pointer; libc falls back to ``clone``, checked below).
    * ``clone`` with a namespace flag → ``EPERM``; the syscalls in ``_REFUSED`` → ``EPERM``.
    * giving a file set-user/group-id bits (``chmod`` family, creating ``open``/``openat``/``creat``) → ``EPERM``;
      ``openat2`` → ``ENOSYS`` (its mode is behind a pointer).
    * ``setxattr`` family and ``pidfd_getfd`` → ``EPERM`` (in ``_REFUSED``).
    * everything else is allowed; a foreign architecture or the x32 ABI kills the process.
    """
    a = native_arch() if arch is None else arch
    eperm, eafnosupport, enosys = (Action.errno(errno_mod.EPERM), Action.errno(errno_mod.EAFNOSUPPORT),
                                   Action.errno(errno_mod.ENOSYS))
    rules: list[SyscallRule] = []
    for family in _SOCKET_FAMILIES:
        rules.append(SyscallRule("socket", ALLOW, (ArgMatch(0, family),)))
    rules.append(SyscallRule("socket", eafnosupport))
    rules.append(SyscallRule("socketpair", ALLOW, (ArgMatch(0, AF_UNIX),)))
    rules.append(SyscallRule("socketpair", eafnosupport))
    rules.append(SyscallRule("io_uring_setup", enosys))
    rules.append(SyscallRule("clone3", enosys))
    # clone's flags are args[0] on both x86_64 and arm64.
    rules.append(SyscallRule("clone", eperm, (ArgMatch(0, _CLONE_NAMESPACE_FLAGS, "mask_any"),)))
    rules.extend(SyscallRule(name, eperm) for name in _REFUSED)
    # openat2's mode sits behind a pointer: ENOSYS makes libc and runtimes fall back to openat, checked below.
    rules.append(SyscallRule("openat2", enosys))
    for name, mode_arg, flags_arg in _SET_ID_CALLS:
        if name not in SYSCALLS[a]:
            continue  # arm64 has no open/creat/chmod
        tests: tuple[ArgMatch, ...] = (ArgMatch(mode_arg, _SET_ID_BITS, "mask_any"),)
        if flags_arg is not None:
            tests = (ArgMatch(flags_arg, _O_CREATING, "mask_any"), *tests)
        rules.append(SyscallRule(name, eperm, tests))
    return SeccompFilter(tuple(rules), arch=a)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1


def install_filter(program: bytes, *, arch: int | None = None, flags: int = 0) -> int:
    """Install a compiled filter on the calling thread (and its future children): no_new_privs, then seccomp().

    Returns the syscall's result (a listener fd when ``flags`` holds ``SECCOMP_FILTER_FLAG_NEW_LISTENER``, else 0).
    Call it in a single-threaded child, last, right before ``exec``.
    """
    if not program or len(program) % 8:
        raise ValueError("a BPF program is a non-empty multiple of 8 bytes")
    a = native_arch() if arch is None else arch
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise SeccompError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {errno_mod.errorcode.get(err, err)}")
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    # unmodified-apps.md §4: pass every ctypes syscall argument as c_long.
    rc = libc.syscall(ctypes.c_long(_SECCOMP_SYSCALL[a]), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_long(flags), ctypes.c_void_p(ctypes.addressof(fprog)))
    if rc < 0:
        err = ctypes.get_errno()
        raise SeccompError(f"seccomp(SECCOMP_SET_MODE_FILTER) failed: {errno_mod.errorcode.get(err, err)}")
    return int(rc)


def describe(flt: SeccompFilter) -> Sequence[str]:
    """One line per rule (for docs and debugging)."""
    lines = []
    for r in flt.rules:
        tests = " and ".join(f"arg{m.index} {'==' if m.op == 'eq' else '&'} {m.value:#x}" for m in r.args)
        lines.append(f"{r.syscall}{' if ' + tests if tests else ''} -> {r.action.name}")
    return lines
