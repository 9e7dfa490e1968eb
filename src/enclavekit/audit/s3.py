"""Delivery of a trail to any S3-compatible object store (boto3, optional ``endpoint_url``).

* Objects are written with ``If-None-Match: *``: the store itself refuses to overwrite history.  A retried ``put``
  of an object that already holds the same bytes (a crash between the ``put`` and the delivery state) is accepted.
* Digest signatures travel as user metadata ``signature`` and ``signature-algorithm`` (spec §3.4).
* Object Lock (spec §5.3.9): when the bucket has Object Lock enabled, every object gets a retention
  (``COMPLIANCE`` by default) until the time the trail passes in.
* Every failure becomes :class:`~enclavekit.errors.AuditDeliveryError`; connection failures and 5xx answers are
  ``transient`` (the trail retries with backoff, events wait in the spool meanwhile).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from enclavekit.errors import AuditDeliveryError, AuditHistoryError

__all__ = ["S3Destination", "parse_s3_url"]


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at its ends)."""
    if not url.startswith("s3://"):
        raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not (3 <= len(bucket) <= 63):
        raise ValueError(f"bucket names are 3-63 characters, got {bucket!r}")
    return bucket, prefix.strip("/")


class S3Destination:
    """One bucket of an S3-compatible store."""

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, region: str | None = None,
                 client: Any = None, object_lock_mode: str = "COMPLIANCE", connect_timeout: float = 2.0,
                 read_timeout: float = 10.0) -> None:
        if object_lock_mode not in ("COMPLIANCE", "GOVERNANCE"):
            raise ValueError("object_lock_mode is COMPLIANCE or GOVERNANCE")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.object_lock_mode = object_lock_mode
        self._lock_enabled: bool | None = None
        if client is None:
            try:
                import boto3  # type: ignore[import-untyped]  # noqa: PLC0415 - optional
                from botocore.config import Config  # type: ignore[import-untyped]  # noqa: PLC0415
            except ImportError as exc:  # pragma: no cover - boto3 is a declared dependency of S3 delivery
                raise AuditDeliveryError("S3 delivery needs boto3 (pip install boto3)", transient=False) from exc
            # our own retry loop (with the spool behind it) replaces botocore's; fail fast while the store is down
            config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=connect_timeout,
                            read_timeout=read_timeout)
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region or "us-east-1",
                                  config=config)
        self.client = client

    def describe(self) -> str:
        return f"s3://{self.bucket}"

    # -------------------------------------------------------------------------------------------- errors

    def _fail(self, action: str, key: str, exc: Exception) -> AuditDeliveryError:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]  # noqa: PLC0415

        if isinstance(exc, ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            code = str(exc.response.get("Error", {}).get("Code", "?"))
            return AuditDeliveryError(f"{action} s3://{self.bucket}/{key} failed: {code} (HTTP {status})",
                                      transient=status >= 500 or status in (0, 408, 429))
        if isinstance(exc, BotoCoreError):
            return AuditDeliveryError(f"{action} s3://{self.bucket}/{key} failed: {type(exc).__name__}: {exc}")
        return AuditDeliveryError(f"{action} s3://{self.bucket}/{key} failed: {type(exc).__name__}")

    @staticmethod
    def _code(exc: Exception) -> str:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code", ""))
        return ""

    # -------------------------------------------------------------------------------------------- objects

    def object_lock_enabled(self) -> bool:
        if self._lock_enabled is None:
            try:
                conf = self.client.get_object_lock_configuration(Bucket=self.bucket)
                enabled = conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
            except Exception as exc:
                if self._code(exc) in ("ObjectLockConfigurationNotFoundError", "NotImplemented",
                                       "ObjectLockConfigurationNotFound"):
                    enabled = False
                else:
                    raise self._fail("reading the Object Lock configuration of", "", exc) from exc
            self._lock_enabled = enabled
        return self._lock_enabled

    def put_new(self, key: str, data: bytes, metadata: dict[str, str] | None = None, *,
                retain_until: datetime | None = None) -> None:
        """Create ``key``; refuse to replace different bytes (:class:`AuditHistoryError`)."""
        extra: dict[str, Any] = {}
        if retain_until is not None and self.object_lock_enabled():
            extra = {"ObjectLockMode": self.object_lock_mode, "ObjectLockRetainUntilDate": retain_until}
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata=dict(metadata or {}),
                                   IfNoneMatch="*", ContentType="application/json",
                                   ContentEncoding="gzip", **extra)
            return
        except Exception as exc:
            if self._code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise self._fail("writing", key, exc) from exc
        existing = self.get(key)
        if existing is None or existing[0] != data or existing[1] != dict(metadata or {}):
            raise AuditHistoryError(f"refusing to overwrite s3://{self.bucket}/{key}: an object with other "
                                    "content exists")

    def get(self, key: str) -> tuple[bytes, dict[str, str]] | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            body: bytes = answer["Body"].read()
        except Exception as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._fail("reading", key, exc) from exc
        metadata = {str(k).lower(): str(v) for k, v in (answer.get("Metadata") or {}).items()}
        return body, metadata

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(str(item["Key"]) for item in page.get("Contents", []))
        except Exception as exc:
            raise self._fail("listing", prefix, exc) from exc
        return sorted(keys)
