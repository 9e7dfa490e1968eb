"""``enclavekit audit``: validate a trail, read its events, export its public key.

``audit validate --trail DIR | s3://bucket/prefix`` prints one line per failure (and per valid file with
``--verbose``) like ``aws cloudtrail validate-logs``, then a summary; exit status 0 = valid, 1 = tampering,
2 = gaps, staleness or no digests (docs/audit.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from rich.console import Console
from rich.table import Table

from enclavekit.audit.digest import fingerprint
from enclavekit.audit.events import format_time
from enclavekit.audit.s3 import S3Destination, parse_s3_url
from enclavekit.audit.trail import (
    Destination,
    LocalDestination,
    iter_records,
    read_heads,
    read_public_keys,
    read_trail_config,
)
from enclavekit.audit.validate import validate_trail
from enclavekit.errors import AuditKeyError, ConfigError

__all__ = ["register", "run_validate", "run_events", "run_public_key"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = sub.add_parser("audit", help="the tamper-evident audit trail (CloudTrail format)",
                           description="Validate an audit trail, print its events, export its public key.")
    asub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    asub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--trail", required=True, help="trail directory, or s3://bucket/prefix")
        p.add_argument("--endpoint-url", help="S3-compatible endpoint for an s3:// trail")
        p.add_argument("--state", type=Path, help="the trail's local state directory (keys, head log) when the "
                       "trail is in S3")

    v = asub.add_parser("validate", help="check every digest and log file (like aws cloudtrail validate-logs)")
    common(v)
    v.add_argument("--start-time", help="UTC time, e.g. 2026-03-02T09:00:00Z (default: the beginning)")
    v.add_argument("--end-time", help="UTC time (default: now)")
    v.add_argument("--public-key", type=Path, action="append", default=[],
                   help="PEM RSA public key(s) of the trail (default: the trail's keys/public-keys.json)")
    v.add_argument("--max-age", type=float, default=None,
                   help="fail (status 2) when an open trail's newest digest is older than this many seconds")
    v.add_argument("--verbose", action="store_true", help="also print the valid files")
    v.set_defaults(func=run_validate)

    e = asub.add_parser("events", help="print the trail's events")
    common(e)
    e.add_argument("--event-name", help="only events with this eventName")
    e.add_argument("--since", help="only events at or after this UTC time")
    e.add_argument("--json", action="store_true", help="JSON (one array) instead of a table")
    e.set_defaults(func=run_events)

    k = asub.add_parser("public-key", help="print the trail's public signing key(s) as PEM")
    k.add_argument("--trail", required=True, type=Path, help="the trail's state directory")
    k.set_defaults(func=run_public_key)


def _parse_time(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{name}: expected a time such as 2026-03-02T09:00:00Z, got {text!r}") from None
    # unlike the AWS CLI (§4.1 pitfall) an offset is converted, not replaced
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _source(args: argparse.Namespace) -> tuple[Destination, str, Path | None]:
    """(destination, prefix, local state directory or None)."""
    trail: str = args.trail
    if trail.startswith("s3://"):
        try:
            bucket, prefix = parse_s3_url(trail)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return S3Destination(bucket, endpoint_url=args.endpoint_url), prefix, args.state
    state = Path(trail)
    config = read_trail_config(state)
    destination = str(config.get("destination", "local"))
    if destination.startswith("s3://"):
        bucket, prefix = parse_s3_url(destination)
        return S3Destination(bucket, endpoint_url=args.endpoint_url or config.get("endpointUrl")), prefix, state
    return LocalDestination(state, bucket=str(config.get("bucket", "local"))), str(config.get("prefix", "")), state


def _load_pem_keys(paths: list[Path]) -> dict[str, rsa.RSAPublicKey]:
    keys: dict[str, rsa.RSAPublicKey] = {}
    for path in paths:
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        blocks = [b"-----BEGIN" + part for part in text.split(b"-----BEGIN")[1:]]
        for block in blocks or [text]:
            try:
                key = serialization.load_pem_public_key(block)
            except ValueError as exc:
                raise AuditKeyError(f"{path} holds no PEM public key") from exc
            if not isinstance(key, rsa.RSAPublicKey):
                raise AuditKeyError(f"{path}: the trail's key is RSA, this one is not")
            keys[fingerprint(key)] = key
    return keys


def run_validate(args: argparse.Namespace) -> int:
    start = _parse_time(args.start_time, "--start-time")
    end = _parse_time(args.end_time, "--end-time") or datetime.now(UTC)
    if start is not None and start > end:
        raise ConfigError("--start-time is after --end-time")
    source, prefix, state = _source(args)
    keys = _load_pem_keys(args.public_key) if args.public_key else (read_public_keys(state) if state else {})
    if not keys:
        raise ConfigError("no public key: give --public-key PEM (or --state DIR for an s3:// trail)")
    heads = read_heads(state / "state" / "heads.jsonl") if state is not None else None
    report = validate_trail(source, public_keys=keys, prefix=prefix, start=start, end=end, heads=heads or None,
                            now=datetime.now(UTC), max_age=args.max_age)
    shown = f"{args.trail}"
    print(f"Validating log files for trail {shown} between {format_time(start) if start else 'the beginning'} "
          f"and {format_time(end)}\n")
    for finding in report.findings:
        if finding.invalid or finding.gap:
            print(finding.line(), file=sys.stderr)
        elif args.verbose:
            print(finding.line())
    if report.found_start is not None and report.found_end is not None:
        print(f"\nResults found for {format_time(report.found_start)} to {format_time(report.found_end)}:\n")
    else:
        print("\nNo valid digests found in range\n")
    for line in report.summary():
        print(line)
    return report.exit_status


def run_events(args: argparse.Namespace) -> int:
    since = _parse_time(args.since, "--since")
    source, prefix, _state = _source(args)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _key, record in iter_records(source, prefix):
        event_id = str(record.get("eventID", ""))
        if event_id in seen:       # §2: duplicates share eventID
            continue
        seen.add(event_id)
        if args.event_name and record.get("eventName") != args.event_name:
            continue
        if since is not None and str(record.get("eventTime", "")) < format_time(since):
            continue
        rows.append(record)
    rows.sort(key=lambda r: (str(r.get("eventTime", "")), str(r.get("eventID", ""))))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"{len(rows)} event(s)")
    for column in ("time", "source", "event", "caller", "resource", "error"):
        table.add_column(column)
    for r in rows:
        identity = r.get("userIdentity") or {}
        resources = r.get("resources") or []
        table.add_row(str(r.get("eventTime", "")), str(r.get("eventSource", "")), str(r.get("eventName", "")),
                      str(identity.get("arn") or identity.get("userName") or identity.get("type", "")),
                      str(resources[0].get("ARN", "")) if resources else "",
                      str(r.get("errorCode", "")))
    Console().print(table)
    return 0


def run_public_key(args: argparse.Namespace) -> int:
    keys = read_public_keys(args.trail)
    if not keys:
        raise ConfigError(f"{args.trail} has no signing key yet (it is created with the first digest)")
    for fp, key in keys.items():
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        print(f"# fingerprint {fp}", file=sys.stderr)
        sys.stdout.write(pem.decode())
    return 0
