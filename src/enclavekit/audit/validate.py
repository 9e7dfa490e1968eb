"""Trail validation: ``aws cloudtrail validate-logs`` (spec §4) with the improvements of §5.3.

Per digest, in order (§4.3, hardened): found; strict gzip (no trailing data, size cap); all fields; stored where
it says it is (moved/renamed); key name agrees with ``digestEndTime`` and ``awsAccountId``; algorithms pinned
(SHA256withRSA, SHA-256); signing key known by fingerprint; signature verified with SHA-256 pinned.  The newest
digest's signature comes from metadata; every older one's from its successor's ``previousDigestSignature`` (and
metadata, when present, must agree), so the chain verifies offline (§5.3.2).  Links are checked in full: hash of
the previous digest, its signature, its bucket, and time continuity (``prev.end == cur.start``; a window that runs
backwards means a clock that went backwards, or tampering).

The walk starts at the newest digest that **exists**, not the newest in the window (§5.3.1); with the trail's head
log (``state/heads.jsonl``, kept outside the log tree) a deleted newest digest is detected too.  Digests the walk
never reaches are inserted (or renamed) files.  Every log file a digest lists is fetched, strictly gunzipped
(appended data detected, §4.6) and hashed; log files that no digest lists are reported (§5.3.6), except those
delivered after the newest digest of a trail that is still open (they are *pending*).

Exit status (§5.3.3): 0 all valid; 1 anything invalid (tampering); 2 only gaps, staleness or no digests at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import rsa

from enclavekit.audit.digest import (
    HASH_ALGORITHM,
    SIGNATURE_ALGORITHM,
    DigestFile,
    DigestKey,
    verify_digest_signature,
)
from enclavekit.audit.events import format_time, parse_time
from enclavekit.audit.logfile import LogFile, LogFileKey, decompress, sha256_hex
from enclavekit.audit.trail import Destination, HeadRecord
from enclavekit.errors import AuditDeliveryError, AuditFormatError, AuditValidationError

__all__ = ["Finding", "ValidationReport", "validate_trail"]

DIGEST = "Digest file"
LOG = "Log file"
TRAIL = "Trail"


@dataclass(frozen=True)
class Finding:
    """One report line: ``kind``, ``location`` (s3://bucket/key or a path), ``status`` and the ``rule`` it broke."""

    kind: str
    location: str
    status: str
    rule: str = ""

    @property
    def invalid(self) -> bool:
        return self.status.startswith("INVALID")

    @property
    def gap(self) -> bool:
        return self.status.startswith("GAP")

    def line(self) -> str:
        return f"{self.kind}\t{self.location}\t{self.status}"


@dataclass
class ValidationReport:
    start: datetime | None
    end: datetime | None
    findings: list[Finding] = field(default_factory=list)
    found_start: datetime | None = None
    found_end: datetime | None = None

    def add(self, kind: str, location: str, status: str, rule: str = "") -> None:
        self.findings.append(Finding(kind, location, status, rule))

    def count(self, kind: str, *, invalid: bool) -> int:
        return sum(1 for f in self.findings if f.kind == kind and f.invalid == invalid and not f.gap
                   and not f.status.startswith("pending"))

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.invalid or f.gap]

    @property
    def exit_status(self) -> int:
        if any(f.invalid for f in self.findings):
            return 1
        if any(f.gap for f in self.findings):
            return 2
        return 0

    def rules(self) -> set[str]:
        return {f.rule for f in self.findings if f.invalid or f.gap}

    def summary(self) -> list[str]:
        lines = []
        for kind, label in ((DIGEST, "digest files"), (LOG, "log files")):
            ok, bad = self.count(kind, invalid=False), self.count(kind, invalid=True)
            if ok + bad:
                text = f"{ok}/{ok + bad} {label} valid"
                if bad:
                    text += f", {bad}/{ok + bad} {label} INVALID"
                lines.append(text)
        gaps = sum(1 for f in self.findings if f.gap)
        if gaps:
            lines.append(f"{gaps} gap(s) or missing coverage")
        return lines

    def raise_for_failures(self) -> None:
        """Raise :class:`AuditValidationError` naming the first failure (for callers that want an exception)."""
        for f in self.failures:
            raise AuditValidationError(f"{f.kind} {f.location}: {f.status}", rule=f.rule, location=f.location)


