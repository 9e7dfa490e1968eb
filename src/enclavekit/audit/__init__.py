"""The tamper-evident audit trail: CloudTrail-format records, log files, signed digests, delivery, validation.

``events`` builds records; ``logfile`` and ``digest`` are pure codecs; ``spool`` makes appends durable (group
commit); ``trail`` writes log files and chained, signed digests to a directory or S3 (``s3``); ``validate`` checks
a trail like ``aws cloudtrail validate-logs`` and closes its blind spots (see docs/audit.md).
"""

__all__: list[str] = []
