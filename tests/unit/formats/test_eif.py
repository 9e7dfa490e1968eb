"""EIF codec, CRC, metadata bytes, the tiny vector of spec §6 item 16, strict rules (one negative test each) and
the lenient (nitro-cli) reader."""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import replace

import pytest

from enclavekit.errors import EIFFormatError, EIFValidationError, FormatError
from enclavekit.formats.eif import (
    CMDLINE_MAX_SIZE,
    HEADER_SIZE,
    MAX_NUM_SECTIONS,
    METADATA_MAX_SIZE,
    SIGNATURE_MAX_SIZE,
    BuildMetadata,
    EIFHeader,
    EIFMetadata,
    EIFSectionHeader,
    SectionType,
    WalkedSection,
    crc32_combine,
    kernel_config_info,
    validate_structure,
)
from enclavekit.formats.pcr import EMPTY_PCR
from enclavekit.image.eif_reader import measure_eif
from enclavekit.image.eif_writer import BytesSource, EIFContent, EIFStreamWriter, write_eif

TINY_METADATA = EIFMetadata(
    "test", "1.0", BuildMetadata("2024-01-01T00:00:00+00:00", "eif_build", "0.3.1", "OS", "kernel")
)
TINY_METADATA_JSON = (
    b'{"ImageName":"test","ImageVersion":"1.0","BuildMetadata":{"BuildTime":"2024-01-01T00:00:00+00:00",'
    b'"BuildTool":"eif_build","BuildToolVersion":"0.3.1","OperatingSystem":"OS","KernelVersion":"kernel"},'
    b'"DockerInfo":null,"CustomMetadata":null}'
)
# spec §6 item 16
TINY_LEN = 889
TINY_CRC = 0x19346F70
TINY_PCR0 = "56c3b42b79cb7dc9775b587a8dc520ac3854ada07f89b21ff608b94f68a918f31c085cc6d26df9224918c037fba03733"
TINY_PCR1 = "a85c761fc79b20dc65c344a9b3e98033982da0f0aea81862e824b1f37386f739456cdc4dbc050449b98f960d3d38e2b9"
TINY_PCR2 = "a919d0a5b993e68465b0c305340c039a0249cdf42f97e263cf09aec414a58bb6c2865f8c91778dc28a58fd328f9abab4"


def tiny_eif() -> bytes:
    out = io.BytesIO()
    write_eif(out, EIFContent(BytesSource(b"KERNEL-BYTES"), b"console=ttyS0", TINY_METADATA,
                              [BytesSource(b"RAMDISK-0"), BytesSource(b"RAMDISK-1")]))
    return out.getvalue()


def build(sections: list[tuple[SectionType, bytes]], **header: int) -> bytes:
    """An EIF with exactly these sections, header and CRC consistent."""
    out = io.BytesIO()
    w = EIFStreamWriter(out)
    for kind, data in sections:
        w.section_bytes(kind, data)
    w.finish(**header)
    return out.getvalue()


def refresh_crc(data: bytes) -> bytes:
    crc = zlib.crc32(data[:544] + data[548:])
    return data[:544] + struct.pack(">I", crc) + data[548:]


def with_header(data: bytes, **changes: object) -> bytes:
    header = replace(EIFHeader.from_bytes(data[:HEADER_SIZE]), **changes)  # type: ignore[arg-type]
    return refresh_crc(header.to_bytes() + data[HEADER_SIZE:])


def read(data: bytes, **kw: bool) -> object:
    return measure_eif(io.BytesIO(data), **kw)


K, C, M, R, S = (SectionType.KERNEL, SectionType.CMDLINE, SectionType.METADATA, SectionType.RAMDISK,
                 SectionType.SIGNATURE)
BASIC = [(K, b"kernel"), (C, b"cmd"), (M, TINY_METADATA_JSON), (R, b"rd0")]


# ------------------------------------------------------------------------------------------- the tiny vector


