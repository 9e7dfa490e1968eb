"""``enclavekit audit``: validate a trail, read its events, export its public key.

``audit validate --trail DIR | s3://bucket/prefix`` prints one line per failure (and per valid file with
``--verbose``) like ``aws cloudtrail validate-logs``, then a summary; exit status 0 = valid, 1 = tampering,
2 = gaps, staleness, no digests, or keys that are not anchored (docs/audit.md).

Trust anchor: the trail's public keys live next to its private key, so keys read from the trail itself prove
nothing to someone who could rewrite the trail.  Validation therefore wants a key exported once
(``audit public-key``) and pinned (``--public-key PEM`` or ``--public-key-fingerprint``); keys read from the trail
give a WARNING and exit status 2 unless ``--trust-trail-keys`` accepts that risk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from rich.console import Console
from rich.table import Table

from enclavekit.audit.digest import fingerprint, public_key_der
from enclavekit.audit.events import format_time
from enclavekit.audit.s3 import S3Destination, parse_s3_url
from enclavekit.audit.trail import (
    Destination,
    HeadRecord,
    LocalDestination,
    iter_records,
    read_heads,
    read_health,
    read_pending,
    read_public_keys,
    read_trail_config,
)
from enclavekit.audit.validate import ValidationReport, validate_trail
from enclavekit.errors import AuditError, AuditKeyError, ConfigError

__all__ = ["register", "run_validate", "run_events", "run_public_key", "run_seal"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = sub.add_parser("audit", help="the tamper-evident audit trail (CloudTrail format)",
                           description="Validate an audit trail, print its events, export its public key.")
    asub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    asub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--trail", required=True, help="trail directory, or s3://bucket/prefix")
        p.add_argument("--endpoint-url", help="S3-compatible endpoint for an s3:// trail")
        p.add_argument("--state", type=Path, help="the trail's local state directory (keys, head log, delivery "
                       "state) when the trail is in S3")
        p.add_argument("--public-key", type=Path, action="append", default=[],
                       help="PEM RSA public key(s) of the trail, exported once with `audit public-key` (the "
                       "trust anchor)")
        p.add_argument("--public-key-fingerprint", action="append", default=[], metavar="HEX",
                       help="pin the trail's key by its SHA-256 (64 hex, recommended) or MD5 (32 hex) fingerprint "
                       "as printed by `audit public-key`; the key itself is then read from the trail")
        p.add_argument("--trust-trail-keys", action="store_true",
                       help="accept public keys read from the trail's own directory (next to its private key: "
                       "whoever can rewrite the trail can re-sign it)")
        p.add_argument("--heads", type=Path, help="an exported copy of the trail's head log (state/heads.jsonl), "
                       "kept where the trail's writer cannot change it")
        p.add_argument("--trail-name", help="the trail to check when several share a prefix (default: the name in "
                       "trail.json, else every trail)")

    v = asub.add_parser("validate", help="check every digest and log file (like aws cloudtrail validate-logs)")
    common(v)
    v.add_argument("--start-time", help="UTC time, e.g. 2026-03-02T09:00:00Z (default: the beginning)")
    v.add_argument("--end-time", help="UTC time (default: now; log files stamped later are then still checked)")
    v.add_argument("--max-age", type=float, default=None,
                   help="fail (status 2) when an open trail's newest digest is older than this many seconds "
                   "(default: 1.25 x the trail's digest interval; 0 turns the check off)")
    v.add_argument("--verbose", action="store_true", help="also print the valid files")
    v.set_defaults(func=run_validate)

    e = asub.add_parser("events", help="print the trail's events (from log files listed by valid digests)")
    common(e)
    e.add_argument("--event-name", help="only events with this eventName")
    e.add_argument("--since", help="only events at or after this UTC time")
    e.add_argument("--unverified", action="store_true",
                   help="read every log file under AWSLogs/, also those no valid digest lists (forged ones too)")
    e.add_argument("--json", action="store_true", help="JSON (one array) instead of a table")
    e.set_defaults(func=run_events)

    k = asub.add_parser("public-key", help="print the trail's public signing key(s) as PEM, to pin them")
    k.add_argument("--trail", required=True, type=Path, help="the trail's state directory")
    k.set_defaults(func=run_public_key)

    s = asub.add_parser("seal", help="deliver what the enclave runtime has spooled and write a sealing digest now",
                        description="The enclave runtime's supervisors deliver their events without sealing (a "
                        "digest is written when one is due). Seal the state directory's trail now, e.g. before "
                        "`audit validate`. Not needed for `kms serve`, which seals on a clean stop.")
    s.add_argument("--state-home", type=Path, default=None,
                   help="the state directory (default: $ENCLAVEKIT_HOME, else /var/lib/enclavekit for root)")
    s.set_defaults(func=run_seal)


def _parse_time(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{name}: expected a time such as 2026-03-02T09:00:00Z, got {text!r}") from None
    # unlike the AWS CLI (§4.1 pitfall) an offset is converted, not replaced
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _source(args: argparse.Namespace) -> tuple[Destination, str, Path | None, dict[str, Any]]:
    """(destination, prefix, local state directory or None, trail.json or {})."""
    trail: str = args.trail
    if trail.startswith("s3://"):
        try:
            bucket, prefix = parse_s3_url(trail)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        config: dict[str, Any] = {}
        if args.state is not None:
            try:
                config = read_trail_config(args.state)
            except AuditError:
                config = {}
        endpoint = args.endpoint_url or config.get("endpointUrl")
        return S3Destination(bucket, endpoint_url=endpoint), prefix, args.state, config
    state = Path(trail)
    config = read_trail_config(state)
    destination = str(config.get("destination", "local"))
    if destination.startswith("s3://"):
        bucket, prefix = parse_s3_url(destination)
        endpoint = args.endpoint_url or config.get("endpointUrl")
        return S3Destination(bucket, endpoint_url=endpoint), prefix, state, config
    return (LocalDestination(state, bucket=str(config.get("bucket", "local"))), str(config.get("prefix", "")),
            state, config)


def _sha256_fingerprint(key: rsa.RSAPublicKey) -> str:
    return hashlib.sha256(public_key_der(key)).hexdigest()


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


def _keys(args: argparse.Namespace, state: Path | None) -> tuple[dict[str, rsa.RSAPublicKey], bool]:
    """(public keys by MD5 fingerprint, anchored): anchored when given or pinned, not just read from the trail."""
    if args.public_key:
        return _load_pem_keys(args.public_key), True
    own = read_public_keys(state) if state is not None else {}
    if args.public_key_fingerprint:
        pins = {p.strip().lower().replace(":", "") for p in args.public_key_fingerprint}
        bad = [p for p in pins if len(p) not in (32, 64) or any(c not in "0123456789abcdef" for c in p)]
        if bad:
            raise ConfigError(f"--public-key-fingerprint: expected 64 (SHA-256) or 32 (MD5) hex digits, got "
                              f"{bad[0]!r}")
        pinned = {fp: key for fp, key in own.items() if fp in pins or _sha256_fingerprint(key) in pins}
        if not pinned:
            raise AuditKeyError("no public key of the trail matches --public-key-fingerprint "
                                f"({len(own)} key(s) in the trail)")
        return pinned, True
    return own, False


_UNANCHORED = ("WARNING: unanchored: keys read from the trail itself ({where}), next to its private key: whoever can "
               "rewrite the trail can re-sign it. Export the key once (enclavekit audit public-key --trail DIR > "
               "key.pem), keep it elsewhere and pass --public-key key.pem or --public-key-fingerprint; "
               "--trust-trail-keys accepts the risk.")


def _heads(args: argparse.Namespace, state: Path | None) -> list[HeadRecord] | None:
    if args.heads is not None:
        if not args.heads.is_file():
            raise ConfigError(f"--heads: {args.heads} is not a file")
        return read_heads(args.heads) or None
    return (read_heads(state / "state" / "heads.jsonl") or None) if state is not None else None


def _warn_health(state: Path | None) -> None:
    """The deliverer's last known health: a failing delivery explains missing files, and must be seen."""
    health = read_health(state) if state is not None else None
    if not health:
        return
    if health.get("lastError"):
        print(f"WARNING: the trail's delivery was failing at {health.get('lastErrorTime')}: {health['lastError']} "
              f"({health.get('consecutiveFailures')} attempt(s); events wait in the spool)", file=sys.stderr)
    if health.get("lastHistoryConflict"):
        print(f"WARNING: the trail's writer found an object it did not write ({health['lastHistoryConflict']})",
              file=sys.stderr)


