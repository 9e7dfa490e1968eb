"""Shared builders for the audit tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from enclavekit.audit.events import runtime_event
from enclavekit.audit.trail import Trail, TrailConfig

ACCOUNT = "111122223333"
REGION = "us-east-1"


def event(n: int = 0, name: str = "RunEnclave") -> dict[str, Any]:
    return runtime_event(name, event_time=datetime.now(UTC), event_id=str(uuid.uuid4()), region=REGION,
                         account_id=ACCOUNT, enclave_id=f"i-{n:017x}-enc{n:016x}")


def build_trail(root: Path, *, rounds: int = 3, per_round: int = 5, seal: bool = True) -> Path:
    """A trail with ``rounds`` digests (one log file each), then a sealing digest."""
    trail = Trail(root, config=TrailConfig(max_log_age=3600), deliver=False)
    try:
        for r in range(rounds):
            for i in range(per_round):
                trail.append(event(r * 100 + i))
            trail.flush()
            trail.step(force_digest=True)
        trail.append(event(999, "TerminateEnclave"))
    finally:
        trail.close(seal=seal)
    return root


def files(root: Path, kind: str) -> list[Path]:
    """Log files (kind="CloudTrail") or digests (kind="CloudTrail-Digest"), oldest first."""
    return sorted(p for p in root.rglob("*.json.gz") if f"/{kind}/" in p.as_posix())