def test_tiny_eif_vector() -> None:
    data = tiny_eif()
    assert len(data) == TINY_LEN
    assert struct.unpack(">I", data[544:548])[0] == TINY_CRC
    assert zlib.crc32(data[:544] + data[548:]) == TINY_CRC
    info = measure_eif(io.BytesIO(data), strict=True)
    assert (info.measurements.pcr0.hex(), info.measurements.pcr1.hex(), info.measurements.pcr2.hex()) == (
        TINY_PCR0, TINY_PCR1, TINY_PCR2)
    assert info.crc_ok and not info.is_signed and info.measurements.pcr8 is None
    assert info.metadata == TINY_METADATA and info.metadata_bytes == TINY_METADATA_JSON
    assert info.cmdline == b"console=ttyS0"
    # §1.2 example: first 32 bytes
    assert data[:32].hex() == "2e65696600040000000000004000000000000000000000020000000500000000"[:64]


def test_tiny_eif_layout_follows_the_builder() -> None:
    info = measure_eif(io.BytesIO(tiny_eif()))
    assert [s.section_type for s in info.sections] == [K, C, M, R, R]
    h = info.header
    assert h.num_sections == 5 and h.section_offsets[0] == HEADER_SIZE
    for s in info.sections:
        assert h.section_offsets[s.index] == s.offset and h.section_sizes[s.index] == s.size
    assert h.section_offsets[5:] == (0,) * 27 and (h.default_mem, h.default_cpus) == (1 << 30, 2)


def test_single_ramdisk_pcr2_is_the_empty_pcr() -> None:
    info = read(build(BASIC))
    assert info.measurements.pcr2 == EMPTY_PCR  # type: ignore[attr-defined]
    assert info.measurements.pcr0 == info.measurements.pcr1  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------- header codecs


def test_header_round_trip() -> None:
    h = EIFHeader(version=4, flags=1, default_mem=5, default_cpus=7, reserved=0, num_sections=3,
                  section_offsets=tuple(range(32)), section_sizes=tuple(range(100, 132)), unused=9,
                  eif_crc32=0xDEADBEEF)
    raw = h.to_bytes()
    assert len(raw) == 548
    assert EIFHeader.from_bytes(raw) == h
    assert h.arch == "aarch64" and EIFHeader().arch == "x86_64"


def test_header_wrong_length() -> None:
    with pytest.raises(EIFFormatError, match="548"):
        EIFHeader.from_bytes(bytes(547))


def test_header_wrong_magic() -> None:
    raw = b"MZ\x00\x00" + EIFHeader().to_bytes()[4:]
    with pytest.raises(EIFFormatError, match="magic"):
        EIFHeader.from_bytes(raw)


def test_section_header_round_trip() -> None:
    sh = EIFSectionHeader(SectionType.RAMDISK, 2**40 + 3, 0)
    assert sh.to_bytes() == bytes.fromhex("0003 0000 0000010000000003")
    assert EIFSectionHeader.from_bytes(sh.to_bytes()) == sh


def test_section_type_6_is_invalid() -> None:
    with pytest.raises(EIFFormatError, match="unknown EIF section type 6"):
        EIFSectionHeader.from_bytes(bytes.fromhex("0006 0000 0000000000000000"))


def test_section_type_0_is_invalid() -> None:
    with pytest.raises(EIFFormatError, match="invalid"):
        EIFSectionHeader.from_bytes(bytes(12))


def test_section_header_wrong_length() -> None:
    with pytest.raises(EIFFormatError):
        EIFSectionHeader.from_bytes(bytes(11))


# ------------------------------------------------------------------------------------------- metadata (§1.8)


def test_metadata_bytes_exact() -> None:
    assert TINY_METADATA.to_bytes() == TINY_METADATA_JSON
    assert EIFMetadata.from_bytes(TINY_METADATA_JSON) == TINY_METADATA


def test_metadata_sorts_free_form_keys_at_every_level_and_keeps_utf8() -> None:
    md = replace(TINY_METADATA, docker_info={"b": 1, "a": {"z": [{"y": 1, "x": 2}], "c": "/é"}},
                 custom_metadata={"z": None, "Z": True, "ä": 1.5})
    text = md.to_bytes().decode("utf-8")
    assert '"DockerInfo":{"a":{"c":"/é","z":[{"x":2,"y":1}]},"b":1}' in text
    assert '"CustomMetadata":{"Z":true,"z":null,"ä":1.5}' in text
    # top level and BuildMetadata keep struct order
    assert list(json.loads(text)) == ["ImageName", "ImageVersion", "BuildMetadata", "DockerInfo", "CustomMetadata"]
    assert EIFMetadata.from_bytes(md.to_bytes()).custom_metadata == md.custom_metadata


