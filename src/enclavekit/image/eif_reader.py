"""Streaming EIF reader: measures PCR0/1/2/8 and the CRC of a file object in one chunked pass.

Semantics follow nitro-cli's ``EifReader::from_eif`` (spec eif-pcr-cli §1.7) in the default, lenient mode: the
header's section table is ignored, sections are read one after the other from offset 548 until fewer than 12
bytes remain, the CRC is reported (``crc_ok``) but not enforced.  ``strict=True`` applies the QEMU rules of
:func:`enclavekit.formats.eif.validate_structure` on top and refuses anything they reject.

Memory stays bounded whatever the image size: data is read in 1 MiB chunks, sections are never loaded whole
(metadata, cmdline and signature, which are, have hard caps checked before reading).  SHA-384 runs on two
threads (hashlib releases the GIL on large buffers): one computes PCR0 (and PCR1 as a snapshot of PCR0 after the
first ramdisk, §2.2: PCR1's content is a prefix of PCR0's), the other PCR2; the calling thread reads and CRCs.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from enclavekit.errors import EIFFormatError
from enclavekit.formats.eif import (
    CMDLINE_MAX_SIZE,
    CRC_OFFSET,
    CURRENT_VERSION,
    HEADER_SIZE,
    LEGACY_VERSIONS,
    MAX_NUM_SECTIONS,
    METADATA_MAX_SIZE,
    SECTION_HEADER_SIZE,
    SIGNATURE_MAX_SIZE,
    EIFHeader,
    EIFMetadata,
    EIFSectionHeader,
    SectionType,
    WalkedSection,
    validate_header,
    validate_structure,
)
from enclavekit.formats.eif_signature import EIFSignature
from enclavekit.formats.pcr import HASH_ALGORITHM, Measurements, pcr_from_digest, pcr_of_content

__all__ = [
    "CHUNK_SIZE",
    "EIFInfo",
    "MeasurementPipeline",
    "certificate_der_from_pem",
    "measure_eif",
    "iter_section_data",
    "read_section",
]

CHUNK_SIZE = 1 << 20
_QUEUE_DEPTH = 8  # chunks in flight per hashing thread: bounds memory to ~2 x 8 MiB


class _HashThread:
    """A daemon thread applying ``fn(arg)`` items in order; ``None`` stops it."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[tuple[Callable[[Any], object], Any] | None] = queue.Queue(_QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                fn, arg = item
                fn(arg)
            finally:
                self._queue.task_done()

    def submit(self, fn: Callable[[Any], object], arg: Any) -> None:
        self._queue.put((fn, arg))

    def drain(self) -> None:
        self._queue.join()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class MeasurementPipeline:
    """Computes PCR0/PCR1/PCR2 from data fed in file order (§2.2).

    ``boot(chunk)`` feeds kernel, cmdline and the first ramdisk (PCR0 and PCR1); ``user(chunk)`` feeds the
    later ramdisks (PCR0 and PCR2).  Chunks are hashed on worker threads after the call returns, so a chunk must
    not be modified once fed (pass ``bytes``, or a buffer that is not reused).  Use as a context manager, or call
    :meth:`close`, so the threads always stop.
    """

    def __init__(self) -> None:
        self._h0 = hashlib.sha384()
        self._h1: Any = None  # set when the first user chunk arrives: PCR1 content is a prefix of PCR0's
        self._h2 = hashlib.sha384()
        self._t0 = _HashThread("pcr0-hash")
        self._t2 = _HashThread("pcr2-hash")
        self._closed = False

    def __enter__(self) -> MeasurementPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boot(self, chunk: bytes | memoryview) -> None:
        if not len(chunk):
            return
        self._t0.submit(self._h0.update, chunk)
        if self._h1 is not None:
            # lenient walk of an unusual file: boot data after user data; PCR1 is no longer a prefix of PCR0
            self._t2.submit(self._h1.update, chunk)

    def user(self, chunk: bytes | memoryview) -> None:
        if not len(chunk):
            return
        if self._h1 is None:
            self._t0.drain()
            self._h1 = self._h0.copy()
        self._t0.submit(self._h0.update, chunk)
        self._t2.submit(self._h2.update, chunk)

    def finish(self) -> Measurements:
        """Wait for the hashing threads and return PCR0/1/2 (no PCR8)."""
        self.close()
        h1 = self._h1 if self._h1 is not None else self._h0
        return Measurements(
            pcr0=pcr_from_digest(self._h0.digest()),
            pcr1=pcr_from_digest(h1.digest()),
            pcr2=pcr_from_digest(self._h2.digest()),
            hash_algorithm=HASH_ALGORITHM,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._t0.stop()
            self._t2.stop()


@dataclass(frozen=True)
class EIFInfo:
    """What :func:`measure_eif` found.  ``file_size`` counts what was walked plus any ignored tail bytes."""

    header: EIFHeader
    sections: tuple[WalkedSection, ...]
    measurements: Measurements
    computed_crc: int
    file_size: int
    cmdline: bytes | None
    metadata: EIFMetadata | None
    metadata_bytes: bytes | None
    signature: EIFSignature | None
    certificate_der: bytes | None

    @property
    def crc_ok(self) -> bool:
        return self.computed_crc == self.header.eif_crc32

    @property
    def is_signed(self) -> bool:
        return self.signature is not None

    def sections_of(self, kind: SectionType) -> tuple[WalkedSection, ...]:
        return tuple(s for s in self.sections if s.section_type == kind)


def certificate_der_from_pem(pem: bytes) -> bytes:
    """DER of the PEM certificate stored in a signature section (§2.2: PCR8 hashes the DER)."""
    # deferred: only signed images need X.509, and run-enclave start-up time counts (issue 4)
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import Encoding  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise EIFFormatError(f"the signature section's signing certificate is not a PEM X.509 certificate: "
                             f"{exc}") from exc
    return cert.public_bytes(Encoding.DER)


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EIFFormatError(f"truncated EIF: {what} needs {n} bytes, only {len(data)} remain")
    return data


def _remaining(f: IO[bytes]) -> int | None:
    """Bytes left after the current position, if the file can tell (seekable); else None."""
    try:
        if not f.seekable():
            return None
        here = f.tell()
        end = f.seek(0, 2)
        f.seek(here)
    except (OSError, ValueError):
        return None
    return end - here


def measure_eif(fileobj: IO[bytes], *, strict: bool = False, allow_legacy_versions: bool = False) -> EIFInfo:
    """Walk an EIF from the file object's current position, measure it, and (``strict``) validate it.

    Raises :class:`~enclavekit.errors.EIFFormatError` for bytes that do not parse (truncation, unknown section
    type, a size past the end of the file, absurd counts) and, with ``strict``,
    :class:`~enclavekit.errors.EIFValidationError` naming the broken rule.  ``allow_legacy_versions`` accepts
    versions 2 and 3 in strict mode; lenient mode always accepts 2, 3 and 4.
    """
    remaining = _remaining(fileobj)
    header_bytes = _read_exact(fileobj, HEADER_SIZE, "the EIF header")
    header = EIFHeader.from_bytes(header_bytes)
    if strict:
        validate_header(header, allow_legacy_versions=allow_legacy_versions)
    elif header.version not in (CURRENT_VERSION, *LEGACY_VERSIONS):
        raise EIFFormatError(f"unsupported EIF version {header.version} (known: 2, 3, 4)")
    if remaining is not None:
        remaining -= HEADER_SIZE

    crc = zlib.crc32(header_bytes[:CRC_OFFSET])
    sections: list[WalkedSection] = []
    offset = HEADER_SIZE
    tail = 0
    cmdline: bytes | None = None
    metadata_bytes: bytes | None = None
    signature_bytes: bytes | None = None
    ramdisks = 0
    with MeasurementPipeline() as pipeline:
        while True:
            raw = fileobj.read(SECTION_HEADER_SIZE)
            if len(raw) < SECTION_HEADER_SIZE:
                # §1.7: nitro-cli stops when a section header cannot be read whole; the tail is ignored
                tail = len(raw)
                break
            if len(sections) == MAX_NUM_SECTIONS:
                raise EIFFormatError(f"EIF holds more than {MAX_NUM_SECTIONS} sections")
            sh = EIFSectionHeader.from_bytes(raw)
            if remaining is not None:
                remaining -= SECTION_HEADER_SIZE
                if sh.size > remaining:
                    raise EIFFormatError(f"EIF section {len(sections)} ({sh.section_type.name.lower()}) claims "
                                         f"{sh.size} bytes, only {remaining} remain in the file")
                remaining -= sh.size
            section = WalkedSection(index=len(sections), offset=offset, header=sh)
            sections.append(section)
            crc = zlib.crc32(raw, crc)
            kind = sh.section_type
            if kind in (SectionType.METADATA, SectionType.SIGNATURE):
                cap = METADATA_MAX_SIZE if kind == SectionType.METADATA else SIGNATURE_MAX_SIZE
                if sh.size > cap:
                    raise EIFFormatError(f"EIF {kind.name.lower()} section is {sh.size} bytes, "
                                         f"more than the {cap} allowed")
                data = _read_exact(fileobj, sh.size, f"section {section.index}")
                crc = zlib.crc32(data, crc)
                # nitro-cli keeps one of each; strict mode refuses duplicates
                if kind == SectionType.METADATA and metadata_bytes is None:
                    metadata_bytes = data
                elif kind == SectionType.SIGNATURE and signature_bytes is None:
                    signature_bytes = data
            else:
                # §2.2: kernel, cmdline and ramdisk 0 -> PCR0 + PCR1; later ramdisks -> PCR0 + PCR2
                feed = pipeline.boot
                if kind == SectionType.RAMDISK:
                    if ramdisks > 0:
                        feed = pipeline.user
                    ramdisks += 1
                keep = kind == SectionType.CMDLINE and cmdline is None and sh.size <= CMDLINE_MAX_SIZE
                kept: list[bytes] = []
                left = sh.size
                while left:
                    chunk = fileobj.read(min(CHUNK_SIZE, left))
                    if not chunk:
                        raise EIFFormatError(f"truncated EIF: section {section.index} "
                                             f"({kind.name.lower()}) ends {left} bytes early")
                    left -= len(chunk)
                    crc = zlib.crc32(chunk, crc)
                    feed(chunk)
                    if keep:
                        kept.append(chunk)
                if keep:
                    cmdline = b"".join(kept)
            offset = section.end
        measurements = pipeline.finish()

    if strict:
        # structure first: the section table, sizes and CRC say whether the contents are worth parsing
        validate_structure(header, sections, file_size=offset + tail, computed_crc=crc,
                           allow_legacy_versions=allow_legacy_versions)
    metadata = EIFMetadata.from_bytes(metadata_bytes) if metadata_bytes is not None else None
    signature = EIFSignature.from_bytes(signature_bytes) if signature_bytes is not None else None
    certificate_der = None
    if signature is not None:
        certificate_der = certificate_der_from_pem(signature.first.signing_certificate)
        measurements = Measurements(measurements.pcr0, measurements.pcr1, measurements.pcr2,
                                    pcr_of_content(certificate_der), measurements.hash_algorithm)
    return EIFInfo(
        header=header,
        sections=tuple(sections),
        measurements=measurements,
        computed_crc=crc,
        file_size=offset + tail,
        cmdline=cmdline,
        metadata=metadata,
        metadata_bytes=metadata_bytes,
        signature=signature,
        certificate_der=certificate_der,
    )


def iter_section_data(fileobj: IO[bytes], section: WalkedSection, *, base: int = 0,
                      chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The data of one walked section, in chunks (``fileobj`` must be seekable; ``base`` = where the EIF starts)."""
    fileobj.seek(base + section.data_offset)
    left = section.size
    while left:
        chunk = fileobj.read(min(chunk_size, left))
        if not chunk:
            raise EIFFormatError(f"truncated EIF: section {section.index} ends {left} bytes early")
        left -= len(chunk)
        yield chunk


def read_section(fileobj: IO[bytes], section: WalkedSection, *, max_size: int, base: int = 0) -> bytes:
    """The whole data of a section known to be small (refuses more than ``max_size`` bytes before reading)."""
    if section.size > max_size:
        raise EIFFormatError(f"section {section.index} is {section.size} bytes, more than the {max_size} allowed")
    return b"".join(iter_section_data(fileobj, section, base=base))
