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
(appended data detected, §4.6) and hashed, and its name's delivery stamp must fall inside the window of the digest
that lists it (a writer clock that went backwards).  Log files that no digest lists are reported (§5.3.6), except
*pending* ones: with the trail's delivery state, only those recorded there (key and SHA-256) by the writer;
without it, only those delivered after the newest digest of an open trail and within 1.25 digest intervals of
now.  A log file stamped in the future (beyond a small clock skew) is invalid.  Each digest window longer than
twice the digest interval is a warning (§5.3.3), unless the previous digest sealed the trail (a restart).

Several trails may share a prefix: ``trail_name`` selects one chain; the head log applies only to its own chain.

Exit status (§5.3.3): 0 all valid; 1 anything invalid (tampering); 2 only gaps, staleness or no digests at all.
Warnings and notes never change the exit status.
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

_WINDOW_SLACK = timedelta(seconds=60)   # windows are >= 1 s: after quick digests their times run seconds ahead

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

    @property
    def warning(self) -> bool:
        return self.status.startswith("WARNING")

    @property
    def pending(self) -> bool:
        return self.status.startswith("pending")

    def line(self) -> str:
        return f"{self.kind}\t{self.location}\t{self.status}"


@dataclass
class ValidationReport:
    start: datetime | None
    end: datetime | None
    findings: list[Finding] = field(default_factory=list)
    found_start: datetime | None = None
    found_end: datetime | None = None
    valid_logs: list[str] = field(default_factory=list)      # keys of log files listed by valid digests, valid
    pending_logs: list[str] = field(default_factory=list)    # keys of log files awaiting their digest
    no_digests: bool = False

    def add(self, kind: str, location: str, status: str, rule: str = "") -> None:
        self.findings.append(Finding(kind, location, status, rule))

    def count(self, kind: str, *, invalid: bool) -> int:
        return sum(1 for f in self.findings if f.kind == kind and f.invalid == invalid and not f.gap
                   and not f.pending and not f.warning and not f.status.startswith("note"))

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
        lines.append(f"{len(self.pending_logs)} log file(s) pending (delivered, not yet listed by a digest)")
        gaps = sum(1 for f in self.findings if f.gap)
        if gaps:
            lines.append(f"{gaps} gap(s) or missing coverage")
        warnings = sum(1 for f in self.findings if f.warning)
        if warnings:
            lines.append(f"{warnings} warning(s)")
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
                   max_age: float | None = None, trail_name: str | None = None,
                   pending: dict[str, str] | None = None, digest_interval: float = 3600.0,
                   clock_skew: float = 300.0) -> ValidationReport:
    """Validate every digest chain under ``prefix`` of ``source`` (see the module doc).

    ``public_keys`` maps fingerprints to keys (pinned with ``--public-key``, or the trail's own
    ``keys/public-keys.json``).  ``heads`` is the trail's head log; ``now`` + ``max_age`` flag an open trail whose
    newest digest is too old.  ``end`` is a time the user asked for: log files stamped after it are not looked
    at (without it, nothing is skipped).  ``trail_name`` selects one trail's chain under a shared prefix.
    ``pending`` is the writer's record of delivered, not yet digested log files ({key: SHA-256},
    :func:`~enclavekit.audit.trail.read_pending`); None when the trail's state directory is not at hand.
    ``digest_interval`` is the trail's (trail.json ``digestInterval``); ``clock_skew`` the tolerated skew, seconds.
    """
    if start is not None and end is not None and start > end:
        raise ValueError("the start time is after the end time")
    if digest_interval <= 0:
        raise ValueError("digest_interval must be positive")
    report = ValidationReport(start=start, end=end)
    lead = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    try:
        keys = source.list(f"{lead}AWSLogs/")
    except AuditDeliveryError as exc:
        report.add(TRAIL, source.describe(), f"INVALID: cannot list the trail: {exc}", "list")
        return report
    chains: dict[tuple[str, ...], list[tuple[DigestKey, str]]] = {}
    others: dict[tuple[str, ...], list[tuple[DigestKey, str]]] = {}    # chains of other trails (trail_name)
    log_keys: list[str] = []
    for key in keys:
        if "/CloudTrail-Digest/" in key:
            try:
                dk = DigestKey.from_key(key)
            except AuditFormatError as exc:
                report.add(DIGEST, _loc(source.bucket, key), f"INVALID: {exc}", "digest-name")
                continue
            target = chains if trail_name is None or dk.trail_name == trail_name else others
            target.setdefault(dk.chain_id, []).append((dk, key))
        elif "/CloudTrail/" in key:
            log_keys.append(key)
    # the head log belongs to one chain: it says nothing about the chains of other trails
    heads_chain: tuple[str, ...] | None = None
    if heads:
        try:
            heads_chain = DigestKey.from_key(heads[-1].key).chain_id
        except AuditFormatError:
            heads_chain = None
        if heads_chain is not None and trail_name is not None and heads_chain[3] != trail_name:
            heads, heads_chain = None, None       # another trail's head log: it says nothing about this one
    if not chains:
        report.no_digests = True
        if heads:
            # §5.3.1: the trail wrote digests, none is left: deletion, not an empty trail
            report.add(DIGEST, _loc(source.bucket, heads[-1].key), "INVALID: not found: No digests found, but the "
                       f"head log records {len(heads)} digest(s) the trail wrote (all deleted)", "head-deleted")
        else:
            report.add(TRAIL, source.describe(), "GAP: No digests found", "no-digests")
    elif heads and heads_chain not in chains:
        report.add(DIGEST, _loc(source.bucket, heads[-1].key), "INVALID: not found: no digest of the chain the "
                   "head log records is left (deleted)", "head-deleted")
    listed: dict[str, str] = {}           # log key -> digest key that lists it (valid digests only)
    pending_after: datetime | None = None  # logs delivered at/after this minute may await the next digest
    for chain_id, chain in chains.items():
        chain.sort(key=lambda item: (item[0].end_time, item[1]))
        cutoff = _walk_chain(source, chain, report, public_keys=public_keys, listed=listed, start=start, end=end,
                             heads=heads if chain_id == heads_chain else None, now=now, max_age=max_age,
                             digest_interval=digest_interval)
        if cutoff is not None and (pending_after is None or cutoff > pending_after):
            pending_after = cutoff
    foreign = _other_trails(source, others, report)
    # §5.3.6: log files no valid digest lists
    for key in log_keys:
        if key in listed or key in foreign:
            continue
        location = _loc(source.bucket, key)
        try:
            stamp = LogFileKey.from_key(key).delivered_at
        except AuditFormatError as exc:
            report.add(LOG, location, f"INVALID: {exc}", "log-name")
            continue
        if now is not None and stamp > now + timedelta(seconds=clock_skew):
            # a stamp later than now cannot come from the writer: a forgery meant to hide behind `end`
            report.add(LOG, location, "INVALID: delivered in the future (its name is stamped "
                       f"{format_time(stamp)}); not listed in any valid digest", "log-future")
            continue
        if (start is not None and stamp < start.replace(second=0, microsecond=0)) or (end is not None
                                                                                      and stamp > end):
            continue
        why = _pending_reason(source, key, stamp, pending=pending, pending_after=pending_after, now=now,
                              digest_interval=digest_interval)
        if why is None:
            report.pending_logs.append(key)
            report.add(LOG, location, "pending: delivered after the newest digest; the next digest lists it",
                       "log-pending")
        else:
            report.add(LOG, location, f"INVALID: not listed in any valid digest (inserted, renamed, or its digest "
                       f"was deleted){why}", "log-unlisted")
    return report


