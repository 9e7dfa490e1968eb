"""Crash consistency: a writer under load is SIGKILLed; every acknowledged event is in the trail after recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from enclavekit.audit.trail import LocalDestination, Trail, TrailConfig, iter_records, read_heads, read_public_keys
from enclavekit.audit.validate import validate_trail

pytestmark = pytest.mark.integration

WRITER = textwrap.dedent("""
    import sys, threading, uuid
    from datetime import UTC, datetime
    from pathlib import Path
    from enclavekit.audit.events import runtime_event
    from enclavekit.audit.trail import Trail, TrailConfig

    trail = Trail(Path(sys.argv[1]), config=TrailConfig(max_log_age=0.05, max_log_bytes=8192, poll_interval=0.02,
                                                        digest_interval=0.3))
    out = threading.Lock()

    def work(n):
        i = 0
        while True:
            e = runtime_event("RunEnclave", event_time=datetime.now(UTC), event_id=str(uuid.uuid4()),
                              region="us-east-1", account_id="111122223333", enclave_id=f"i-{n}-{i}")
            trail.append(e)            # returns once durable: the event is acknowledged
            with out:
                sys.stdout.write(e["eventID"] + "\\n")
                sys.stdout.flush()
            i += 1

    for n in range(6):
        threading.Thread(target=work, args=(n,), daemon=True).start()
    threading.Event().wait()
""")


@pytest.mark.parametrize("run", range(2))
def test_sigkill_under_load_loses_no_acknowledged_event(tmp_path: Path, run: int) -> None:
    trail_dir = tmp_path / "trail"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(trail_dir)], stdout=subprocess.PIPE)
    acked: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 1.5 + run
    os.set_blocking(proc.stdout.fileno(), False)
    buffer = b""
    while time.monotonic() < deadline:
        chunk = proc.stdout.read()
        if chunk:
            buffer += chunk
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read()
    buffer += rest or b""
    acked = [line.decode() for line in buffer.split(b"\n")[:-1]]   # a torn last line was never fully printed
    assert len(acked) > 100, "the writer did not get going"

    # recovery: a new process opens the trail, finishes interrupted writes, delivers the spool, seals
    trail = Trail(trail_dir, config=TrailConfig(max_log_age=0.05, max_log_bytes=8192, digest_interval=0.3),
                  deliver=False)
    trail.close()
    delivered = [r["eventID"] for _k, r in iter_records(LocalDestination(trail_dir))]
    missing = set(acked) - set(delivered)
    assert not missing, f"{len(missing)} acknowledged events lost"
    report = validate_trail(LocalDestination(trail_dir), public_keys=read_public_keys(trail_dir),
                            heads=read_heads(trail_dir / "state" / "heads.jsonl"))
    assert report.exit_status == 0, [f.line() for f in report.failures][:5]
