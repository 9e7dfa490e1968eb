"""Offline tests of the seccomp user-notification plumbing and of the NSM and vsock handlers' decisions.

No filter is installed here: the handlers are driven with a recording listener and, for memory access, with this
process's own address space (``TargetMemory(os.getpid())``).  The real round trips are in
tests/integration/test_unmodified_apps.py.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from enclavekit.formats import nsm_messages as msg
from enclavekit.runtime import usernotif
from enclavekit.runtime.nsm_device import NSM_IOCTL_RAW, NSMDevice
from enclavekit.runtime.seccomp import (
    AF_VSOCK,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_USER_NOTIF,
    SeccompFilter,
    sandbox_filter,
)
from enclavekit.runtime.usernotif import (
    NOTIFYING_FILTER_FLAGS,
    Notification,
    NotificationHandler,
    NotificationListener,
    NotificationServer,
    TargetMemory,
    caller_fd,
    dispatch_table,
    merged_filter,
)
from enclavekit.runtime.vsock_translate import (
    VsockTranslator,
    _remove_stale,
    _VSocket,
    pack_sockaddr_vm,
    unpack_sockaddr_vm,
)
from enclavekit.testing.nsm import FakeNSM
from enclavekit.vsock.address import VsockAddress

NOTIF = struct.Struct("<QIIiIQ6Q")


class RecordingListener(NotificationListener):
    """A listener that records the answers instead of sending them (its fd is a pipe, never a seccomp fd)."""

    def __init__(self, valid: bool = True) -> None:
        r, w = os.pipe()
        os.close(w)
        super().__init__(r)
        self.valid = valid
        self.answers: list[tuple[str, int, int]] = []
        self.queue: list[Notification] = []

    def set_sync_wakeup(self) -> bool:
        return False

    def recv(self) -> Notification:
        return self.queue.pop(0)

    def id_valid(self, notification_id: int) -> bool:
        return self.valid

    def respond(self, notification_id: int, value: int = 0) -> bool:
        self.answers.append(("respond", notification_id, value))
        return True

    def fail(self, notification_id: int, error: int) -> bool:
        self.answers.append(("fail", notification_id, error))
        return True

    def continue_call(self, notification_id: int) -> bool:
        self.answers.append(("continue", notification_id, 0))
        return True

    def add_fd(self, notification_id: int, fd: int, *, cloexec: bool = False, send: bool = True) -> int:
        self.answers.append(("add_fd", notification_id, int(cloexec)))
        return 42


def notification(nr: int, *args: int, pid: int | None = None, nid: int = 7) -> Notification:
    padded = (list(args) + [0] * 6)[:6]
    return Notification(nid, os.getpid() if pid is None else pid, 0, nr, 0xC000003E, 0,
                        (padded[0], padded[1], padded[2], padded[3], padded[4], padded[5]))


# ---------------------------------------------------------------------------------------------- structures


def test_notification_from_bytes() -> None:
    data = NOTIF.pack(9, 1234, 0, 16, 0xC000003E, 0x401000, 3, NSM_IOCTL_RAW, 0x7FFF0000, 0, 0, 0)
    n = Notification.from_bytes(data)
    assert (n.id, n.pid, n.nr, n.args[1], n.args[2]) == (9, 1234, 16, NSM_IOCTL_RAW, 0x7FFF0000)


def test_notification_wrong_size() -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        Notification.from_bytes(b"\0" * 79)


def test_notifying_flags_include_wait_killable_recv() -> None:
    # unmodified-apps §2.4: without WAIT_KILLABLE_RECV a signal makes a request run twice
    assert NOTIFYING_FILTER_FLAGS == (1 << 3) | (1 << 5)


def test_fail_rejects_non_errno() -> None:
    listener = NotificationListener(0)
    with pytest.raises(ValueError):
        listener.fail(1, 0)


def test_translator_uses_the_emulations_layout(tmp_path: Path) -> None:
    from enclavekit.runtime import vsock_translate
    from enclavekit.vsock import transport

    assert vsock_translate.EPHEMERAL_PORT_START == transport.EPHEMERAL_PORT_START
    assert vsock_translate.HANDSHAKE_TIMEOUT == transport.HANDSHAKE_TIMEOUT
    address = VsockAddress(3, 5000)
    assert vsock_translate.socket_path(tmp_path, address) == transport.socket_path(tmp_path, address)


def test_sockaddr_vm_round_trip() -> None:
    data = pack_sockaddr_vm(VsockAddress(3, 5000))
    assert len(data) == 16
    assert unpack_sockaddr_vm(data) == VsockAddress(3, 5000)


@pytest.mark.parametrize(("data", "code"), [
    (pack_sockaddr_vm(VsockAddress(3, 1))[:15], errno.EFAULT),                   # too short (vsock_addr_cast)
    (struct.pack("<HHIIB3s", 2, 0, 1, 3, 0, b"\0\0\0"), errno.EAFNOSUPPORT),    # not AF_VSOCK
    (struct.pack("<HHIIB3s", AF_VSOCK, 0, 1, 3, 0, b"\1\0\0"), errno.EINVAL),   # svm_zero not zero
])
def test_sockaddr_vm_rules(data: bytes, code: int) -> None:
    with pytest.raises(OSError) as info:
        unpack_sockaddr_vm(data)
    assert info.value.errno == code


# ---------------------------------------------------------------------------------------------- filter


def _first_action(flt: SeccompFilter, syscall: str, arg0: int = 0, arg1: int = 0) -> int:
    nr = flt.number(syscall)
    for rule in flt.rules:
        if flt.number(rule.syscall) != nr:
            continue
        values = (arg0, arg1)
        if all((values[m.index] == m.value) if m.op == "eq" else bool(values[m.index] & m.value)
               for m in rule.args):
            return rule.action.value
    return flt.default.value


def test_merged_filter_puts_notifications_ahead_of_refusals(tmp_path: Path) -> None:
    # unmodified-apps §5: ERRNO beats USER_NOTIF, so the base's socket(AF_VSOCK) refusal must come after
    handlers: list[NotificationHandler] = [NSMDevice(FakeNSM(), (1, 2)), VsockTranslator(tmp_path, 16)]
    flt = merged_filter(handlers, sandbox_filter())
    assert _first_action(flt, "socket", AF_VSOCK) == SECCOMP_RET_USER_NOTIF
    assert _first_action(flt, "socketpair", AF_VSOCK) == SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT
    assert _first_action(flt, "ioctl", 3, NSM_IOCTL_RAW) == SECCOMP_RET_USER_NOTIF
    assert _first_action(flt, "ioctl", 3, 0x5401) == flt.default.value
    assert _first_action(flt, "io_uring_setup") == SECCOMP_RET_ERRNO | errno.ENOSYS
    assert _first_action(flt, "mount") == SECCOMP_RET_ERRNO | errno.EPERM  # the base policy is kept
    flt.compile()  # still a valid program


def test_dispatch_table_refuses_two_handlers_for_one_call(tmp_path: Path) -> None:
    handlers = [VsockTranslator(tmp_path, 16), VsockTranslator(tmp_path, 17)]
    with pytest.raises(ValueError, match="two handlers"):
        dispatch_table(merged_filter(handlers), handlers)


def test_unhandled_call_is_enosys_never_continue() -> None:
    listener = RecordingListener()
    server = NotificationServer(listener, {})
    listener.queue.append(notification(41, AF_VSOCK, 1, 0))
    server._receive_one()
    assert listener.answers == [("fail", 7, errno.ENOSYS)]
    server.close()


# ---------------------------------------------------------------------------------------------- memory


@pytest.fixture(params=["procmap_query", "maps_text"])
def maps_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of checking writability: the 6.11+ ioctl, and the maps text of older kernels."""
    if request.param == "maps_text":
        monkeypatch.setattr(usernotif, "PROCMAP_QUERY", 0xC0686600)  # an ioctl no kernel knows: ENOTTY
    return str(request.param)