def _pending_reason(source: Destination, key: str, stamp: datetime, *, pending: dict[str, str] | None,
                    pending_after: datetime | None, now: datetime | None, digest_interval: float) -> str | None:
    """None if an unlisted log file may be pending; else why not (appended to the INVALID status)."""
    if pending is not None:
        # the writer's own record decides: key and content hash, nothing else opens the window
        if key not in pending:
            return ""
        try:
            got = source.get(key)
            content = decompress(got[0]) if got is not None else None
        except (AuditDeliveryError, AuditFormatError, ValueError):
            content = None
        if content is None or sha256_hex(content) != pending[key]:
            return "; it differs from the log file the writer recorded as pending"
        return None
    if pending_after is None or stamp < pending_after:
        return ""
    if now is not None and (now - stamp).total_seconds() > 1.25 * digest_interval:
        return f"; too old to await a digest (interval {int(digest_interval)} s)"
    return None


def _other_trails(source: Destination, others: dict[tuple[str, ...], list[tuple[DigestKey, str]]],
                  report: ValidationReport) -> set[str]:
    """Log files listed by digests of other trails sharing the prefix: not ours to judge (docs/audit.md)."""
    foreign: set[str] = set()
    for chain_id, chain in others.items():
        for _dk, key in chain:
            try:
                got = source.get(key)
                digest = DigestFile.from_bytes(got[0]) if got is not None else None
            except (AuditDeliveryError, AuditFormatError, ValueError):
                digest = None
            if digest is not None:
                foreign.update(entry.s3_object for entry in digest.log_files)
        report.add(TRAIL, f"{source.describe()} trail {chain_id[3]}", f"note: {len(chain)} digest file(s) of "
                   "another trail under this prefix, not validated (give each trail its own prefix)", "other-trail")
    return foreign