@pytest.mark.parametrize("raw", [
    b"\xff", b"[]", b"{", b'{"ImageName":1}', b'{"ImageName":"a","ImageVersion":"b","BuildMetadata":[]}',
    b'{"ImageName":"a","ImageVersion":"b","BuildMetadata":{"BuildTime":"x"}}', b"NaN",
])
def test_metadata_malformed(raw: bytes) -> None:
    with pytest.raises(EIFFormatError):
        EIFMetadata.from_bytes(raw)


def test_metadata_too_large_is_refused_before_parsing() -> None:
    with pytest.raises(EIFFormatError, match="more than"):
        EIFMetadata.from_bytes(b" " * (METADATA_MAX_SIZE + 1))


def test_metadata_missing_free_form_fields_are_null() -> None:
    raw = json.loads(TINY_METADATA_JSON)
    del raw["DockerInfo"], raw["CustomMetadata"]
    assert EIFMetadata.from_bytes(json.dumps(raw).encode()) == TINY_METADATA


@pytest.mark.parametrize(("config", "expected"), [
    ("#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 4.14.256-209.484.amzn2.x86_64 Kernel "
     "Configuration\n", ("Linux", "4.14.256")),
    ("#\n#\n# Linux/arm64 6.1.0 Kernel Configuration\r\n", ("Linux", "6.1.0")),
    ("a\nb\n", ("Unknown", "Unknown")),
    ("a\nb\nonly", ("Unknown", "Unknown")),
    ("a\nb\n#  Linux", ("", "Unknown")),  # empty words are kept, as Rust's split does
])
def test_kernel_config_info(config: str, expected: tuple[str, str]) -> None:
    assert kernel_config_info(config) == expected


# ------------------------------------------------------------------------------------------- CRC (§1.6)


@pytest.mark.parametrize(("a", "b"), [(b"", b""), (b"123", b"456789"), (b"x" * 1000, b""), (b"", b"y" * 77),
                                      (bytes(range(256)) * 3, b"\xff" * 4097)])
def test_crc32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_crc32_combine_rejects_negative_length() -> None:
    with pytest.raises(ValueError):
        crc32_combine(0, 0, -1)


# ------------------------------------------------------------------------------------------- strict rules


def rule_of(data: bytes, **kw: bool) -> str:
    with pytest.raises(EIFValidationError) as exc:
        measure_eif(io.BytesIO(data), strict=True, **kw)
    assert exc.value.code == "E61"
    return exc.value.rule


def test_strict_accepts_builder_output() -> None:
    measure_eif(io.BytesIO(build(BASIC)), strict=True)
    measure_eif(io.BytesIO(build(BASIC, flags=1)), strict=True)


def test_rule_version_unknown() -> None:
    assert rule_of(with_header(build(BASIC), version=5)) == "version"


def test_rule_version_legacy_needs_opt_in() -> None:
    v3 = build([(K, b"k"), (C, b"c"), (R, b"r")], version=3)
    assert rule_of(v3) == "version"
    measure_eif(io.BytesIO(v3), strict=True, allow_legacy_versions=True)


def test_rule_version_metadata_in_v3() -> None:
    assert rule_of(build(BASIC, version=3), allow_legacy_versions=True) == "version"


def test_rule_version_signature_in_v2() -> None:
    v2 = build([(K, b"k"), (C, b"c"), (R, b"r"), (S, b"\x80")], version=2)
    assert rule_of(v2, allow_legacy_versions=True) == "version"


def test_rule_flags() -> None:
    assert rule_of(with_header(build(BASIC), flags=2)) == "flags"


def test_rule_reserved() -> None:
    assert rule_of(with_header(build(BASIC), reserved=1)) == "reserved"


def test_rule_num_sections_range() -> None:
    assert rule_of(with_header(build(BASIC), num_sections=1)) == "num-sections"


def test_rule_num_sections_matches_file() -> None:
    data = build(BASIC)
    h = EIFHeader.from_bytes(data[:HEADER_SIZE])
    assert rule_of(with_header(data, num_sections=3, section_offsets=h.section_offsets[:3] + (0,) * 29,
                               section_sizes=h.section_sizes[:3] + (0,) * 29)) == "num-sections"


