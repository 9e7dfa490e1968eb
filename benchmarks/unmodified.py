"""Unmodified programs (issue 8): the emulated device paths against the SDK's, measured in the same run.

1. NSM round trip: ``ioctl(/dev/nsm)`` answered through seccomp user notification, against the SDK's socket
   transport to the NSM server (the same NSM behind both; target <= 1.5x).  DescribeNSM (the cheapest request, so
   the transport dominates) and Attestation with a nonce (a signed document, what applications really ask for).
2. vsock: ``socket(AF_VSOCK)`` + ``connect((3, port))`` + one 64-byte round trip + close from an unmodified program
   (stdlib ``socket.AF_VSOCK``), against the SDK's ``enclavekit.sdk.vsock.connect`` doing the same (target <= 2x).

Both clients run in ONE child process, interleaved in batches, under the sandbox's filter merged with the device
emulation's rules (so both pay the same filter); the supervisor side is a thread of this process, as in
``run-enclave``; the vsock echo server (the parent's application) is its own process.  Medians of per-operation
times measured in the child.
Needs root.  Usage: python benchmarks/unmodified.py [--calls 2000] [--connects 500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from enclavekit.nsm.server import NSMServer
from enclavekit.runtime.nsm_device import NSMDevice, make_device_node
from enclavekit.runtime.vsock_translate import VsockTranslator
from enclavekit.testing.nsm import FakeNSM
from enclavekit.testing.unmodified import notified_process

ENCLAVE_CID = 16
PORT = 5300

CLIENT = r"""
import json, os, socket, statistics, sys, time
from enclavekit.formats import nsm_messages as msg
from enclavekit.sdk.nsm import IoctlTransport, SocketTransport
from enclavekit.sdk import vsock as sdk_vsock
from enclavekit.vsock.transport import UnixVsockTransport

calls, connects, nsm_socket, vsock_root, port = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                                 int(sys.argv[5]))
request = msg.DescribeNSMRequest().to_bytes()

def timed(a, b, n, rounds=20):
    # medians (us) of a and b, interleaved in batches so a changing machine load hits both alike
    a(); b()  # warm up
    out = ([], [])
    for _ in range(rounds):
        for fn, samples in ((a, out[0]), (b, out[1])):
            for _ in range(max(1, n // rounds)):
                t = time.perf_counter_ns(); fn(); samples.append(time.perf_counter_ns() - t)
    return statistics.median(out[0]) / 1000.0, statistics.median(out[1]) / 1000.0

sock_t = SocketTransport(nsm_socket)
ioctl_t = IoctlTransport.open("/dev/nsm")
result = {}
result["nsm_socket_us"], result["nsm_ioctl_us"] = timed(lambda: sock_t.exchange(request),
                                                        lambda: ioctl_t.exchange(request), calls)
assert msg.decode_response(ioctl_t.exchange(request)) == msg.decode_response(sock_t.exchange(request))
attest = msg.AttestationRequest(user_data=None, nonce=b"n" * 32, public_key=None).to_bytes()
result["attest_socket_us"], result["attest_ioctl_us"] = timed(lambda: sock_t.exchange(attest),
                                                              lambda: ioctl_t.exchange(attest), max(20, calls // 20))

payload = b"\xa5" * 64

def unmodified():
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    # GUARD: this machine has real vsock; only an emulated (AF_UNIX) socket may ever connect
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) != socket.AF_UNIX:
        os._exit(99)
    s.connect((3, port)); s.sendall(payload)
    got = b""
    while len(got) < 64:
        got += s.recv(64 - len(got))
    s.close()

transport = UnixVsockTransport(vsock_root, local_cid=16)

def sdk():
    c = sdk_vsock.connect(3, port, transport=transport); c.sendall(payload)
    got = b""
    while len(got) < 64:
        got += c.recv(64 - len(got))
    c.close()

result["vsock_sdk_us"], result["vsock_unmodified_us"] = timed(sdk, unmodified, connects)
print(json.dumps(result))
"""

ECHO = r"""
import sys, threading
from enclavekit.vsock.transport import UnixVsockTransport
listener = UnixVsockTransport(sys.argv[1], local_cid=3).listen(int(sys.argv[2]))
print("ready", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = listener.accept()
    serve(conn)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="NSM round trips per transport")
    parser.add_argument("--connects", type=int, default=500, help="vsock connections per path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ekbench") as tmp:
        base = Path(tmp)
        root = base / "vs"
        (root / "3").mkdir(parents=True)
        (root / str(ENCLAVE_CID)).mkdir()
        nsm = FakeNSM()
        node = base / "nsm"
        device = NSMDevice(nsm, make_device_node(node))
        translator = VsockTranslator(root, ENCLAVE_CID)
        echo = subprocess.Popen([sys.executable, "-c", ECHO, str(root), str(PORT)], stdout=subprocess.PIPE)
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
            with NSMServer(nsm, base / "nsm.sock", idle_timeout=None):
                argv = [sys.executable, "-c", CLIENT, str(args.calls), str(args.connects), str(base / "nsm.sock"),
                        str(root), str(PORT)]
                with notified_process(argv, [device, translator], devices={"/dev/nsm": str(node)}) as run:
                    rc, out, err = run.wait(timeout=600)
                    sync = run.server.sync_wakeup
        finally:
            echo.kill()
            echo.wait()
    if rc != 0:
        sys.stderr.write(err.decode())
        return 1
    r = json.loads(out)
    nsm_ratio = r["nsm_ioctl_us"] / r["nsm_socket_us"]
    attest_ratio = r["attest_ioctl_us"] / r["attest_socket_us"]
    vsock_ratio = r["vsock_unmodified_us"] / r["vsock_sdk_us"]
    print(f"seccomp SYNC_WAKE_UP: {'on' if sync else 'unavailable'}")
    print(f"NSM DescribeNSM round trip, median of {args.calls}:")
    print(f"  SDK socket transport      {r['nsm_socket_us']:8.1f} us")
    print(f"  /dev/nsm ioctl (emulated) {r['nsm_ioctl_us']:8.1f} us   ratio {nsm_ratio:.2f}x (target <= 1.5x)")
    print(f"NSM Attestation (nonce) round trip, median of {max(20, args.calls // 20)}:")
    print(f"  SDK socket transport      {r['attest_socket_us']:8.1f} us")
    print(f"  /dev/nsm ioctl (emulated) {r['attest_ioctl_us']:8.1f} us   ratio {attest_ratio:.2f}x (target <= 1.5x)")
    print(f"vsock connect + 64-byte round trip + close, median of {args.connects}:")
    print(f"  SDK (enclavekit.sdk.vsock) {r['vsock_sdk_us']:8.1f} us")
    print(f"  unmodified AF_VSOCK        {r['vsock_unmodified_us']:8.1f} us   ratio {vsock_ratio:.2f}x (target <= 2x)")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
