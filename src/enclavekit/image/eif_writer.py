"""Streaming EIF writer (spec eif-pcr-cli §1.5, §1.6, §2.2).

:func:`write_eif` writes kernel, cmdline, metadata, the ramdisks and (when signing) the signature, in
``EifBuilder``'s order, chunk by chunk: a section header goes out with a zero size, its data follows, and the
size is patched afterwards, so sources whose length is unknown in advance (a cpio archive generated on the fly)
need no temporary copy.  PCRs and the CRC are computed in the same pass (PCR hashing on two threads, see
:class:`~enclavekit.image.eif_reader.MeasurementPipeline`); the CRC of the header, which is only known at the
end, is folded in front with :func:`~enclavekit.formats.eif.crc32_combine`.  Memory stays bounded (~1 MiB
chunks, bounded queues) whatever the image size.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, BinaryIO, Protocol

from enclavekit.errors import FileOperationError, ImageBuildError
from enclavekit.formats.eif import (
    ARCH_FLAGS,
    CRC_OFFSET,
    CURRENT_VERSION,
    DEFAULT_CPUS,
    DEFAULT_MEM,
    HEADER_SIZE,
    MAX_NUM_SECTIONS,
    SECTION_HEADER_SIZE,
    EIFHeader,
    EIFMetadata,
    EIFSectionHeader,
    SectionType,
    crc32_combine,
)
from enclavekit.formats.pcr import Measurements
from enclavekit.image.eif_reader import CHUNK_SIZE, MeasurementPipeline

if TYPE_CHECKING:
    from enclavekit.image.signing import EIFSigner

__all__ = [
    "ChunkSource",
    "BytesSource",
    "FileSource",
    "EIFContent",
    "EIFStreamWriter",
    "write_eif",
]

# Chunks at least this large go straight through; smaller ones are gathered into ~CHUNK_SIZE blocks first
# (handing every 110-byte cpio header to a hashing thread would cost more than hashing it).
_PASS_THROUGH = 256 << 10


class ChunkSource(Protocol):
    """Section data as a stream of chunks.

    A yielded chunk must not be modified afterwards (it is hashed on another thread after ``chunks`` resumes):
    yield ``bytes``, or memoryviews of buffers that are never reused.
    """

    def chunks(self) -> Iterator[bytes | memoryview]: ...


@dataclass(frozen=True)
class BytesSource:
    """A section whose data is already in memory."""

    data: bytes

    def chunks(self) -> Iterator[bytes | memoryview]:
        view = memoryview(self.data)
        for start in range(0, len(view), CHUNK_SIZE):
            yield view[start : start + CHUNK_SIZE]


@dataclass(frozen=True)
class FileSource:
    """A section read from a file (kernel, a prebuilt ramdisk), in ``CHUNK_SIZE`` reads."""

    path: str | os.PathLike[str]

    def chunks(self) -> Iterator[bytes | memoryview]:
        try:
            with open(self.path, "rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    yield chunk
        except OSError as exc:
            raise FileOperationError(f"cannot read {os.fspath(self.path)!s}: {exc.strerror or exc}",
                                     details={"File": os.fspath(self.path), "Operation": "Read"}) from exc


@dataclass(frozen=True)
class EIFContent:
    """What goes into an EIF.  ``ramdisks[0]`` is measured into PCR1, the others into PCR2 (§2.2)."""

    kernel: ChunkSource
    cmdline: bytes
    metadata: EIFMetadata
    ramdisks: Sequence[ChunkSource]
    arch: str = "x86_64"


class EIFStreamWriter:
    """Low-level: writes sections one after the other, then the header with its CRC.

    ``out`` must be seekable; the EIF starts at its current position.  Call :meth:`section` or
    :meth:`section_bytes` per section in file order, then :meth:`finish` exactly once.
    """

    def __init__(self, out: BinaryIO, *, progress: Callable[[int], None] | None = None) -> None:
        if not out.seekable():
            raise ValueError("the EIF output must be seekable (write to a temporary file, then rename it)")
        self._out = out
        self._base = out.tell()
        self._progress = progress
        self._sections: list[tuple[int, int]] = []  # (offset of the section header, data size)
        self._length = 0  # bytes written after the header
        self._crc = 0  # CRC-32 of everything after the header
        self._finished = False
        self._write(bytes(HEADER_SIZE))  # placeholder, rewritten by finish()
        self._length = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        if self._progress is not None:
            self._progress(len(data))

    def _begin(self, kind: SectionType, size: int, flags: int) -> int:
        if self._finished:
            raise RuntimeError("EIF already finished")
        if len(self._sections) == MAX_NUM_SECTIONS:
            raise ImageBuildError(f"an EIF holds at most {MAX_NUM_SECTIONS} sections")
        offset = HEADER_SIZE + self._length
        self._write(EIFSectionHeader(kind, size, flags).to_bytes())
        return offset

    def _end(self, kind: SectionType, offset: int, size: int, data_crc: int, flags: int) -> None:
        header = EIFSectionHeader(kind, size, flags).to_bytes()
        self._crc = crc32_combine(self._crc, zlib.crc32(header), SECTION_HEADER_SIZE)
        self._crc = crc32_combine(self._crc, data_crc, size)
        self._length += SECTION_HEADER_SIZE + size
        self._sections.append((offset, size))

    def section_bytes(self, kind: SectionType, data: bytes, *, flags: int = 0) -> int:
        """A section whose data is known in full (cmdline, metadata, signature)."""
        offset = self._begin(kind, len(data), flags)
        self._write(data)
        self._end(kind, offset, len(data), zlib.crc32(data), flags)
        return len(data)

    def section(self, kind: SectionType, chunks: Iterable[bytes | memoryview],
                feed: Callable[[bytes | memoryview], None] | None = None, *, flags: int = 0) -> int:
        """Stream a section; every written chunk is also passed to ``feed`` (the PCR pipeline)."""
        offset = self._begin(kind, 0, flags)
        size = 0
        data_crc = 0

        def emit(block: bytes | memoryview) -> None:
            nonlocal size, data_crc
            self._write(block)
            data_crc = zlib.crc32(block, data_crc)
            size += len(block)
            if feed is not None:
                feed(block)

        pending = bytearray()
        for item in chunks:
            chunk = item.cast("B") if isinstance(item, memoryview) and (item.ndim != 1 or item.itemsize != 1) else item
            if len(chunk) >= _PASS_THROUGH:
                if pending:
                    emit(bytes(pending))
                    pending = bytearray()
                emit(chunk)
            elif chunk:
                pending += chunk
                if len(pending) >= CHUNK_SIZE:
                    emit(bytes(pending))
                    pending = bytearray()
        if pending:
            emit(bytes(pending))
        # §1.3: patch the section header's size now that the data is written
        end = self._out.tell()
        self._out.seek(self._base + offset + 4)
        self._out.write(struct.pack(">Q", size))
        self._out.seek(end)
        self._end(kind, offset, size, data_crc, flags)
        return size

    def finish(self, *, flags: int = 0, version: int = CURRENT_VERSION, default_mem: int = DEFAULT_MEM,
               default_cpus: int = DEFAULT_CPUS, reserved: int = 0, unused: int = 0) -> EIFHeader:
        """Write the header (section table from what was written, CRC per §1.6) and return it."""
        if self._finished:
            raise RuntimeError("EIF already finished")
        self._finished = True
        n = len(self._sections)
        offsets = [o for o, _ in self._sections] + [0] * (MAX_NUM_SECTIONS - n)
        sizes = [s for _, s in self._sections] + [0] * (MAX_NUM_SECTIONS - n)
        header = EIFHeader(version=version, flags=flags, default_mem=default_mem, default_cpus=default_cpus,
                           reserved=reserved, num_sections=n, section_offsets=tuple(offsets),
                           section_sizes=tuple(sizes), unused=unused)
        head_crc = zlib.crc32(header.to_bytes()[:CRC_OFFSET])
        header = replace(header, eif_crc32=crc32_combine(head_crc, self._crc, self._length))
        end = self._out.tell()
        self._out.seek(self._base)
        self._out.write(header.to_bytes())
        self._out.seek(end)
        self._out.flush()
        return header


def write_eif(out: BinaryIO, content: EIFContent, *, signer: EIFSigner | None = None,
              progress: Callable[[int], None] | None = None) -> Measurements:
    """Write ``content`` as an EIF version 4 to the seekable ``out`` and return its measurements.

    Section order is ``EifBuilder``'s (§1.5): kernel, cmdline, metadata, ramdisks, then the signature when
    ``signer`` is given.  ``progress(n)`` is called with the number of bytes just written (an increment).
    """
    if not content.ramdisks:
        raise ValueError("an EIF needs at least one ramdisk")
    if len(content.ramdisks) + 3 + (signer is not None) > MAX_NUM_SECTIONS:
        raise ValueError(f"too many ramdisks for an EIF ({MAX_NUM_SECTIONS} sections at most)")
    if content.arch not in ARCH_FLAGS:
        raise ValueError(f"arch must be one of {sorted(ARCH_FLAGS)}, got {content.arch!r}")
    if b"\0" in content.cmdline:
        # §1.5: the builder goes through a C string; an interior NUL cannot be represented
        raise ImageBuildError("the kernel command line contains a NUL byte")
    metadata = content.metadata.to_bytes()
    writer = EIFStreamWriter(out, progress=progress)
    with MeasurementPipeline() as pipeline:
        writer.section(SectionType.KERNEL, content.kernel.chunks(), pipeline.boot)
        writer.section_bytes(SectionType.CMDLINE, content.cmdline)
        pipeline.boot(content.cmdline)
        writer.section_bytes(SectionType.METADATA, metadata)
        for i, ramdisk in enumerate(content.ramdisks):
            writer.section(SectionType.RAMDISK, ramdisk.chunks(), pipeline.boot if i == 0 else pipeline.user)
        measurements = pipeline.finish()
    if signer is not None:
        writer.section_bytes(SectionType.SIGNATURE, signer.signature_section(measurements.pcr0))
        measurements = replace(measurements, pcr8=signer.pcr8)
    writer.finish(flags=ARCH_FLAGS[content.arch])
    return measurements