def test_rule_unused_slots() -> None:
    data = build(BASIC)
    h = EIFHeader.from_bytes(data[:HEADER_SIZE])
    assert rule_of(with_header(data, section_sizes=h.section_sizes[:10] + (5,) + (0,) * 21)) == "unused-slots"


def test_rule_section_flags() -> None:
    data = bytearray(build(BASIC))
    data[HEADER_SIZE + 3] = 1
    assert rule_of(refresh_crc(bytes(data))) == "section-flags"


def test_rule_section_offset() -> None:
    data = build(BASIC)
    h = EIFHeader.from_bytes(data[:HEADER_SIZE])
    offsets = list(h.section_offsets)
    offsets[1] += 1
    assert rule_of(with_header(data, section_offsets=tuple(offsets))) == "section-offset"


def test_rule_section_size() -> None:
    data = build(BASIC)
    h = EIFHeader.from_bytes(data[:HEADER_SIZE])
    sizes = list(h.section_sizes)
    sizes[0] += 1
    assert rule_of(with_header(data, section_sizes=tuple(sizes))) == "section-size"


def test_rule_section_order_ramdisk_before_kernel() -> None:
    assert rule_of(build([(R, b"r"), (K, b"k"), (C, b"c"), (M, TINY_METADATA_JSON)])) == "section-order"


def test_rule_section_order_cmdline_before_kernel() -> None:
    assert rule_of(build([(C, b"c"), (K, b"k"), (M, TINY_METADATA_JSON), (R, b"r")])) == "section-order"


def test_rule_cmdline_size() -> None:
    assert rule_of(build([(K, b"k"), (C, b"c" * (CMDLINE_MAX_SIZE + 1)), (M, TINY_METADATA_JSON),
                          (R, b"r")])) == "cmdline-size"


def _walked(sections: list[tuple[SectionType, int]]) -> tuple[EIFHeader, list[WalkedSection]]:
    walked, offset = [], HEADER_SIZE
    for i, (kind, size) in enumerate(sections):
        walked.append(WalkedSection(i, offset, EIFSectionHeader(kind, size)))
        offset += 12 + size
    n = len(walked)
    header = EIFHeader(num_sections=n, section_offsets=tuple(s.offset for s in walked) + (0,) * (32 - n),
                       section_sizes=tuple(s.size for s in walked) + (0,) * (32 - n))
    return header, walked


@pytest.mark.parametrize(("kind", "cap", "rule"), [(S, SIGNATURE_MAX_SIZE, "signature-size"),
                                                   (M, METADATA_MAX_SIZE, "metadata-size")])
def test_rule_capped_sizes(kind: SectionType, cap: int, rule: str) -> None:
    # the reader refuses these before reading them; the pure validator names the rule for other callers
    header, walked = _walked([(K, 1), (C, 1), (R, 1), (kind, cap + 1)])
    with pytest.raises(EIFValidationError) as exc:
        validate_structure(header, walked, file_size=walked[-1].end, computed_crc=0)
    assert exc.value.rule == rule


def test_rule_duplicate_section() -> None:
    assert rule_of(build([(K, b"k"), (K, b"k"), (C, b"c"), (M, TINY_METADATA_JSON), (R, b"r")])) == \
        "duplicate-section"


def test_rule_missing_section() -> None:
    assert rule_of(build([(K, b"k"), (C, b"c"), (M, TINY_METADATA_JSON)])) == "missing-section"


def test_rule_missing_metadata() -> None:
    assert rule_of(build([(K, b"k"), (C, b"c"), (R, b"r")])) == "missing-metadata"


def test_rule_trailing_bytes() -> None:
    assert rule_of(build(BASIC) + b"\0" * 5) == "trailing-bytes"


def test_rule_crc() -> None:
    data = bytearray(build(BASIC))
    data[-1] ^= 1
    assert rule_of(bytes(data)) == "crc"


# ------------------------------------------------------------------------------------------- format errors


@pytest.mark.parametrize("strict", [False, True])
def test_truncated_header(strict: bool) -> None:
    with pytest.raises(EIFFormatError, match="truncated"):
        read(tiny_eif()[:100], strict=strict)