def _walk_chain(source: Destination, chain: list[tuple[DigestKey, str]], report: ValidationReport, *,
                public_keys: dict[str, rsa.RSAPublicKey], listed: dict[str, str], start: datetime | None,
                end: datetime | None, heads: list[HeadRecord] | None, now: datetime | None,
                max_age: float | None, digest_interval: float) -> datetime | None:
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
            _check_window_length(digest, key, report, head_map, digest_interval)
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
    # digest ends may run a few seconds ahead of the clock that stamped the log files (windows are >= 1 s)
    head_end = by_key[newest_key].end_time - _WINDOW_SLACK
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


def _check_window_length(digest: DigestFile, key: str, report: ValidationReport, head_map: dict[str, HeadRecord],
                         digest_interval: float) -> None:
    """§5.3.3: windows are about one digest interval long; a much longer one hides an outage or a stopped writer.

    After a sealing digest (a clean stop, known from the head log) the next window legitimately spans the downtime.
    """
    length = (parse_time(digest.digest_end_time) - parse_time(digest.digest_start_time)).total_seconds()
    limit = max(2 * digest_interval, digest_interval + 60)
    if length <= limit:
        return
    prev = head_map.get(digest.previous_digest_s3_object or "")
    if prev is not None and prev.sealed:
        return
    report.add(DIGEST, _loc(digest.digest_s3_bucket, key), f"WARNING: its window ({digest.digest_start_time} to "
               f"{digest.digest_end_time}, {int(length)} s) is longer than {int(limit)} s (digest interval "
               f"{int(digest_interval)} s): delivery stopped or the writer was down", "window-long")


def _check_logs(source: Destination, digest: DigestFile, digest_key: str, report: ValidationReport,
                listed: dict[str, str]) -> None:
    d_start = (parse_time(digest.digest_start_time) - _WINDOW_SLACK).replace(second=0)
    d_end = parse_time(digest.digest_end_time)
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
        report.valid_logs.append(entry.s3_object)
        # the name's delivery stamp (minute precision) lies in the window of the digest that lists it, unless the
        # writer's clock went backwards (it then records a ClockWentBackwards event in the trail)
        try:
            stamp: datetime | None = LogFileKey.from_key(entry.s3_object).delivered_at
        except AuditFormatError:
            stamp = None
        if stamp is not None and not d_start <= stamp <= d_end:
            report.add(LOG, location, f"GAP: delivered at {format_time(stamp)}, outside the window of the digest "
                       f"that lists it ({digest.digest_start_time} to {digest.digest_end_time}): the writer's clock "
                       "went backwards (see ClockWentBackwards events)", "log-window")