def _loc(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def validate_trail(source: Destination, *, public_keys: dict[str, rsa.RSAPublicKey], prefix: str = "",
                   start: datetime | None = None, end: datetime | None = None,
                   heads: list[HeadRecord] | None = None, now: datetime | None = None,
                   max_age: float | None = None) -> ValidationReport:
    """Validate every digest chain under ``prefix`` of ``source`` (see the module doc).

    ``public_keys`` maps fingerprints to keys (the trail's ``keys/public-keys.json`` or ``--public-key``).
    ``heads`` is the trail's head log; ``now`` + ``max_age`` flag an open trail whose newest digest is too old.
    """
    if start is not None and end is not None and start > end:
        raise ValueError("the start time is after the end time")
    report = ValidationReport(start=start, end=end)
    lead = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    try:
        keys = source.list(f"{lead}AWSLogs/")
    except AuditDeliveryError as exc:
        report.add(TRAIL, source.describe(), f"INVALID: cannot list the trail: {exc}", "list")
        return report
    chains: dict[tuple[str, ...], list[tuple[DigestKey, str]]] = {}
    log_keys: list[str] = []
    for key in keys:
        if "/CloudTrail-Digest/" in key:
            try:
                dk = DigestKey.from_key(key)
            except AuditFormatError as exc:
                report.add(DIGEST, _loc(source.bucket, key), f"INVALID: {exc}", "digest-name")
                continue
            chains.setdefault(dk.chain_id, []).append((dk, key))
        elif "/CloudTrail/" in key:
            log_keys.append(key)
    if not chains:
        report.add(TRAIL, source.describe(), "GAP: No digests found", "no-digests")
    listed: dict[str, str] = {}           # log key -> digest key that lists it (valid digests only)
    pending_after: datetime | None = None  # logs delivered at/after this minute may await the next digest
    for chain in chains.values():
        chain.sort(key=lambda item: (item[0].end_time, item[1]))
        cutoff = _walk_chain(source, chain, report, public_keys=public_keys, listed=listed, start=start, end=end,
                             heads=heads, now=now, max_age=max_age)
        if cutoff is not None and (pending_after is None or cutoff > pending_after):
            pending_after = cutoff
    # §5.3.6: log files no valid digest lists
    for key in log_keys:
        if key in listed:
            continue
        location = _loc(source.bucket, key)
        try:
            stamp = LogFileKey.from_key(key).delivered_at
        except AuditFormatError as exc:
            report.add(LOG, location, f"INVALID: {exc}", "log-name")
            continue
        if (start is not None and stamp < start.replace(second=0, microsecond=0)) or (end is not None
                                                                                      and stamp > end):
            continue
        if pending_after is not None and stamp >= pending_after:
            report.add(LOG, location, "pending: delivered after the newest digest; the next digest lists it",
                       "log-pending")
        else:
            report.add(LOG, location, "INVALID: not listed in any valid digest (inserted, renamed, or its digest "
                       "was deleted)", "log-unlisted")
    return report


def _walk_chain(source: Destination, chain: list[tuple[DigestKey, str]], report: ValidationReport, *,
                public_keys: dict[str, rsa.RSAPublicKey], listed: dict[str, str], start: datetime | None,
                end: datetime | None, heads: list[HeadRecord] | None, now: datetime | None,
                max_age: float | None) -> datetime | None:
    """Walk one chain from its newest digest; returns the minute after which unlisted logs count as pending."""
    bucket = source.bucket
    by_key = {key: dk for dk, key in chain}
    order = [key for _dk, key in chain]
    head_map = {h.key: h for h in heads} if heads is not None else {}
    sealed = False
    # §5.3.1: anchor the head
    newest_key = order[-1]
    if heads:
        recorded = heads[-1]
        sealed = recorded.sealed
        if recorded.key not in by_key:
            report.add(DIGEST, _loc(bucket, recorded.key), "INVALID: not found: the newest digest the trail "
                       "wrote is missing (deleted newest digest)", "head-deleted")
            sealed = True   # what it covered must still be covered: nothing counts as pending
        elif by_key[newest_key].end_time > by_key[recorded.key].end_time:
            report.add(DIGEST, _loc(bucket, newest_key), "INVALID: newer than the newest digest the trail wrote "
                       "(inserted)", "head-unknown")
    if now is not None and max_age is not None and not sealed:
        age = (now - by_key[newest_key].end_time).total_seconds()
        if age > max_age:
            report.add(TRAIL, _loc(bucket, newest_key), f"GAP: the newest digest ended {int(age)} s ago (more than "
                       f"{int(max_age)} s) and does not seal the trail: newer digests may have been deleted",
                       "stale")
    visited: set[str] = set()
    successor: DigestFile | None = None
    successor_key = ""
    key: str | None = newest_key
    window_start = start - timedelta(hours=1) if start is not None else None
    while key is not None:
        if key in visited:
            report.add(DIGEST, _loc(bucket, key), "INVALID: the chain loops back to this digest", "chain-loop")
            break
        visited.add(key)
        digest = _check_digest(source, key, by_key.get(key), report, public_keys=public_keys, successor=successor,
                               successor_key=successor_key, head_map=head_map)
        if digest is not None:
            d_start, d_end = parse_time(digest.digest_start_time), parse_time(digest.digest_end_time)
            in_window = (end is None or d_start <= end + timedelta(hours=1)) and (start is None or d_end >= start)
            if in_window:
                report.found_start = min(filter(None, [report.found_start, max(d_start, start or d_start)]))
                report.found_end = max(filter(None, [report.found_end, min(d_end, end or d_end)]))
                _check_logs(source, digest, key, report, listed)
            else:
                for entry in digest.log_files:
                    listed.setdefault(entry.s3_object, key)
            if window_start is not None and d_end < window_start:
                break
        if digest is not None and not digest.is_chain_start:
            prev = digest.previous_digest_s3_object
            assert prev is not None
            if digest.previous_digest_s3_bucket != bucket:
                report.add(DIGEST, _loc(bucket, key), f"INVALID: links to another bucket "
                           f"({digest.previous_digest_s3_bucket}); not followed", "chain-bucket")
                break
            if prev in by_key and key in by_key and by_key[prev].end_time >= by_key[key].end_time:
                report.add(DIGEST, _loc(bucket, key), "INVALID: its previous digest is not older (reordered)",
                           "chain-order")
            successor, successor_key, key = digest, key, prev
            continue
        # chain start, or an invalid digest: resume from the listing (§4.4), next older unvisited key
        older = [k for k in order if k not in visited and (key not in by_key or by_key[k].end_time
                                                            <= by_key[key].end_time)]
        nxt = older[-1] if older else None
        if digest is not None and nxt is not None:
            report.add(DIGEST, _loc(bucket, key), f"GAP: the chain restarts here; no link to the older digest "
                       f"{nxt}", "chain-restart")
        successor, successor_key, key = None, "", nxt
    for k in order:
        if k not in visited and (start is None or by_key[k].end_time >= start):
            report.add(DIGEST, _loc(bucket, k), "INVALID: not part of the digest chain (inserted, copied or "
                       "renamed)", "digest-unchained")
    head_end = by_key[newest_key].end_time
    return None if sealed else head_end.replace(second=0)


def _check_digest(source: Destination, key: str, dk: DigestKey | None, report: ValidationReport, *,
                  public_keys: dict[str, rsa.RSAPublicKey], successor: DigestFile | None, successor_key: str,
                  head_map: dict[str, HeadRecord]) -> DigestFile | None:
    bucket = source.bucket
    location = _loc(bucket, key)

    def bad(status: str, rule: str) -> None:
        report.add(DIGEST, location, f"INVALID: {status}", rule)

    try:
        got = source.get(key)
    except (AuditDeliveryError, ValueError) as exc:
        bad(f"cannot read: {exc}", "read")
        return None
    if got is None:
        linked = f" (linked from {successor_key})" if successor is not None else ""
        bad(f"not found{linked}: deleted or renamed", "digest-deleted")
        return None
    data, meta = got
    try:
        digest = DigestFile.from_bytes(data)
        if dk is None:
            dk = DigestKey.from_key(key)
    except AuditFormatError as exc:
        bad(f"invalid format: {exc}", "digest-format")
        return None
    if digest.digest_s3_bucket != bucket or digest.digest_s3_object != key:
        bad(f"has been moved from its original location {digest.digest_s3_bucket}/{digest.digest_s3_object}",
            "moved")
        return None
    if format_time(dk.end_time) != digest.digest_end_time or digest.aws_account_id != dk.account_id:
        bad("its name does not match its digestEndTime or awsAccountId", "digest-name")
        return None
    d_start, d_end = parse_time(digest.digest_start_time), parse_time(digest.digest_end_time)
    if d_end < d_start:
        bad(f"ends ({digest.digest_end_time}) before it starts ({digest.digest_start_time}): clock went "
            "backwards", "clock")
        return None
    # §5.3.4: pin the algorithms
    if digest.digest_signature_algorithm != SIGNATURE_ALGORITHM or \
            meta.get("signature-algorithm", SIGNATURE_ALGORITHM) != SIGNATURE_ALGORITHM:
        bad(f"signature algorithm is not {SIGNATURE_ALGORITHM}", "algorithm")
        return None
    if any(f.hash_algorithm != HASH_ALGORITHM for f in digest.log_files) or \
            digest.previous_digest_hash_algorithm not in (None, HASH_ALGORITHM):
        bad(f"a hash algorithm is not {HASH_ALGORITHM}", "algorithm")
        return None
    key_obj = public_keys.get(digest.digest_public_key_fingerprint)
    if key_obj is None:
        bad(f"public key not found for fingerprint {digest.digest_public_key_fingerprint} (signed by another key)",
            "unknown-key")
        return None
    signature: str | None = meta.get("signature")
    if successor is not None:
        link_sig = successor.previous_digest_signature
        if signature is not None and signature != link_sig:
            bad(f"its signature differs from the previousDigestSignature in {successor_key}", "chain-signature")
            return None
        signature = link_sig
    if not signature:
        bad("signature verification failed (no signature)", "signature")
        return None
    try:
        verify_digest_signature(key_obj, digest.string_to_sign(), signature, location=location)
    except AuditValidationError:
        bad("signature verification failed", "signature")
        return None
    recorded = head_map.get(key)
    if recorded is not None and (recorded.sha256 != digest.sha256 or recorded.signature != signature):
        bad("differs from the digest the trail recorded in its head log", "head-mismatch")
        return None
    if successor is not None:
        if successor.previous_digest_hash_value != digest.sha256:
            report.add(DIGEST, _loc(bucket, successor_key), f"INVALID: previousDigestHashValue does not match "
                       f"{key}", "chain-hash")
            return None
        s_start = parse_time(successor.digest_start_time)
        if s_start < d_end:
            report.add(DIGEST, _loc(bucket, successor_key), f"INVALID: starts at {successor.digest_start_time}, "
                       f"before its previous digest ends ({digest.digest_end_time}): clock went backwards",
                       "clock")
        elif s_start > d_end:
            report.add(DIGEST, _loc(bucket, successor_key), f"GAP: nothing covers {digest.digest_end_time} to "
                       f"{successor.digest_start_time}", "window-gap")
    report.add(DIGEST, location, "valid")
    return digest


def _check_logs(source: Destination, digest: DigestFile, digest_key: str, report: ValidationReport,
                listed: dict[str, str]) -> None:
    for entry in digest.log_files:
        location = _loc(entry.s3_bucket, entry.s3_object)

        def bad(status: str, rule: str, location: str = location) -> None:
            report.add(LOG, location, f"INVALID: {status}", rule)

        if entry.s3_object in listed and listed[entry.s3_object] != digest_key:
            bad(f"listed twice (also in {listed[entry.s3_object]})", "log-duplicate")
            continue
        listed[entry.s3_object] = digest_key
        if entry.s3_bucket != source.bucket:
            bad("lives in another bucket; not checked", "log-bucket")
            continue
        try:
            got = source.get(entry.s3_object)
        except (AuditDeliveryError, ValueError) as exc:
            bad(f"cannot read: {exc}", "read")
            continue
        if got is None:
            bad("not found: deleted or renamed", "log-deleted")
            continue
        try:
            content = decompress(got[0])
        except AuditFormatError as exc:
            rule = "log-appended" if "after end" in str(exc) else "log-format"
            bad(str(exc) if rule == "log-appended" else f"invalid format: {exc}", rule)
            continue
        if sha256_hex(content) != entry.hash_value:
            bad("hash value doesn't match (modified)", "log-modified")
            continue
        try:
            times = LogFile.from_json_bytes(content).event_time_range()
        except AuditFormatError as exc:
            bad(f"invalid records: {exc}", "log-format")
            continue
        if times != (entry.oldest_event_time, entry.newest_event_time):
            bad("event times differ from those the digest lists", "log-times")
            continue
        report.add(LOG, location, "valid")