@pytest.mark.parametrize("strict", [False, True])
def test_section_larger_than_file(strict: bool) -> None:
    data = bytearray(tiny_eif())
    data[HEADER_SIZE + 4:HEADER_SIZE + 12] = struct.pack(">Q", 2**63)
    with pytest.raises(EIFFormatError, match=r"only .* remain"):
        read(bytes(data), strict=strict)


def test_section_truncated_in_a_stream_without_seek() -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buf: bytearray) -> int:  # type: ignore[override]
            return self._inner.readinto(buf)

    data = tiny_eif()[:-3]
    with pytest.raises(EIFFormatError, match="truncated"):
        measure_eif(io.BufferedReader(Pipe(data)))


def test_too_many_sections() -> None:
    data = build(BASIC)[:HEADER_SIZE] + EIFSectionHeader(R, 0).to_bytes() * (MAX_NUM_SECTIONS + 1)
    with pytest.raises(EIFFormatError, match="more than 32"):
        read(data)


def test_unknown_section_type_in_file() -> None:
    data = build(BASIC) + bytes.fromhex("0009 0000 0000000000000000")
    with pytest.raises(EIFFormatError, match="unknown EIF section type 9"):
        read(data)


def test_oversized_signature_section_is_refused_before_reading() -> None:
    data = build(BASIC) + EIFSectionHeader(S, SIGNATURE_MAX_SIZE + 1).to_bytes() + bytes(SIGNATURE_MAX_SIZE + 1)
    with pytest.raises(EIFFormatError, match="more than"):
        read(data)


def test_malformed_signature_section() -> None:
    with pytest.raises(FormatError):
        read(build([*BASIC, (S, b"\xa0")]))


def test_lenient_refuses_unknown_version() -> None:
    with pytest.raises(EIFFormatError, match="version 9"):
        read(with_header(build(BASIC), version=9))


# ------------------------------------------------------------------------------------------- lenient reader (§1.7)


def test_lenient_reports_crc_mismatch_without_refusing() -> None:
    data = bytearray(tiny_eif())
    data[-1] ^= 0xFF
    info = read(bytes(data))
    assert info.crc_ok is False  # type: ignore[attr-defined]


def test_lenient_ignores_a_short_tail() -> None:
    info = read(tiny_eif() + b"\0" * 11)
    assert info.crc_ok and info.file_size == TINY_LEN + 11  # type: ignore[attr-defined]
    assert info.measurements.pcr0.hex() == TINY_PCR0  # type: ignore[attr-defined]


def test_lenient_parses_a_long_tail_as_a_section() -> None:
    with pytest.raises(EIFFormatError):
        read(tiny_eif() + b"\0" * 12)  # section type 0


def test_lenient_ignores_the_section_table() -> None:
    data = with_header(tiny_eif(), section_offsets=(7,) * 32, section_sizes=(9,) * 32, num_sections=1)
    info = read(data)
    assert info.crc_ok and info.measurements.pcr0.hex() == TINY_PCR0  # type: ignore[attr-defined]


def test_lenient_accepts_legacy_versions_and_hashes_in_encounter_order() -> None:
    v3 = build([(K, b"k"), (R, b"r0"), (C, b"c"), (R, b"r1")], version=3)
    info = read(v3)
    # PCR1 = k || r0 || c (encounter order, not a prefix of PCR0's k || r0 || c || r1? it is; PCR2 = r1)
    from enclavekit.formats.pcr import pcr_of_content

    assert info.measurements.pcr0 == pcr_of_content(b"kr0cr1")  # type: ignore[attr-defined]
    assert info.measurements.pcr1 == pcr_of_content(b"kr0c")  # type: ignore[attr-defined]
    assert info.measurements.pcr2 == pcr_of_content(b"r1")  # type: ignore[attr-defined]


def test_lenient_boot_data_after_user_data() -> None:
    from enclavekit.formats.pcr import pcr_of_content

    info = read(build([(K, b"k"), (R, b"r0"), (R, b"r1"), (C, b"c")]))
    assert info.measurements.pcr0 == pcr_of_content(b"kr0r1c")  # type: ignore[attr-defined]
    assert info.measurements.pcr1 == pcr_of_content(b"kr0c")  # type: ignore[attr-defined]
    assert info.measurements.pcr2 == pcr_of_content(b"r1")  # type: ignore[attr-defined]
