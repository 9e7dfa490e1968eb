"""Audit trail figures, measured in one run on the same disk.

1. Durable events/s: the trail's spool (group commit: one write + fsync per batch across concurrent writers)
   against SQLite in WAL mode with synchronous=FULL and one transaction per event (the honest baseline for
   per-request durability), and SQLite with every event batch in one transaction (for reference).
2. The latency the audit path adds to a request: ``Trail.append`` (validate + spool + fsync + ack) alone, one
   caller, p50/p99.
3. The latency the audit path adds to a KMS Decrypt: two real ``enclavekit kms serve`` processes on the same disk,
   one with its audit trail, one with ``--unsafe-no-audit`` (records dropped; for this measurement only); one boto3
   client per server, requests alternating between the two so that both see the same machine load; p50/p99 of
   each and the difference (target: p50 difference <= 1 ms).

Usage: python benchmarks/audit.py [--events N] [--threads T] [--decrypts N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("enclavekit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "enclavekit.cli.main"]


class _Server:
    """One ``kms serve`` subprocess with its own data directory (under ``root``: the disk being measured)."""

    def __init__(self, root: Path, name: str, extra: list[str]) -> None:
        self.data = root / name
        self.env = {**os.environ, "ENCLAVEKIT_HOME": str(root / "home")}
        out = subprocess.run([*_cli(), "kms", "create-credentials", "--name", "bench", "--data-dir", str(self.data)],
                             check=True, capture_output=True, text=True, env=self.env)
        self.creds = json.loads(out.stdout)
        self.proc = subprocess.Popen([*_cli(), "kms", "serve", "--data-dir", str(self.data), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"kms serve ({name}) did not start")
        self.endpoint = json.loads(line)["Endpoint"]

    def client(self) -> Any:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]

        return boto3.client("kms", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.creds["AccessKeyId"],
                            aws_secret_access_key=self.creds["SecretAccessKey"],
                            config=Config(retries={"max_attempts": 0}))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[max(0, int(len(samples) * 0.99) - 1)]


def bench_kms_decrypt(root: Path, n: int) -> dict[str, tuple[float, float]]:
    """p50/p99 (ms) of Decrypt against a server with the trail and one with no audit, alternating requests."""
    servers = {"trail": _Server(root, "kms-trail", []), "none": _Server(root, "kms-none", ["--unsafe-no-audit"])}
    try:
        calls = {}
        for name, server in servers.items():
            client = server.client()
            key = client.create_key()["KeyMetadata"]["KeyId"]
            blob = client.encrypt(KeyId=key, Plaintext=b"x" * 32)["CiphertextBlob"]
            for _ in range(50):                                   # warm-up: connections, caches
                client.decrypt(CiphertextBlob=blob)
            calls[name] = (client, blob)
        samples: dict[str, list[float]] = {name: [] for name in servers}
        for i in range(n):
            order = ("trail", "none") if i % 2 else ("none", "trail")
            for name in order:
                client, blob = calls[name]
                t0 = time.perf_counter()
                client.decrypt(CiphertextBlob=blob)
                samples[name].append((time.perf_counter() - t0) * 1000)
    finally:
        for server in servers.values():
            server.stop()
    return {name: _percentiles(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--decrypts", type=int, default=2000, help="Decrypt requests per server (figure 3)")
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to measure (default: $TMPDIR)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        records = _records(args.events)
        trail_rate = bench_trail(root, records, args.threads)
        sqlite_rate = bench_sqlite(root, records, args.threads)
        sqlite_batch = bench_sqlite(root, _records(args.events), 1, batch=True)
        p50, p99 = bench_latency(root, 500)
        decrypt = bench_kms_decrypt(root, args.decrypts)
    print(f"durable events/s, {args.threads} concurrent writers, {args.events} events, disk {root.parent}")
    print(f"  trail spool (group commit)           : {trail_rate:10.0f} /s")
    print(f"  SQLite WAL, synchronous=FULL, 1 tx/ev: {sqlite_rate:10.0f} /s")
    print(f"  ratio trail / SQLite per-event        : {trail_rate / sqlite_rate:10.2f}x   (target >= 1x)")
    print(f"  SQLite WAL, 100 events per tx (ref.) : {sqlite_batch:10.0f} /s")
    print("audit append+ack latency, one caller (Trail.append alone)")
    print(f"  p50 {p50:.3f} ms   p99 {p99:.3f} ms")
    (t50, t99), (n50, n99) = decrypt["trail"], decrypt["none"]
    print(f"KMS Decrypt latency through kms serve, one boto3 client each, {args.decrypts} requests, alternating")
    print(f"  with the audit trail                 : p50 {t50:7.3f} ms   p99 {t99:7.3f} ms")
    print(f"  --unsafe-no-audit (no records)       : p50 {n50:7.3f} ms   p99 {n99:7.3f} ms")
    print(f"  added by the audit path              : p50 {t50 - n50:7.3f} ms   p99 {t99 - n99:7.3f} ms"
          "   (target p50 <= 1 ms)")
    print(f"  ratio trail / no audit (p50)         : {t50 / n50:7.2f}x")


if __name__ == "__main__":
    main()
