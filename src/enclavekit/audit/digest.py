"""CloudTrail digest files (spec cloudtrail-trail §3): fields, key names, the string to sign, SHA256withRSA.

Pure codec.  A :class:`DigestFile` is serialised **once** (:meth:`DigestFile.to_json_bytes`); the hash and the
signature cover those exact bytes (§3.7 step 3) and a parsed digest keeps the bytes it came from (§3.5: never
re-serialise).  Signatures are lower-case hex of the raw RSASSA-PKCS1-v1_5 signature (§3.4); public keys are
identified by the MD5 of their DER PKCS#1 ``RSAPublicKey`` (§3.6).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from enclavekit.audit.events import format_time, parse_time
from enclavekit.audit.logfile import MAX_DECOMPRESSED, compress, decompress, sha256_hex
from enclavekit.errors import AuditFormatError, AuditKeyError, AuditValidationError

__all__ = [
    "SIGNATURE_ALGORITHM",
    "HASH_ALGORITHM",
    "DigestKey",
    "LogFileEntry",
    "DigestFile",
    "string_to_sign",
    "sign_digest",
    "verify_digest_signature",
    "public_key_der",
    "load_public_key_der",
    "fingerprint",
]

SIGNATURE_ALGORITHM = "SHA256withRSA"
HASH_ALGORITHM = "SHA-256"
_MAX_DIGEST = 64 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_FP_RE = re.compile(r"[0-9a-f]{32}\Z")
_SIG_RE = re.compile(r"(?:[0-9a-f]{2})+\Z")
_DIGEST_NAME_RE = re.compile(
    r"(?P<account>\d{12})_CloudTrail-Digest_(?P<region>[a-z0-9-]{1,32})_(?P<trail>[A-Za-z0-9._-]{1,128})_"
    r"(?P<home>[a-z0-9-]{1,32})_(?P<stamp>\d{8}T\d{6}Z)(?P<backfill>_backfill)?\.json\.gz\Z")
_TRAIL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,127}\Z")


@dataclass(frozen=True)
class DigestKey:
    """``[<prefix>/]AWSLogs/<acct>/CloudTrail-Digest/<region>/YYYY/MM/DD/<acct>_CloudTrail-Digest_<region>_<trail>_
    <home-region>_<YYYYMMDDTHHMMSSZ>[_backfill].json.gz`` (§3.1); ``end_time`` is the digest end, second precision.
    """

    account_id: str
    region: str
    trail_name: str
    home_region: str
    end_time: datetime
    prefix: str = ""
    backfill: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d{12}", self.account_id):
            raise ValueError(f"account id must be 12 digits, got {self.account_id!r}")
        for region in (self.region, self.home_region):
            if not re.fullmatch(r"[a-z0-9-]{1,32}", region):
                raise ValueError(f"bad region {region!r}")
        if not _TRAIL_NAME_RE.match(self.trail_name):
            raise ValueError("trail names are 3-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if self.end_time.tzinfo is None:
            raise ValueError("end_time must be timezone-aware")
        object.__setattr__(self, "end_time", self.end_time.astimezone(UTC).replace(microsecond=0))
        object.__setattr__(self, "prefix", self.prefix.strip("/"))

    def to_key(self) -> str:
        t = self.end_time
        lead = f"{self.prefix}/" if self.prefix else ""
        tail = "_backfill" if self.backfill else ""
        return (f"{lead}AWSLogs/{self.account_id}/CloudTrail-Digest/{self.region}/{t:%Y/%m/%d}/"
                f"{self.account_id}_CloudTrail-Digest_{self.region}_{self.trail_name}_{self.home_region}_"
                f"{t:%Y%m%dT%H%M%SZ}{tail}.json.gz")

    @classmethod
    def from_key(cls, key: str) -> DigestKey:
        head, _, name = key.rpartition("/")
        match = _DIGEST_NAME_RE.match(name)
        if match is None:
            raise AuditFormatError(f"not a CloudTrail digest file name: {name[:160]!r}")
        account, region = match.group("account"), match.group("region")
        when = datetime.strptime(match.group("stamp"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        folders = f"AWSLogs/{account}/CloudTrail-Digest/{region}/{when:%Y/%m/%d}"
        if head != folders and not head.endswith("/" + folders):
            raise AuditFormatError(f"digest file {name} is not under {folders}/")
        try:
            return cls(account_id=account, region=region, trail_name=match.group("trail"),
                       home_region=match.group("home"), end_time=when, prefix=head[: -len(folders)].rstrip("/"),
                       backfill=match.group("backfill") is not None)
        except ValueError as exc:
            raise AuditFormatError(f"digest file name {name[:160]!r}: {exc}") from exc

    @property
    def chain_id(self) -> tuple[str, str, str, str, str]:
        """Digests of one chain share prefix, account, region, trail name and home region."""
        return (self.prefix, self.account_id, self.region, self.trail_name, self.home_region)


@dataclass(frozen=True)
class LogFileEntry:
    """One ``logFiles[]`` item (§3.2)."""

    s3_bucket: str
    s3_object: str
    hash_value: str
    oldest_event_time: str
    newest_event_time: str
    hash_algorithm: str = HASH_ALGORITHM

    def to_json(self) -> dict[str, Any]:
        return {"s3Bucket": self.s3_bucket, "s3Object": self.s3_object, "hashValue": self.hash_value,
                "hashAlgorithm": self.hash_algorithm, "newestEventTime": self.newest_event_time,
                "oldestEventTime": self.oldest_event_time}

    @classmethod
    def from_json(cls, obj: Any) -> LogFileEntry:
        if not isinstance(obj, dict):
            raise AuditFormatError("a logFiles item must be an object")
        names = ("s3Bucket", "s3Object", "hashValue", "hashAlgorithm", "newestEventTime", "oldestEventTime")
        missing = [n for n in names if not isinstance(obj.get(n), str)]
        if missing:
            raise AuditFormatError(f"a logFiles item lacks {', '.join(missing)}")
        if not _HEX64.match(obj["hashValue"]):
            raise AuditFormatError("a logFiles hashValue is not 64 lower-case hex characters")
        return cls(s3_bucket=obj["s3Bucket"], s3_object=obj["s3Object"], hash_value=obj["hashValue"],
                   hash_algorithm=obj["hashAlgorithm"], newest_event_time=obj["newestEventTime"],
                   oldest_event_time=obj["oldestEventTime"])


_FIELDS = ("awsAccountId", "digestStartTime", "digestEndTime", "digestS3Bucket", "digestS3Object",
           "digestPublicKeyFingerprint", "digestSignatureAlgorithm", "newestEventTime", "oldestEventTime",
           "previousDigestS3Bucket", "previousDigestS3Object", "previousDigestHashValue",
           "previousDigestHashAlgorithm", "previousDigestSignature", "logFiles")
_NULLABLE = frozenset({"newestEventTime", "oldestEventTime", "previousDigestS3Bucket", "previousDigestS3Object",
                       "previousDigestHashValue", "previousDigestHashAlgorithm", "previousDigestSignature"})


@dataclass(frozen=True)
class DigestFile:
    """A digest (§3.2).  ``content`` is the exact JSON text (set by :meth:`build` or :meth:`from_bytes`)."""

    aws_account_id: str
    digest_start_time: str
    digest_end_time: str
    digest_s3_bucket: str
    digest_s3_object: str
    digest_public_key_fingerprint: str
    log_files: tuple[LogFileEntry, ...]
    previous_digest_s3_bucket: str | None = None
    previous_digest_s3_object: str | None = None
    previous_digest_hash_value: str | None = None
    previous_digest_hash_algorithm: str | None = None
    previous_digest_signature: str | None = None
    digest_signature_algorithm: str = SIGNATURE_ALGORITHM
    newest_event_time: str | None = None
    oldest_event_time: str | None = None
    content: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def build(cls, *, account_id: str, start: datetime, end: datetime, bucket: str, key: str, fingerprint: str,
              log_files: list[LogFileEntry], previous: tuple[str, str, str, str] | None) -> DigestFile:
        """A new digest; ``previous`` is (bucket, key, sha256 of its decompressed bytes, its signature) or None."""
        if end < start:
            raise ValueError("a digest cannot end before it starts")
        times = [(parse_time(t), t) for f in log_files for t in (f.oldest_event_time, f.newest_event_time)]
        oldest = min(times)[1] if times else None
        newest = max(times)[1] if times else None
        p_bucket, p_key, p_hash, p_sig = previous if previous is not None else (None, None, None, None)
        draft = cls(aws_account_id=account_id, digest_start_time=format_time(start),
                    digest_end_time=format_time(end), digest_s3_bucket=bucket, digest_s3_object=key,
                    digest_public_key_fingerprint=fingerprint, log_files=tuple(log_files),
                    previous_digest_s3_bucket=p_bucket, previous_digest_s3_object=p_key,
                    previous_digest_hash_value=p_hash,
                    previous_digest_hash_algorithm=HASH_ALGORITHM if previous is not None else None,
                    previous_digest_signature=p_sig, newest_event_time=newest, oldest_event_time=oldest)
        content = json.dumps(draft.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
        return cls.from_json_bytes(content)

    def to_json(self) -> dict[str, Any]:
        return {
            "awsAccountId": self.aws_account_id,
            "digestStartTime": self.digest_start_time,
            "digestEndTime": self.digest_end_time,
            "digestS3Bucket": self.digest_s3_bucket,
            "digestS3Object": self.digest_s3_object,
            "digestPublicKeyFingerprint": self.digest_public_key_fingerprint,
            "digestSignatureAlgorithm": self.digest_signature_algorithm,
            "newestEventTime": self.newest_event_time,
            "oldestEventTime": self.oldest_event_time,
            "previousDigestS3Bucket": self.previous_digest_s3_bucket,
            "previousDigestS3Object": self.previous_digest_s3_object,
            "previousDigestHashValue": self.previous_digest_hash_value,
            "previousDigestHashAlgorithm": self.previous_digest_hash_algorithm,
            "previousDigestSignature": self.previous_digest_signature,
            "logFiles": [f.to_json() for f in self.log_files],
        }

    @classmethod
    def from_bytes(cls, data: bytes, *, limit: int = _MAX_DIGEST) -> DigestFile:
        """Strict gunzip (§5.3.5: no trailing data for digests either), then :meth:`from_json_bytes`."""
        return cls.from_json_bytes(decompress(data, limit=min(limit, MAX_DECOMPRESSED)))

    @classmethod
    def from_json_bytes(cls, content: bytes) -> DigestFile:
        """§4.3 step 4 (required fields) plus types; null only where §3.2 allows it."""
        try:
            obj = json.loads(content)
        except (ValueError, RecursionError) as exc:
            raise AuditFormatError("a digest file is not UTF-8 JSON") from exc
        if not isinstance(obj, dict):
            raise AuditFormatError("a digest file must be a JSON object")
        missing = [name for name in _FIELDS if name not in obj]
        if missing:
            raise AuditFormatError(f"a digest file lacks {', '.join(missing)}")
        for name in _FIELDS:
            value = obj[name]
            if name == "logFiles":
                if not isinstance(value, list):
                    raise AuditFormatError("logFiles must be an array")
            elif value is None and name in _NULLABLE:
                continue
            elif not isinstance(value, str):
                raise AuditFormatError(f"{name} must be a string")
        for name in ("digestStartTime", "digestEndTime", "newestEventTime", "oldestEventTime"):
            if obj[name] is not None:
                parse_time(obj[name])
        if not _FP_RE.match(obj["digestPublicKeyFingerprint"]):
            raise AuditFormatError("digestPublicKeyFingerprint must be 32 lower-case hex characters")
        links = [obj[n] is None for n in ("previousDigestS3Bucket", "previousDigestS3Object",
                                          "previousDigestHashValue", "previousDigestSignature")]
        if any(links) and not all(links):
            raise AuditFormatError("the previousDigest* fields must be all null (chain start) or all set")
        if obj["previousDigestHashValue"] is not None and not _HEX64.match(obj["previousDigestHashValue"]):
            raise AuditFormatError("previousDigestHashValue is not 64 lower-case hex characters")
        if obj["previousDigestSignature"] is not None and not _SIG_RE.match(obj["previousDigestSignature"]):
            raise AuditFormatError("previousDigestSignature is not lower-case hex")
        return cls(aws_account_id=obj["awsAccountId"], digest_start_time=obj["digestStartTime"],
                   digest_end_time=obj["digestEndTime"], digest_s3_bucket=obj["digestS3Bucket"],
                   digest_s3_object=obj["digestS3Object"],
                   digest_public_key_fingerprint=obj["digestPublicKeyFingerprint"],
                   log_files=tuple(LogFileEntry.from_json(f) for f in obj["logFiles"]),
                   previous_digest_s3_bucket=obj["previousDigestS3Bucket"],
                   previous_digest_s3_object=obj["previousDigestS3Object"],
                   previous_digest_hash_value=obj["previousDigestHashValue"],
                   previous_digest_hash_algorithm=obj["previousDigestHashAlgorithm"],
                   previous_digest_signature=obj["previousDigestSignature"],
                   digest_signature_algorithm=obj["digestSignatureAlgorithm"],
                   newest_event_time=obj["newestEventTime"], oldest_event_time=obj["oldestEventTime"],
                   content=bytes(content))

    def to_bytes(self) -> bytes:
        if not self.content:
            raise ValueError("build the digest with DigestFile.build or parse it before serialising")
        return compress(self.content)

    @property
    def sha256(self) -> str:
        return sha256_hex(self.content)

    @property
    def is_chain_start(self) -> bool:
        return self.previous_digest_s3_object is None

    def string_to_sign(self) -> bytes:
        return string_to_sign(self.digest_end_time, self.digest_s3_bucket, self.digest_s3_object, self.content,
                              self.previous_digest_signature)


def string_to_sign(end_time: str, bucket: str, key: str, content: bytes, previous_signature: str | None) -> bytes:
    """§3.5: end LF bucket/key LF sha256(decompressed) LF previous signature or ``null``; no trailing LF."""
    return "\n".join([end_time, f"{bucket}/{key}", sha256_hex(content),
                      previous_signature if previous_signature is not None else "null"]).encode()


def sign_digest(private_key: rsa.RSAPrivateKey, message: bytes) -> str:
    """SHA256withRSA (RSASSA-PKCS1-v1_5, SHA-256), lower-case hex (§3.4)."""
    return private_key.sign(message, padding.PKCS1v15(), hashes.SHA256()).hex()


def verify_digest_signature(public_key: rsa.RSAPublicKey, message: bytes, signature_hex: str, *,
                            location: str = "") -> None:
    """§5.3.4: SHA-256 pinned (PKCS1v15 + SHA256), never taken from the signature.  Raises on mismatch."""
    if not isinstance(signature_hex, str) or not _SIG_RE.match(signature_hex):
        raise AuditValidationError("the signature is not lower-case hex", rule="signature", location=location)
    try:
        public_key.verify(bytes.fromhex(signature_hex), message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise AuditValidationError("signature verification failed", rule="signature", location=location) from None


def public_key_der(public_key: rsa.RSAPublicKey) -> bytes:
    """§3.6: ``Value`` is DER PKCS#1 ``RSAPublicKey`` (not SubjectPublicKeyInfo)."""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


def load_public_key_der(der: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except ValueError as exc:
        raise AuditKeyError("unable to load a PKCS #1 RSA public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise AuditKeyError("the trail's public key must be RSA")
    return key


def fingerprint(public_key: rsa.RSAPublicKey) -> str:
    """§3.6: lower-case hex MD5 of the DER PKCS#1 bytes (an identifier, not a security check)."""
    return hashlib.md5(public_key_der(public_key), usedforsecurity=False).hexdigest()
