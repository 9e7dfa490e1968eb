"""eif-diff: explain why two enclave images measure differently.

Compares two EIFs at three levels:

* measurements: which of PCR0/1/2/8 differ (spec §2.2: PCR0 = kernel ‖ cmdline ‖ all ramdisks, PCR1 = kernel ‖
  cmdline ‖ ramdisk 0, PCR2 = the other ramdisks, PCR8 = the signing certificate);
* sections: type, size and SHA-384 of each section's data, paired by position;
* inside ramdisks (newc cpio): files added, removed or changed (content SHA-256, size, type, mode, owner, mtime,
  link target, device numbers); plus the kernel command line and the metadata JSON (which no PCR covers).

Everything is streamed: a ramdisk is walked entry by entry and file contents are hashed in chunks, so images of
any size are compared in bounded memory.  Compressed ramdisks (``cpio.gz``) are compared at section level only.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from enclavekit.errors import FileOperationError, FormatError
from enclavekit.formats.cpio import iter_members
from enclavekit.formats.eif import SectionType, WalkedSection
from enclavekit.image.eif_reader import EIFInfo, iter_section_data, measure_eif

__all__ = ["FileSummary", "SectionSummary", "FileChange", "RamdiskDiff", "EIFDiff", "summarise_ramdisk",
           "diff_eifs", "diff_files"]

_TYPE_NAMES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char-device",
               stat.S_IFBLK: "block-device", stat.S_IFIFO: "fifo"}
_PCR_SCOPE = {"PCR0": "kernel, cmdline and every ramdisk", "PCR1": "kernel, cmdline and ramdisk 0 (bootstrap)",
              "PCR2": "ramdisks 1.. (the application)", "PCR8": "the signing certificate"}


@dataclass(frozen=True)
class FileSummary:
    """One ramdisk entry.  ``digest`` is the SHA-256 of a regular file's data; ``link_target`` a symlink's."""

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int
    digest: str | None = None
    link_target: str | None = None
    rdev: tuple[int, int] = (0, 0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "mode": f"{self.mode:04o}", "uid": self.uid, "gid": self.gid,
                               "mtime": self.mtime, "size": self.size}
        if self.digest is not None:
            out["sha256"] = self.digest
        if self.link_target is not None:
            out["link_target"] = self.link_target
        if self.rdev != (0, 0):
            out["rdev"] = f"{self.rdev[0]}:{self.rdev[1]}"
        return out


@dataclass(frozen=True)
class SectionSummary:
    index: int
    kind: str
    size: int
    sha384: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "type": self.kind, "size": self.size, "sha384": self.sha384}


@dataclass(frozen=True)
class FileChange:
    """A path present in both ramdisks whose attributes differ: field -> (a, b)."""

    path: str
    changes: dict[str, tuple[Any, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "changes": {k: {"a": a, "b": b} for k, (a, b) in self.changes.items()}}


@dataclass(frozen=True)
class RamdiskDiff:
    index: int
    added: tuple[FileSummary, ...] = ()
    removed: tuple[FileSummary, ...] = ()
    changed: tuple[FileChange, ...] = ()
    note: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.note)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "added": [{"path": f.path, **f.to_json()} for f in self.added],
            "removed": [{"path": f.path, **f.to_json()} for f in self.removed],
            "changed": [c.to_json() for c in self.changed],
        }
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class EIFDiff:
    """The explanation.  ``measurements_equal`` decides the exit status of ``eif-diff``."""

    pcrs: dict[str, tuple[str | None, str | None]]
    sections: tuple[tuple[SectionSummary | None, SectionSummary | None], ...]
    ramdisks: tuple[RamdiskDiff, ...]
    cmdline: tuple[str | None, str | None] | None
    metadata: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    header: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def measurements_equal(self) -> bool:
        return not self.pcrs

    @property
    def identical(self) -> bool:
        return not (self.pcrs or self.sections or self.cmdline or self.metadata or self.header
                    or any(not r.empty for r in self.ramdisks))

    def to_json(self) -> dict[str, Any]:
        return {
            "MeasurementsEqual": self.measurements_equal,
            "PCRs": {k: {"a": a, "b": b, "covers": _PCR_SCOPE.get(k, "")} for k, (a, b) in self.pcrs.items()},
            "Header": {k: {"a": a, "b": b} for k, (a, b) in self.header.items()},
            "Sections": [{"a": a.to_json() if a else None, "b": b.to_json() if b else None}
                         for a, b in self.sections],
            "Cmdline": None if self.cmdline is None else {"a": self.cmdline[0], "b": self.cmdline[1]},
            "Ramdisks": [r.to_json() for r in self.ramdisks if not r.empty],
            "Metadata": {k: {"a": a, "b": b} for k, (a, b) in self.metadata.items()},
            "MetadataAffectsPCRs": False,
        }

    def render_text(self) -> str:
        lines: list[str] = []
        if self.identical:
            return "The images are identical in measurements, sections, ramdisk contents and metadata."
        if self.pcrs:
            lines.append(f"Measurements differ: {', '.join(self.pcrs)}")
            for k, (a, b) in self.pcrs.items():
                lines.append(f"  {k} ({_PCR_SCOPE.get(k, '')}):")
                # PCR8 exists only for a signed image: an unsigned side reads "absent", not "None".
                lines.append(f"    a: {a if a is not None else 'absent'}")
                lines.append(f"    b: {b if b is not None else 'absent'}")
        else:
            lines.append("Measurements are identical (PCR0, PCR1, PCR2 and PCR8).")
        for k, (a, b) in self.header.items():
            lines.append(f"Header {k}: {a} -> {b}")
        if self.sections:
            lines.append("Sections that differ:")
            for sa, sb in self.sections:
                if sa is None or sb is None:
                    one = sa or sb
                    assert one is not None
                    where = "only in a" if sb is None else "only in b"
                    lines.append(f"  [{one.index}] {one.kind}: {where} ({one.size} bytes)")
                else:
                    lines.append(f"  [{sa.index}] {sa.kind}: size {sa.size} -> {sb.size}, "
                                 f"sha384 {sa.sha384[:16]}… -> {sb.sha384[:16]}…")
        if self.cmdline is not None:
            lines.append("Kernel command line differs:")
            lines.append(f"  a: {self.cmdline[0]}")
            lines.append(f"  b: {self.cmdline[1]}")
        for r in self.ramdisks:
            if r.empty:
                continue
            lines.append(f"Ramdisk {r.index} ({'bootstrap, PCR1' if r.index == 0 else 'application, PCR2'}):")
            if r.note:
                lines.append(f"  {r.note}")
            for f in r.added:
                lines.append(f"  + {f.path} ({f.type}, {f.size} bytes, mode {f.mode:04o})")
            for f in r.removed:
                lines.append(f"  - {f.path} ({f.type})")
            for c in r.changed:
                parts = []
                for k, (a, b) in c.changes.items():
                    if k == "mode":
                        parts.append(f"mode {a:04o} -> {b:04o}")
                    elif k == "sha256":
                        parts.append(f"content sha256 {str(a)[:16]}… -> {str(b)[:16]}…")
                    else:
                        parts.append(f"{k} {a} -> {b}")
                lines.append(f"  ~ {c.path}: {', '.join(parts)}")
        if self.metadata:
            lines.append("Metadata differs (metadata is not measured: it does not affect any PCR):")
            for k, (a, b) in self.metadata.items():
                lines.append(f"  {k}: {_short(a)} -> {_short(b)}")
        return "\n".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    import json  # noqa: PLC0415 - only for rendering

    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _HashingReader:
    """A read()-able view of a section's chunks that hashes everything it consumes (SHA-384 of the section)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._pos = 0
        self.hash = hashlib.sha384()

    def _fill(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self.hash.update(chunk)
        self._buf = self._buf[self._pos:] + chunk
        self._pos = 0
        return True

    def peek(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n and self._fill():
            pass
        return self._buf[self._pos:self._pos + n]

    def read(self, n: int) -> bytes:
        if len(self._buf) - self._pos >= n:
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
            return out
        parts = [self._buf[self._pos:]]
        have = len(parts[0])
        self._buf, self._pos = b"", 0
        while have < n and self._fill():
            take = self._buf[: n - have]
            self._pos = len(take)
            parts.append(take)
            have += len(take)
        return b"".join(parts)

    def drain(self) -> None:
        self._buf, self._pos = b"", 0
        for chunk in self._chunks:
            self.hash.update(chunk)


def summarise_ramdisk(fileobj: IO[bytes], section: WalkedSection) -> tuple[dict[str, FileSummary] | None, str,
                                                                           str | None]:
    """(entries by path or None if not a plain newc archive, the section's SHA-384, a note)."""
    reader = _HashingReader(iter_section_data(fileobj, section, chunk_size=1 << 20))
    head = reader.peek(6)
    entries: dict[str, FileSummary] | None = None
    note = None
    if head == b"070701":
        entries = {}
        try:
            for member, chunks in iter_members(reader, section.size):  # type: ignore[arg-type]
                digest = None
                data_for_link = b""
                if member.file_type in (stat.S_IFREG, stat.S_IFLNK):
                    h = hashlib.sha256()
                    for chunk in chunks:
                        h.update(chunk)
                        if member.file_type == stat.S_IFLNK and len(data_for_link) < 4096:
                            data_for_link += chunk
                    digest = h.hexdigest()
                link = data_for_link.decode("utf-8", "replace") if member.file_type == stat.S_IFLNK else None
                entries[member.name] = FileSummary(
                    path=member.name, type=_TYPE_NAMES.get(member.file_type, "other"), mode=member.permissions,
                    uid=member.uid, gid=member.gid, mtime=member.mtime, size=member.size,
                    digest=digest if member.file_type == stat.S_IFREG else None, link_target=link,
                    rdev=(member.rdev_major, member.rdev_minor))
        except FormatError as exc:
            entries = None
            note = f"not a readable newc cpio archive ({exc}); compared as bytes only"
    elif head[:2] == b"\x1f\x8b":
        note = "compressed (gzip) ramdisk: compared as bytes only"
    else:
        note = "not a newc cpio archive: compared as bytes only"
    reader.drain()
    return entries, reader.hash.hexdigest(), note


def _section_digest(fileobj: IO[bytes], section: WalkedSection) -> str:
    h = hashlib.sha384()
    for chunk in iter_section_data(fileobj, section):
        h.update(chunk)
    return h.hexdigest()


_COMPARED = ("type", "size", "digest", "mode", "uid", "gid", "mtime", "link_target", "rdev")
_FIELD_NAMES = {"digest": "sha256"}


def _diff_entries(index: int, a: dict[str, FileSummary] | None, b: dict[str, FileSummary] | None,
                  note: str | None) -> RamdiskDiff:
    if a is None or b is None:
        return RamdiskDiff(index=index, note=note)
    added = tuple(b[p] for p in sorted(b.keys() - a.keys()))
    removed = tuple(a[p] for p in sorted(a.keys() - b.keys()))
    changed = []
    for p in sorted(a.keys() & b.keys()):
        fa, fb = a[p], b[p]
        changes: dict[str, tuple[Any, Any]] = {
            _FIELD_NAMES.get(k, k): (getattr(fa, k), getattr(fb, k)) for k in _COMPARED
            if getattr(fa, k) != getattr(fb, k)}
        if "rdev" in changes:
            ra, rb = changes["rdev"]
            changes["rdev"] = (f"{ra[0]}:{ra[1]}", f"{rb[0]}:{rb[1]}")
        if changes:
            changed.append(FileChange(p, changes))
    return RamdiskDiff(index=index, added=added, removed=removed, changed=tuple(changed))


def _metadata_diff(a: EIFInfo, b: EIFInfo) -> dict[str, tuple[Any, Any]]:
    def flat(info: EIFInfo) -> dict[str, Any]:
        if info.metadata is None:
            return {}
        j = info.metadata.to_json()
        out = {k: v for k, v in j.items() if k != "BuildMetadata"}
        out.update({f"BuildMetadata.{k}": v for k, v in j["BuildMetadata"].items()})
        return out

    fa, fb = flat(a), flat(b)
    return {k: (fa.get(k), fb.get(k)) for k in [*fa, *(k for k in fb if k not in fa)] if fa.get(k) != fb.get(k)}


def diff_files(fa: IO[bytes], fb: IO[bytes]) -> EIFDiff:
    """Compare two EIFs given as seekable binary files positioned at offset 0."""
    ia = measure_eif(fa)
    ib = measure_eif(fb)
    ja, jb = ia.measurements.to_json(), ib.measurements.to_json()
    pcrs = {k: (ja.get(k), jb.get(k)) for k in ("PCR0", "PCR1", "PCR2", "PCR8") if ja.get(k) != jb.get(k)}
    header: dict[str, tuple[Any, Any]] = {}
    if ia.header.version != ib.header.version:
        header["version"] = (ia.header.version, ib.header.version)
    if ia.header.arch != ib.header.arch:
        header["arch"] = (ia.header.arch, ib.header.arch)

    sections: list[tuple[SectionSummary | None, SectionSummary | None]] = []
    ramdisk_entries: dict[int, list[tuple[dict[str, FileSummary] | None, str | None]]] = {}
    summaries: list[list[SectionSummary]] = []
    for f, info in ((fa, ia), (fb, ib)):
        out: list[SectionSummary] = []
        rd = 0
        for s in info.sections:
            if s.section_type == SectionType.RAMDISK:
                entries, digest, note = summarise_ramdisk(f, s)
                ramdisk_entries.setdefault(rd, []).append((entries, note))
                rd += 1
            else:
                digest = _section_digest(f, s)
            out.append(SectionSummary(s.index, s.section_type.name.lower(), s.size, digest))
        summaries.append(out)
    sa, sb = summaries
    for i in range(max(len(sa), len(sb))):
        x = sa[i] if i < len(sa) else None
        y = sb[i] if i < len(sb) else None
        if x is None or y is None or (x.kind, x.size, x.sha384) != (y.kind, y.size, y.sha384):
            sections.append((x, y))

    ramdisks = []
    for idx in sorted(ramdisk_entries):
        pair = ramdisk_entries[idx]
        if len(pair) == 2:
            (ea, na), (eb, nb) = pair
            note = na or nb if (ea is None or eb is None) else None
            ramdisks.append(_diff_entries(idx, ea, eb, note))
        else:
            ramdisks.append(RamdiskDiff(index=idx, note="present in only one image"))
    # Ramdisks whose section bytes are equal have no file-level changes by construction.
    cmdline = None
    if ia.cmdline != ib.cmdline:
        cmdline = (ia.cmdline.decode("utf-8", "replace") if ia.cmdline is not None else None,
                   ib.cmdline.decode("utf-8", "replace") if ib.cmdline is not None else None)
    return EIFDiff(pcrs=pcrs, sections=tuple(sections), ramdisks=tuple(ramdisks), cmdline=cmdline,
                   metadata=_metadata_diff(ia, ib), header=header)


def diff_eifs(path_a: str | Path, path_b: str | Path) -> EIFDiff:
    """Open and compare two EIF files."""
    handles = []
    try:
        for p in (path_a, path_b):
            try:
                handles.append(open(p, "rb"))  # noqa: SIM115 - closed below
            except OSError as exc:
                raise FileOperationError(f"cannot open {p}: {exc.strerror}",
                                         details={"file": str(p), "operation": "Open"}) from exc
        return diff_files(handles[0], handles[1])
    finally:
        for h in handles:
            h.close()
