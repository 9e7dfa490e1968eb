"""Audit trail figures, measured in one run on the same disk.

1. Durable events/s: the trail's spool (group commit: one write + fsync per batch across concurrent writers)
   against SQLite in WAL mode with synchronous=FULL and one transaction per event (the honest baseline for
   per-request durability), and SQLite with every event batch in one transaction (for reference).
2. The latency the audit path adds to a request: ``Trail.append`` (validate + spool + fsync + ack) with one caller,
   p50/p99.  The KMS Decrypt path is not wired to the trail yet, so this measures the audit append+ack alone.

Usage: python benchmarks/audit.py [--events N] [--threads T] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from enclavekit.audit.events import runtime_event
from enclavekit.audit.trail import Trail, TrailConfig


def _records(n: int) -> list[dict[str, object]]:
    return [runtime_event("RunEnclave", event_time=datetime.now(UTC), event_id=str(uuid.uuid4()), region="us-east-1",
                          account_id="111122223333", enclave_id=f"i-{i:017x}") for i in range(n)]


def _parallel(n: int, threads: int, work) -> float:  # type: ignore[no-untyped-def]
    per = n // threads
    barrier = threading.Barrier(threads + 1)

    def run(t: int) -> None:
        barrier.wait()
        for i in range(per):
            work(t * per + i)

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in pool:
        th.join()
    return per * threads / (time.perf_counter() - start)


def bench_trail(root: Path, records: list[dict[str, object]], threads: int) -> float:
    trail = Trail(root / "trail", config=TrailConfig(max_log_age=3600, max_log_bytes=64 << 20), deliver=False)
    try:
        return _parallel(len(records), threads, lambda i: trail.append(records[i]))
    finally:
        trail.close(seal=False)


def bench_sqlite(root: Path, records: list[dict[str, object]], threads: int, *, batch: bool = False) -> float:
    path = root / f"audit-{'batch' if batch else 'each'}.sqlite"
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE events (id TEXT PRIMARY KEY, body TEXT NOT NULL)")
    setup.commit()
    setup.close()
    local = threading.local()
    lock = threading.Lock()

    def conn() -> sqlite3.Connection:
        c = getattr(local, "c", None)
        if c is None:
            c = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA synchronous=FULL")
            local.c = c
        return c

    if batch:
        c = sqlite3.connect(path, isolation_level=None)
        c.execute("PRAGMA synchronous=FULL")
        start = time.perf_counter()
        for i in range(0, len(records), 100):
            c.execute("BEGIN")
            c.executemany("INSERT INTO events VALUES (?, ?)",
                          [(r["eventID"], json.dumps(r)) for r in records[i:i + 100]])
            c.execute("COMMIT")
        return len(records) / (time.perf_counter() - start)

    def insert(i: int) -> None:
        r = records[i]
        with lock:      # SQLite has one writer; serialising here avoids busy-retry noise
            c = conn()
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO events VALUES (?, ?)", (r["eventID"], json.dumps(r)))
            c.execute("COMMIT")

    return _parallel(len(records), threads, insert)


def bench_latency(root: Path, n: int) -> tuple[float, float]:
    trail = Trail(root / "latency", config=TrailConfig(max_log_age=3600, max_log_bytes=64 << 20), deliver=False)
    samples = []
    try:
        for r in _records(n):
            t0 = time.perf_counter()
            trail.append(r)
            samples.append((time.perf_counter() - t0) * 1000)
    finally:
        trail.close(seal=False)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to measure (default: $TMPDIR)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        records = _records(args.events)
        trail_rate = bench_trail(root, records, args.threads)
        sqlite_rate = bench_sqlite(root, records, args.threads)
        sqlite_batch = bench_sqlite(root, _records(args.events), 1, batch=True)
        p50, p99 = bench_latency(root, 500)
    print(f"durable events/s, {args.threads} concurrent writers, {args.events} events, disk {root.parent}")
    print(f"  trail spool (group commit)           : {trail_rate:10.0f} /s")
    print(f"  SQLite WAL, synchronous=FULL, 1 tx/ev: {sqlite_rate:10.0f} /s")
    print(f"  ratio trail / SQLite per-event        : {trail_rate / sqlite_rate:10.2f}x   (target >= 1x)")
    print(f"  SQLite WAL, 100 events per tx (ref.) : {sqlite_batch:10.0f} /s")
    print("audit append+ack latency, one caller (KMS Decrypt not wired to the trail yet: audit path alone)")
    print(f"  p50 {p50:.3f} ms   p99 {p99:.3f} ms   (target p50 <= 1 ms)")


if __name__ == "__main__":
    main()
