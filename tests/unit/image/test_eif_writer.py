"""The streaming EIF writer: chunking, progress, sources, bounded sections, and agreement with the reader."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavekit.errors import FileOperationError, ImageBuildError
from enclavekit.formats.eif import BuildMetadata, EIFHeader, EIFMetadata, SectionType
from enclavekit.formats.pcr import EMPTY_PCR, pcr_of_content
from enclavekit.image.eif_reader import iter_section_data, measure_eif, read_section
from enclavekit.image.eif_writer import BytesSource, EIFContent, EIFStreamWriter, FileSource, write_eif

META = EIFMetadata("img", "1", BuildMetadata("2024-01-01T00:00:00+00:00", "enclavekit", "0.1.0", "Linux", "6.1"),
                   docker_info={"Id": "sha256:00"}, custom_metadata={"k": "v"})


class Pieces:
    """A source yielding the data in uneven pieces, including empty ones and memoryviews."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes = data, sizes

    def chunks(self) -> Iterator[bytes | memoryview]:
        pos, i = 0, 0
        while pos < len(self.data):
            n = self.sizes[i % len(self.sizes)]
            piece = self.data[pos:pos + n]
            yield memoryview(piece) if i % 2 else piece
            pos += n
            i += 1


def write(content: EIFContent, **kw: object) -> tuple[bytes, object]:
    out = io.BytesIO()
    m = write_eif(out, content, **kw)  # type: ignore[arg-type]
    return out.getvalue(), m


def test_uneven_chunks_measure_like_whole_data() -> None:
    kernel = os.urandom(3 << 20)
    rd0 = os.urandom(100_000)
    rd1 = bytes(range(256)) * 9000
    pieces = Pieces(rd1, [0, 1, 110, 300_000, 7, 2 << 20])
    data, m = write(EIFContent(Pieces(kernel, [1 << 20, 5, 500_000]), b"console=ttyS0", META,
                               [BytesSource(rd0), pieces]))
    assert m.pcr0 == pcr_of_content(kernel + b"console=ttyS0" + rd0 + rd1)  # type: ignore[attr-defined]
    assert m.pcr1 == pcr_of_content(kernel + b"console=ttyS0" + rd0)  # type: ignore[attr-defined]
    assert m.pcr2 == pcr_of_content(rd1)  # type: ignore[attr-defined]
    info = measure_eif(io.BytesIO(data), strict=True)
    assert info.measurements == m and info.metadata == META
    f = io.BytesIO(data)
    ramdisks = info.sections_of(SectionType.RAMDISK)
    assert b"".join(iter_section_data(f, ramdisks[1])) == rd1
    assert read_section(f, info.sections_of(SectionType.CMDLINE)[0], max_size=100) == b"console=ttyS0"


def test_progress_counts_every_byte_written() -> None:
    seen: list[int] = []
    data, _ = write(EIFContent(BytesSource(b"k" * 5_000_000), b"c", META, [BytesSource(b"r")]),
                    progress=seen.append)
    assert sum(seen) == len(data) and len(seen) > 3


def test_one_ramdisk_gives_the_empty_pcr2_and_arch_flag() -> None:
    data, m = write(EIFContent(BytesSource(b"k"), b"c", META, [BytesSource(b"r")], arch="aarch64"))
    assert m.pcr2 == EMPTY_PCR  # type: ignore[attr-defined]
    assert EIFHeader.from_bytes(data[:548]).flags == 1


def test_eif_is_written_at_the_current_position_of_the_output(tmp_path: Path) -> None:
    out = io.BytesIO()
    out.write(b"prefix")
    write_eif(out, EIFContent(BytesSource(b"k"), b"c", META, [BytesSource(b"r")]))
    data = out.getvalue()
    assert data.startswith(b"prefix.eif")
    info = measure_eif(io.BytesIO(data[6:]), strict=True)
    f = io.BytesIO(data)
    assert b"".join(iter_section_data(f, info.sections[0], base=6)) == b"k"


def test_file_source(tmp_path: Path) -> None:
    p = tmp_path / "kernel"
    p.write_bytes(b"K" * 3_000_001)
    _, m = write(EIFContent(FileSource(p), b"c", META, [FileSource(p)]))
    assert m.pcr1 == pcr_of_content(b"K" * 3_000_001 + b"c" + b"K" * 3_000_001)  # type: ignore[attr-defined]
    with pytest.raises(FileOperationError) as exc:
        write(EIFContent(FileSource(tmp_path / "missing"), b"c", META, [BytesSource(b"r")]))
    assert exc.value.code == "E19"


def test_nul_in_cmdline_is_refused() -> None:
    with pytest.raises(ImageBuildError):
        write(EIFContent(BytesSource(b"k"), b"a\0b", META, [BytesSource(b"r")]))


@pytest.mark.parametrize("content", [
    EIFContent(BytesSource(b"k"), b"c", META, []),
    EIFContent(BytesSource(b"k"), b"c", META, [BytesSource(b"r")], arch="riscv"),
    EIFContent(BytesSource(b"k"), b"c", META, [BytesSource(b"r")] * 30),
])
def test_caller_bugs_raise_value_error(content: EIFContent) -> None:
    with pytest.raises(ValueError):
        write(content)


def test_output_must_be_seekable() -> None:
    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

    with pytest.raises(ValueError, match="seekable"):
        write_eif(Sink(), EIFContent(BytesSource(b"k"), b"c", META, [BytesSource(b"r")]))  # type: ignore[arg-type]


def test_stream_writer_limits() -> None:
    w = EIFStreamWriter(io.BytesIO())
    for _ in range(32):
        w.section_bytes(SectionType.RAMDISK, b"")
    with pytest.raises(ImageBuildError):
        w.section_bytes(SectionType.RAMDISK, b"")
    w.finish()
    with pytest.raises(RuntimeError):
        w.finish()


def test_source_errors_leave_no_running_threads() -> None:
    import threading

    class Broken:
        def chunks(self) -> Iterator[bytes]:
            yield b"x" * 1_000_000
            raise ImageBuildError("source failed")

    before = threading.active_count()
    with pytest.raises(ImageBuildError):
        write(EIFContent(BytesSource(b"k"), b"c", META, [BytesSource(b"r"), Broken()]))
    assert threading.active_count() == before


def test_large_ramdisk_streams_in_bounded_chunks() -> None:
    class Counting:
        def __init__(self) -> None:
            self.h = hashlib.sha384()

        def chunks(self) -> Iterator[bytes]:
            block = os.urandom(1 << 16)
            for _ in range(200):  # 12.5 MiB in 64 KiB pieces, gathered into ~1 MiB blocks by the writer
                self.h.update(block)
                yield block

    src = Counting()
    _, m = write(EIFContent(BytesSource(b"k"), b"c", META, [BytesSource(b"r"), src]))
    from enclavekit.formats.pcr import pcr_from_digest

    assert m.pcr2 == pcr_from_digest(src.h.digest())  # type: ignore[attr-defined]