def _digest_interval(config: dict[str, Any]) -> float:
    value = config.get("digestInterval")
    return float(value) if isinstance(value, (int, float)) and value > 0 else 3600.0


def _validate(args: argparse.Namespace, *, end: datetime | None, start: datetime | None = None,
              max_age: float | None = None,
              require_keys: bool = False) -> tuple[ValidationReport, bool, Path | None]:
    """(report, anchored, state directory)."""
    source, prefix, state, config = _source(args)
    keys, anchored = _keys(args, state)
    if require_keys and not keys:
        raise ConfigError("no public key: give --public-key PEM (or --state DIR for an s3:// trail); `audit events "
                          "--unverified` reads log files without checking them")
    interval = _digest_interval(config)
    if max_age is not None and max_age < 0:   # the default: 1.25 digest intervals (§5.3.1: ~75 min for 1 h)
        max_age = 1.25 * interval
    report = validate_trail(source, public_keys=keys, prefix=prefix, start=start, end=end,
                            heads=_heads(args, state), now=datetime.now(UTC), max_age=max_age,
                            trail_name=args.trail_name or config.get("trailName"),
                            pending=read_pending(state) if state is not None else None, digest_interval=interval)
    return report, anchored, state


def run_validate(args: argparse.Namespace) -> int:
    start = _parse_time(args.start_time, "--start-time")
    end = _parse_time(args.end_time, "--end-time")
    shown_end = end or datetime.now(UTC)
    if start is not None and start > shown_end:
        raise ConfigError("--start-time is after --end-time")
    if args.max_age is not None and args.max_age < 0:
        raise ConfigError("--max-age is a number of seconds >= 0 (0 turns the staleness check off)")
    max_age = -1.0 if args.max_age is None else (args.max_age or None)
    report, anchored, state = _validate(args, end=end, start=start, max_age=max_age, require_keys=True)
    begin = format_time(start) if start else "the beginning"
    print(f"Validating log files for trail {args.trail} between {begin} and {format_time(shown_end)}\n")
    if not anchored:
        where = state / "keys" / "public-keys.json" if state is not None else "the trail"
        print(_UNANCHORED.format(where=where) if not args.trust_trail_keys else
              f"note: --trust-trail-keys: using keys read from the trail itself ({where})", file=sys.stderr)
    _warn_health(state)
    for finding in report.findings:
        if finding.invalid or finding.gap or finding.warning:
            print(finding.line(), file=sys.stderr)
        elif args.verbose:
            print(finding.line())
    print(f"\nResults requested for {begin} to {format_time(shown_end)}")
    if report.no_digests:
        print("No digests found")
    elif report.found_start is not None and report.found_end is not None:
        print(f"Results found for {format_time(report.found_start)} to {format_time(report.found_end)}:\n")
    else:
        print("No valid digests found in range\n")
    if not report.no_digests:
        for line in report.summary():
            print(line)
    status = report.exit_status
    if not anchored and not args.trust_trail_keys and status == 0:
        status = 2
    return status