def test_procmap_query_number() -> None:
    # linux/fs.h: _IOWR('f', 17, struct procmap_query), sizeof == 104
    assert usernotif.PROCMAP_QUERY == 0xC0686611


def test_target_memory_reads_and_writes(maps_mode: str) -> None:
    buf = ctypes.create_string_buffer(b"abcdefgh", 8)
    with TargetMemory(os.getpid()) as mem:
        assert mem.read(ctypes.addressof(buf), 8) == b"abcdefgh"
        mem.write(ctypes.addressof(buf) + 2, b"XY")
    assert buf.raw == b"abXYefgh"


def test_target_memory_write_across_two_writable_mappings(maps_mode: str) -> None:
    # two adjacent anonymous mappings with different protections history: one write spans both
    size = mmap.PAGESIZE
    region = mmap.mmap(-1, 2 * size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    # PROT_READ|WRITE|EXEC on the second page only splits the mapping in two VMAs (both writable)
    assert libc.mprotect(ctypes.c_void_p(base + size), size, 7) == 0
    with TargetMemory(os.getpid()) as mem:
        mem.write(base + size - 2, b"wxyz")
    assert region[size - 2:size + 2] == b"wxyz"


@pytest.mark.parametrize("address", [0, 8, (1 << 64) - 4])
def test_target_memory_bad_read_is_efault(address: int) -> None:
    with TargetMemory(os.getpid()) as mem, pytest.raises(OSError) as info:
        mem.read(address, 8)
    assert info.value.errno == errno.EFAULT


def test_target_memory_write_to_read_only_page_is_efault(maps_mode: str) -> None:
    text = ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value
    assert text is not None
    before = ctypes.string_at(text, 1)
    with TargetMemory(os.getpid()) as mem, pytest.raises(OSError) as info:
        mem.write(text, b"\0")
    assert info.value.errno == errno.EFAULT
    assert ctypes.string_at(text, 1) == before


def test_target_memory_write_partly_read_only_writes_nothing(maps_mode: str) -> None:
    size = mmap.PAGESIZE
    region = mmap.mmap(-1, 2 * size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.mprotect(ctypes.c_void_p(base + size), size, mmap.PROT_READ) == 0
    with TargetMemory(os.getpid()) as mem, pytest.raises(OSError) as info:
        mem.write_many([(base, b"ok"), (base + size - 1, b"ab")])
    assert info.value.errno == errno.EFAULT
    assert region[:2] == b"\0\0"


_PEEK_CHILD = """
import ctypes, sys
buf = ctypes.create_string_buffer(b"untouched", 9)
print(ctypes.addressof(buf), flush=True)
sys.stdin.readline()
print(buf.raw.decode(), flush=True)
"""


def _spawn_with_pid(pid: int) -> subprocess.Popen[str] | None:
    """A child that gets PID ``pid`` (``ns_last_pid``, root only); None when another process took it first."""
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
    child = subprocess.Popen([sys.executable, "-c", _PEEK_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    if child.pid == pid:
        return child
    child.kill()
    child.wait()
    return None


def test_target_memory_never_writes_into_a_process_that_reused_the_tid() -> None:
    # review issue 8.3: writes go through /proc/TID/mem opened up front, never by TID (process_vm_writev)
    if os.geteuid() != 0:
        pytest.fail("this test needs root (ns_last_pid)")
    for _ in range(20):
        first = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"],
                                 stdin=subprocess.PIPE)
        mem = TargetMemory(first.pid)  # the caller, pinned
        first.kill()
        first.wait()
        second = _spawn_with_pid(first.pid)
        if second is None:
            mem.close()
            continue
        try:
            assert second.stdout is not None and second.stdin is not None
            address = int(second.stdout.readline())
            with pytest.raises(OSError) as info:
                mem.write(address, b"OVERWRITE")
            assert info.value.errno == errno.EFAULT
            second.stdin.write("\n")
            second.stdin.flush()
            assert second.stdout.readline().strip() == "untouched"
        finally:
            mem.close()
            second.kill()
            second.wait()
        return
    pytest.fail("could not get a recycled PID in 20 tries")


# ---------------------------------------------------------------------------------------------- pidfds


def _thread_pid() -> tuple[int, threading.Event, threading.Thread]:
    ready, done = threading.Event(), threading.Event()
    tids: list[int] = []

    def body() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=body)
    thread.start()
    ready.wait(10)
    return tids[0], done, thread


def test_pidfd_open_of_a_thread_without_pidfd_thread_uses_its_group(monkeypatch: pytest.MonkeyPatch) -> None:
    # review issue 8.7: kernels before 6.9 refuse PIDFD_THREAD (EINVAL) and non-leader TIDs; the thread's group
    # (Tgid) shares the fd table, so pidfd_getfd still works
    monkeypatch.setattr(usernotif, "PIDFD_THREAD", 1 << 30)  # an unknown flag: EINVAL, as before 6.9
    tid, done, thread = _thread_pid()
    try:
        assert tid != os.getpid()
        r, w = os.pipe()
        pidfd = usernotif.pidfd_open(tid)
        try:
            copy = usernotif.pidfd_getfd(pidfd, r)
            assert os.fstat(copy).st_ino == os.fstat(r).st_ino
            os.close(copy)
        finally:
            os.close(pidfd)
            os.close(r)
            os.close(w)
    finally:
        done.set()
        thread.join()


def test_caller_fd_takes_a_copy_and_checks_id_valid() -> None:
    r, w = os.pipe()
    try:
        copy = caller_fd(RecordingListener(), notification(42, r), r)
        assert os.fstat(copy).st_ino == os.fstat(r).st_ino
        os.close(copy)
        with pytest.raises(OSError) as gone:
            caller_fd(RecordingListener(valid=False), notification(42, r), r)
        assert gone.value.errno == errno.ESRCH
        with pytest.raises(OSError) as bad:
            caller_fd(RecordingListener(), notification(42, 999), 999)
        assert bad.value.errno == errno.EBADF
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------------------------- NSM device


class RawCall:
    """A ``struct nsm_raw`` and its buffers in this process, as a C caller would lay them out."""

    def __init__(self, request: bytes, capacity: int = msg.RESPONSE_MAX_SIZE) -> None:
        self.request = ctypes.create_string_buffer(request, max(1, len(request)))
        self.response = ctypes.create_string_buffer(capacity)
        self.raw = ctypes.create_string_buffer(struct.pack("<QQQQ", ctypes.addressof(self.request), len(request),
                                                           ctypes.addressof(self.response), capacity), 32)

    @property
    def address(self) -> int:
        return ctypes.addressof(self.raw)

    @property
    def length(self) -> int:
        return int(struct.unpack("<QQQQ", self.raw.raw)[3])


def serve(device: NSMDevice, arg: int, valid: bool = True) -> int:
    listener = RecordingListener(valid)
    with TargetMemory(os.getpid()) as mem:
        return device._serve(listener, notification(16, 3, NSM_IOCTL_RAW, arg), mem)


def test_nsm_device_answers_and_writes_the_length() -> None:
    device = NSMDevice(FakeNSM(), (0, 0))
    call = RawCall(msg.DescribeNSMRequest().to_bytes())
    assert serve(device, call.address) == 0
    response = msg.decode_response(call.response.raw[:call.length])
    assert isinstance(response, msg.DescribeNSMResponse)
    assert device.executed == 1


def test_nsm_device_truncates_to_the_callers_buffer() -> None:
    device = NSMDevice(FakeNSM(), (0, 0))
    call = RawCall(msg.DescribeNSMRequest().to_bytes(), capacity=8)
    assert serve(device, call.address) == 0
    assert call.length == 8


def test_nsm_device_oversize_is_emsgsize_and_not_run() -> None:
    device = NSMDevice(FakeNSM(), (0, 0))
    call = RawCall(b"\0" * (msg.REQUEST_MAX_SIZE + 1))
    assert serve(device, call.address) == errno.EMSGSIZE
    assert device.executed == 0


def test_nsm_device_bad_struct_pointer_is_efault() -> None:
    assert serve(NSMDevice(FakeNSM(), (0, 0)), 8) == errno.EFAULT


def test_nsm_device_bad_request_pointer_is_efault() -> None:
    device = NSMDevice(FakeNSM(), (0, 0))
    call = RawCall(b"x")
    call.raw.raw = struct.pack("<QQQQ", 8, 12, ctypes.addressof(call.response), 16)
    assert serve(device, call.address) == errno.EFAULT
    assert device.executed == 0


def test_nsm_device_copies_the_whole_struct_back() -> None:
    # review issue 8.9: the driver copies all 32 bytes of struct nsm_raw back, so a struct whose first 24 bytes
    # are read-only is EFAULT (copy_to_user fails) even though response.len alone is writable
    size = mmap.PAGESIZE
    region = mmap.mmap(-1, 2 * size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    call = RawCall(msg.DescribeNSMRequest().to_bytes())
    arg = base + size - 24
    region[size - 24:size + 8] = call.raw.raw
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.mprotect(ctypes.c_void_p(base), size, mmap.PROT_READ) == 0
    device = NSMDevice(FakeNSM(), (0, 0))
    assert serve(device, arg) == errno.EFAULT
    assert device.executed == 1  # as with the driver, the request has run


def test_getsockname_with_no_room_reports_the_length(tmp_path: Path) -> None:
    # review issue 8.9: getsockname(fd, NULL, &0) succeeds and sets the length (move_addr_to_user)
    translator = VsockTranslator(tmp_path, 16)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    st = os.fstat(sock.fileno())
    translator._sockets[(st.st_dev, st.st_ino)] = _VSocket()
    length = ctypes.c_uint32(0)
    listener = RecordingListener()
    server = NotificationServer(listener, {})
    try:
        translator.handle(server, notification(51, sock.fileno(), 0, ctypes.addressof(length)), "getsockname")
    finally:
        sock.close()
        server.close()
    assert listener.answers == [("respond", 7, 0)]
    assert length.value == 16


def test_nsm_device_skips_a_caller_killed_before_execution() -> None:
    device = NSMDevice(FakeNSM(), (0, 0))
    call = RawCall(msg.ExtendPCRRequest(16, b"x").to_bytes())
    serve(device, call.address, valid=False)
    assert device.executed == 0


def test_nsm_ioctl_on_another_fd_is_continued() -> None:
    device = NSMDevice(FakeNSM(), (0, 0))
    listener = RecordingListener()
    server = NotificationServer(listener, {})
    device.handle(server, notification(16, 0, NSM_IOCTL_RAW, 0), "ioctl")
    assert listener.answers == [("continue", 7, 0)]
    assert device.executed == 0
    server.close()


# ---------------------------------------------------------------------------------------------- vsock socket()


@pytest.mark.parametrize(("family", "kind", "proto", "code"), [
    (AF_VSOCK, 1 | 0x100, 0, errno.EINVAL),            # unknown type flag
    (AF_VSOCK, 2, 0, errno.ESOCKTNOSUPPORT),           # SOCK_DGRAM: Nitro vsock is a stream
    (AF_VSOCK, 1, 6, errno.EPROTONOSUPPORT),           # protocol other than 0 / PF_VSOCK
    (2, 1, 0, errno.EAFNOSUPPORT),                     # not AF_VSOCK: answered, never CONTINUEd
])
def test_vsock_socket_rules(tmp_path: Path, family: int, kind: int, proto: int, code: int) -> None:
    translator = VsockTranslator(tmp_path, 16)
    listener = RecordingListener()
    server = NotificationServer(listener, {})
    translator.handle(server, notification(41, family, kind, proto), "socket")
    assert listener.answers == [("fail", 7, code)]
    assert translator.socket_count() == 0
    server.close()


def test_vsock_socket_installs_an_emulated_socket(tmp_path: Path) -> None:
    translator = VsockTranslator(tmp_path, 16)
    listener = RecordingListener()
    server = NotificationServer(listener, {})
    translator.handle(server, notification(41, AF_VSOCK, 1 | os.O_CLOEXEC, 0), "socket")
    assert listener.answers == [("add_fd", 7, 1)]
    assert translator.socket_count() == 1
    assert translator.prune(set) == 1  # nobody holds it any more
    server.close()


def test_vsock_calls_on_other_sockets_are_continued(tmp_path: Path) -> None:
    translator = VsockTranslator(tmp_path, 16)
    listener = RecordingListener()
    server = NotificationServer(listener, {})
    for name in ("connect", "bind", "accept4", "getsockname", "getpeername"):
        translator.handle(server, notification(42, 0, 0, 16), name)
    assert [a[0] for a in listener.answers] == ["continue"] * 5
    server.close()


def test_stale_listener_file_is_replaced_and_a_symlink_refused(tmp_path: Path) -> None:
    stale = tmp_path / "5000.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # bound, never listening: nobody accepts
    _remove_stale(str(stale))
    assert not stale.exists()
    link = tmp_path / "5001.sock"
    link.symlink_to("/run")
    with pytest.raises(OSError) as info:
        _remove_stale(str(link))
    assert info.value.errno == errno.EACCES
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "5002.sock"))
    live.listen(1)
    with pytest.raises(OSError) as busy:
        _remove_stale(str(tmp_path / "5002.sock"))
    assert busy.value.errno == errno.EADDRINUSE
    live.close()
