"""CloudTrail log files (spec cloudtrail-trail §2): gzipped ``{"Records": [...]}`` objects and their key names.

Pure codec: bytes <-> :class:`LogFile`; key text <-> :class:`LogFileKey`.  The random ``<unique>`` part of a key
is an input.  Integrity hashes cover the **decompressed** bytes (§3), so :class:`LogFile` keeps the exact JSON text
it was parsed from or serialised to.  Compression is a single gzip member with mtime 0 (§2, §4.6), which makes a
log file's bytes a function of its records: a crashed writer can rebuild exactly the object it was writing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from enclavekit.audit.events import check_record, parse_time
from enclavekit.errors import AuditFormatError

__all__ = [
    "MAX_DECOMPRESSED",
    "compress",
    "decompress",
    "sha256_hex",
    "LogFileKey",
    "LogFile",
]

MAX_DECOMPRESSED = 256 * 1024 * 1024   # §5.3.5: cap decompressed size (zip bombs)
_UNIQUE_RE = re.compile(r"[A-Za-z0-9]{16}\Z")
_ACCOUNT_RE = re.compile(r"\d{12}\Z")
_REGION_RE = re.compile(r"[a-z0-9-]{1,32}\Z")
_LOG_NAME_RE = re.compile(
    r"(?P<account>\d{12})_CloudTrail_(?P<region>[a-z0-9-]{1,32})_(?P<stamp>\d{8}T\d{4}Z)_(?P<unique>[A-Za-z0-9]{16})"
    r"\.json\.gz\Z")


def compress(data: bytes) -> bytes:
    """One gzip member, mtime 0 (deterministic)."""
    return gzip.compress(data, compresslevel=6, mtime=0)


def decompress(data: bytes, *, limit: int = MAX_DECOMPRESSED) -> bytes:
    """Strict gunzip: exactly one member, nothing after it (§4.6, §5.3.5), at most ``limit`` bytes out."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise AuditFormatError(f"not a gzip stream: {exc}") from exc
    if len(out) > limit:
        raise AuditFormatError(f"decompressed data exceeds {limit} bytes")
    if not inflater.eof:
        raise AuditFormatError("the gzip stream is truncated")
    if inflater.unused_data:
        raise AuditFormatError("unexpected data after end of compressed stream")
    return out


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_account_region(account_id: str, region: str) -> None:
    if not _ACCOUNT_RE.match(account_id):
        raise ValueError(f"account id must be 12 digits, got {account_id!r}")
    if not _REGION_RE.match(region):
        raise ValueError(f"region must be lower-case letters, digits and '-', got {region!r}")


@dataclass(frozen=True)
class LogFileKey:
    """``[<prefix>/]AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/<account>_CloudTrail_<region>_<stamp>_<unique>``.

    ``delivered_at`` is the delivery time, minute precision (§2).
    """

    account_id: str
    region: str
    delivered_at: datetime
    unique: str
    prefix: str = ""

    def __post_init__(self) -> None:
        _check_account_region(self.account_id, self.region)
        if not _UNIQUE_RE.match(self.unique):
            raise ValueError("the unique part of a log file name is 16 letters or digits")
        if self.delivered_at.tzinfo is None:
            raise ValueError("delivered_at must be timezone-aware")
        object.__setattr__(self, "delivered_at",
                           self.delivered_at.astimezone(UTC).replace(second=0, microsecond=0))
        object.__setattr__(self, "prefix", self.prefix.strip("/"))

    def to_key(self) -> str:
        t = self.delivered_at
        lead = f"{self.prefix}/" if self.prefix else ""
        return (f"{lead}AWSLogs/{self.account_id}/CloudTrail/{self.region}/{t:%Y/%m/%d}/"
                f"{self.account_id}_CloudTrail_{self.region}_{t:%Y%m%dT%H%MZ}_{self.unique}.json.gz")

    @classmethod
    def from_key(cls, key: str) -> LogFileKey:
        """Parse from the right (§2, §6): the file name, then the folders it must agree with."""
        head, _, name = key.rpartition("/")
        match = _LOG_NAME_RE.match(name)
        if match is None:
            raise AuditFormatError(f"not a CloudTrail log file name: {name[:120]!r}")
        account, region, stamp = match.group("account"), match.group("region"), match.group("stamp")
        when = datetime.strptime(stamp, "%Y%m%dT%H%MZ").replace(tzinfo=UTC)
        folders = f"AWSLogs/{account}/CloudTrail/{region}/{when:%Y/%m/%d}"
        if head != folders and not head.endswith("/" + folders):
            raise AuditFormatError(f"log file {name} is not under {folders}/")
        prefix = head[: -len(folders)].rstrip("/")
        return cls(account_id=account, region=region, delivered_at=when, unique=match.group("unique"),
                   prefix=prefix)


@dataclass(frozen=True)
class LogFile:
    """The records of one log file and the exact JSON text they were read from or written as."""

    records: tuple[dict[str, Any], ...]
    content: bytes = field(repr=False)

    @classmethod
    def from_records(cls, records: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> LogFile:
        if not records:
            raise ValueError("a log file holds one or more records")
        content = json.dumps({"Records": list(records)}, separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False).encode()
        return cls(records=tuple(records), content=content)

    @classmethod
    def from_bytes(cls, data: bytes, *, limit: int = MAX_DECOMPRESSED, strict_records: bool = True) -> LogFile:
        """Parse a ``.json.gz`` log file (strict gzip, then ``{"Records": [...]}`` with ≥ 1 well-formed record)."""
        return cls.from_json_bytes(decompress(data, limit=limit), strict_records=strict_records)

    @classmethod
    def from_json_bytes(cls, content: bytes, *, strict_records: bool = True) -> LogFile:
        try:
            obj = json.loads(content)
        except (ValueError, RecursionError) as exc:
            raise AuditFormatError("a log file is not UTF-8 JSON") from exc
        if not isinstance(obj, dict) or set(obj) != {"Records"} or not isinstance(obj["Records"], list):
            raise AuditFormatError('a log file must be exactly {"Records": [...]}')
        records = obj["Records"]
        if not records:
            raise AuditFormatError("a log file holds no records")
        if strict_records:
            for record in records:
                check_record(record)
        return cls(records=tuple(records), content=bytes(content))

    def to_bytes(self) -> bytes:
        return compress(self.content)

    @property
    def sha256(self) -> str:
        """§3.2 ``hashValue``: SHA-256 of the decompressed bytes, lower-case hex."""
        return sha256_hex(self.content)

    def event_time_range(self) -> tuple[str, str]:
        """(oldest, newest) ``eventTime`` over the records, as written (§3.2 per-file times)."""
        times = sorted((parse_time(r["eventTime"]), r["eventTime"]) for r in self.records)
        return times[0][1], times[-1][1]