def run_events(args: argparse.Namespace) -> int:
    since = _parse_time(args.since, "--since")
    source, prefix, state, _config = _source(args)

    def skipped(key: str, exc: Exception) -> None:
        print(f"WARNING: skipped {key}: {exc}", file=sys.stderr)

    pending: set[str] = set()
    if args.unverified:
        print("WARNING: --unverified: reading every log file, also those no valid digest lists", file=sys.stderr)
        records = iter_records(source, prefix, on_error=skipped)
    else:
        # with the state directory, a trail without any digest yet still shows its pending log files
        report, anchored, state = _validate(args, end=None, require_keys=args.state is None
                                            and args.trail.startswith("s3://"))
        if not anchored and not args.trust_trail_keys:
            print("note: unanchored: the log files were checked with keys read from the trail itself (pin the key "
                  "with --public-key)", file=sys.stderr)
        failures = report.failures
        if failures:
            print(f"WARNING: {len(failures)} validation problem(s) (run `enclavekit audit validate`); only log "
                  "files listed by valid digests are read", file=sys.stderr)
        pending = set(report.pending_logs)
        records = iter_records(source, keys=[*report.valid_logs, *report.pending_logs], on_error=skipped)
    _warn_health(state)
    rows: list[tuple[dict[str, Any], bool]] = []
    seen: set[str] = set()
    for key, record in records:
        event_id = str(record.get("eventID", ""))
        if event_id in seen:       # §2: duplicates share eventID
            continue
        seen.add(event_id)
        if args.event_name and record.get("eventName") != args.event_name:
            continue
        if since is not None and str(record.get("eventTime", "")) < format_time(since):
            continue
        rows.append((record, key in pending))
    rows.sort(key=lambda r: (str(r[0].get("eventTime", "")), str(r[0].get("eventID", ""))))
    waiting = sum(1 for _r, p in rows if p)
    if waiting:
        print(f"note: {waiting} event(s) come from log files not yet listed by a digest (pending)", file=sys.stderr)
    if args.json:
        print(json.dumps([r for r, _p in rows], indent=2))
        return 0
    table = Table(title=f"{len(rows)} event(s)")
    for column in ("time", "source", "event", "caller", "resource", "error", "digest"):
        table.add_column(column)
    for r, is_pending in rows:
        identity = r.get("userIdentity") or {}
        resources = r.get("resources") or []
        table.add_row(str(r.get("eventTime", "")), str(r.get("eventSource", "")), str(r.get("eventName", "")),
                      str(identity.get("arn") or identity.get("userName") or identity.get("type", "")),
                      str(resources[0].get("ARN", "")) if resources else "",
                      str(r.get("errorCode", "")), "pending" if is_pending else "listed")
    Console().print(table)
    return 0


def run_public_key(args: argparse.Namespace) -> int:
    keys = read_public_keys(args.trail)
    if not keys:
        raise ConfigError(f"{args.trail} has no signing key yet (it is created with the first digest)")
    for fp, key in keys.items():
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        print(f"# fingerprint {fp} (MD5, as in digests) sha256 {_sha256_fingerprint(key)}", file=sys.stderr)
        sys.stdout.write(pem.decode())
    return 0


def run_seal(args: argparse.Namespace) -> int:
    from enclavekit._internal.state import state_home  # noqa: PLC0415 - only this sub-command needs them
    from enclavekit.runtime.audit import load_audit_config, seal_runtime_trail  # noqa: PLC0415

    home: Path = args.state_home if args.state_home is not None else state_home()
    config = load_audit_config(home)
    if config.trail is None:
        raise ConfigError(f"the enclave runtime's audit trail is turned off in {home / 'audit.json'}")
    if not seal_runtime_trail(home):
        raise AuditError(f"the trail in {config.state_dir(home)} is being delivered by another process (for "
                         "example kms serve); it seals on its own clean stop")
    print(json.dumps({"Trail": str(config.state_dir(home)), "Sealed": True}, indent=2))
    return 0
