"""The Enclave Image File (EIF) format: header, section headers, metadata JSON, CRC and strict validation.

Byte layout per spec eif-pcr-cli §1 (aws-nitro-enclaves-image-format ``src/defs/mod.rs``): a 548-byte
:class:`EIFHeader`, then sections, each a 12-byte :class:`EIFSectionHeader` followed by its data, contiguous,
big-endian, no padding.  This module is pure: it turns bytes into frozen dataclasses and back, and decides
whether a walked section table obeys the strict (QEMU, §1.7) rules.  Reading files is
:mod:`enclavekit.image.eif_reader`'s job, writing them :mod:`enclavekit.image.eif_writer`'s.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from enclavekit.errors import EIFFormatError, EIFValidationError

__all__ = [
    "EIF_MAGIC",
    "HEADER_SIZE",
    "CRC_OFFSET",
    "SECTION_HEADER_SIZE",
    "MAX_NUM_SECTIONS",
    "CURRENT_VERSION",
    "LEGACY_VERSIONS",
    "DEFAULT_MEM",
    "DEFAULT_CPUS",
    "ARCH_FLAGS",
    "FLAG_ARCH_ARM64",
    "SIGNATURE_MAX_SIZE",
    "METADATA_MAX_SIZE",
    "CMDLINE_MAX_SIZE",
    "SectionType",
    "EIFHeader",
    "EIFSectionHeader",
    "WalkedSection",
    "BuildMetadata",
    "EIFMetadata",
    "kernel_config_info",
    "crc32_combine",
    "validate_header",
    "validate_structure",
]

EIF_MAGIC = b".eif"
HEADER_SIZE = 548
CRC_OFFSET = 544  # §1.6: the CRC covers header bytes 0..543, then every section header and its data
SECTION_HEADER_SIZE = 12
MAX_NUM_SECTIONS = 32
CURRENT_VERSION = 4
LEGACY_VERSIONS = (2, 3)  # §1.10: 2 and 3 behave like 4 minus metadata (and minus signatures for 2)
DEFAULT_MEM = 1 << 30  # §1.2: hard-coded by EifBuilder, unused by the hypervisor
DEFAULT_CPUS = 2
FLAG_ARCH_ARM64 = 0x1
ARCH_FLAGS = {"x86_64": 0, "aarch64": FLAG_ARCH_ARM64}
# §1.4: README's SIGNATURE_MAX_SIZE.  Caps below also bound what a reader loads into memory.
SIGNATURE_MAX_SIZE = 32768
METADATA_MAX_SIZE = 4 << 20  # DockerInfo can be large; 4 MiB is far above any real `docker inspect`
CMDLINE_MAX_SIZE = 64 << 10  # kernels accept at most a few KiB

_HEADER = struct.Struct(">4sHHQQHH32Q32QII")
_SECTION_HEADER = struct.Struct(">HHQ")
assert _HEADER.size == HEADER_SIZE
assert _SECTION_HEADER.size == SECTION_HEADER_SIZE


class SectionType(IntEnum):
    """§1.4 ``EifSectionType``."""

    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


@dataclass(frozen=True)
class EIFHeader:
    """§1.2: the 548-byte file header.  ``section_offsets`` point at each section's 12-byte header."""

    version: int = CURRENT_VERSION
    flags: int = 0
    default_mem: int = DEFAULT_MEM
    default_cpus: int = DEFAULT_CPUS
    reserved: int = 0
    num_sections: int = 0
    section_offsets: tuple[int, ...] = (0,) * MAX_NUM_SECTIONS
    section_sizes: tuple[int, ...] = (0,) * MAX_NUM_SECTIONS
    unused: int = 0
    eif_crc32: int = 0
    magic: bytes = EIF_MAGIC

    def __post_init__(self) -> None:
        if len(self.section_offsets) != MAX_NUM_SECTIONS or len(self.section_sizes) != MAX_NUM_SECTIONS:
            raise ValueError(f"section_offsets and section_sizes must have {MAX_NUM_SECTIONS} entries")
        if len(self.magic) != 4:
            raise ValueError("magic must be 4 bytes")

    @classmethod
    def from_bytes(cls, data: bytes) -> EIFHeader:
        """Parse exactly 548 bytes.  Refuses a wrong length or a magic other than ``.eif``."""
        if len(data) != HEADER_SIZE:
            raise EIFFormatError(f"EIF header must be {HEADER_SIZE} bytes, got {len(data)}")
        fields = _HEADER.unpack(data)
        magic = fields[0]
        if magic != EIF_MAGIC:
            # image-format's reader does not check the magic (§1.2); QEMU does, and so do we: it is not an EIF.
            raise EIFFormatError(f"not an EIF: magic is {magic!r}, expected {EIF_MAGIC!r}")
        return cls(
            magic=magic,
            version=fields[1],
            flags=fields[2],
            default_mem=fields[3],
            default_cpus=fields[4],
            reserved=fields[5],
            num_sections=fields[6],
            section_offsets=tuple(fields[7:39]),
            section_sizes=tuple(fields[39:71]),
            unused=fields[71],
            eif_crc32=fields[72],
        )

    def to_bytes(self) -> bytes:
        return _HEADER.pack(
            self.magic, self.version, self.flags, self.default_mem, self.default_cpus, self.reserved,
            self.num_sections, *self.section_offsets, *self.section_sizes, self.unused, self.eif_crc32,
        )

    @property
    def arch(self) -> str:
        """``x86_64`` or ``aarch64`` from flag bit 0 (§1.2)."""
        return "aarch64" if self.flags & FLAG_ARCH_ARM64 else "x86_64"


@dataclass(frozen=True)
class EIFSectionHeader:
    """§1.3: the 12-byte header in front of each section's data."""

    section_type: SectionType
    size: int
    flags: int = 0

    @classmethod
    def from_bytes(cls, data: bytes) -> EIFSectionHeader:
        if len(data) != SECTION_HEADER_SIZE:
            raise EIFFormatError(f"EIF section header must be {SECTION_HEADER_SIZE} bytes, got {len(data)}")
        raw_type, flags, size = _SECTION_HEADER.unpack(data)
        # §1.4: types >= 6 do not parse ("Invalid section type"); type 0 is never a valid section.
        if raw_type > max(SectionType):
            raise EIFFormatError(f"unknown EIF section type {raw_type} (known: 0..{int(max(SectionType))})")
        if raw_type == SectionType.INVALID:
            raise EIFFormatError("found an invalid EIF section (type 0)")
        return cls(section_type=SectionType(raw_type), size=size, flags=flags)

    def to_bytes(self) -> bytes:
        return _SECTION_HEADER.pack(int(self.section_type), self.flags, self.size)


@dataclass(frozen=True)
class WalkedSection:
    """A section found by walking the file: its index, where its 12-byte header starts, and that header."""

    index: int
    offset: int
    header: EIFSectionHeader

    @property
    def section_type(self) -> SectionType:
        return self.header.section_type

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def data_offset(self) -> int:
        return self.offset + SECTION_HEADER_SIZE

    @property
    def end(self) -> int:
        return self.data_offset + self.header.size


# --------------------------------------------------------------------------------------------- metadata (§1.8)


def _sorted_json(value: Any) -> Any:
    """serde_json::Value without ``preserve_order``: object keys sorted at every level (§1.8)."""
    if isinstance(value, dict):
        return {k: _sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_json(v) for v in value]
    return value


@dataclass(frozen=True)
class BuildMetadata:
    """§1.8 ``EifBuildInfo``; field order is the JSON key order."""

    build_time: str
    build_tool: str
    build_tool_version: str
    operating_system: str
    kernel_version: str

    def to_json(self) -> dict[str, str]:
        return {
            "BuildTime": self.build_time,
            "BuildTool": self.build_tool,
            "BuildToolVersion": self.build_tool_version,
            "OperatingSystem": self.operating_system,
            "KernelVersion": self.kernel_version,
        }


_BUILD_KEYS = ("BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion")


@dataclass(frozen=True)
class EIFMetadata:
    """§1.8 ``EifIdentityInfo``: the metadata section's JSON.

    ``docker_info`` and ``custom_metadata`` are any JSON values (None = ``null``).  ``to_bytes`` reproduces
    serde_json's bytes: compact, raw UTF-8, struct order at the top level, sorted keys inside the two free-form
    values.
    """

    image_name: str
    image_version: str
    build_metadata: BuildMetadata
    docker_info: Any = None
    custom_metadata: Any = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "ImageName": self.image_name,
            "ImageVersion": self.image_version,
            "BuildMetadata": self.build_metadata.to_json(),
            "DockerInfo": _sorted_json(self.docker_info),
            "CustomMetadata": _sorted_json(self.custom_metadata),
        }

    def to_bytes(self) -> bytes:
        try:
            text = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata is not serializable as JSON: {exc}") from exc
        return text.encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> EIFMetadata:
        """Parse the metadata section.  Unknown top-level keys are ignored (serde's default), like nitro-cli."""
        if len(data) > METADATA_MAX_SIZE:
            raise EIFFormatError(f"EIF metadata is {len(data)} bytes, more than the {METADATA_MAX_SIZE} allowed")
        try:
            obj = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise EIFFormatError(f"EIF metadata is not valid UTF-8 JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise EIFFormatError(f"EIF metadata must be a JSON object, got {type(obj).__name__}")
        name, version, build = obj.get("ImageName"), obj.get("ImageVersion"), obj.get("BuildMetadata")
        if not isinstance(name, str) or not isinstance(version, str):
            raise EIFFormatError("EIF metadata: ImageName and ImageVersion must be strings")
        if not isinstance(build, dict):
            raise EIFFormatError("EIF metadata: BuildMetadata must be an object")
        values = [build.get(k) for k in _BUILD_KEYS]
        strings = [v for v in values if isinstance(v, str)]
        if len(strings) != len(values):
            raise EIFFormatError(f"EIF metadata: BuildMetadata needs string fields {', '.join(_BUILD_KEYS)}")
        return cls(
            image_name=name,
            image_version=version,
            build_metadata=BuildMetadata(*strings),
            docker_info=obj.get("DockerInfo"),
            custom_metadata=obj.get("CustomMetadata"),
        )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def kernel_config_info(config_text: str) -> tuple[str, str]:
    """§1.8 (``identity.rs``): (OperatingSystem, KernelVersion) from a kernel ``.config``.

    Line 3 (index 2) is split on space, ``/`` and ``-`` (empty words kept, as Rust's ``split`` does);
    word 1 is the OS, word 3 the kernel version; anything missing is ``"Unknown"``.
    """
    lines = [line.removesuffix("\r") for line in config_text.split("\n")]
    if len(lines) < 3:
        return "Unknown", "Unknown"
    words = re.split(r"[ /-]", lines[2])
    os_name = words[1] if len(words) > 1 else "Unknown"
    kernel = words[3] if len(words) > 3 else "Unknown"
    return os_name, kernel


# --------------------------------------------------------------------------------------------- CRC (§1.6)

_CRC_POLY = 0xEDB88320  # reflected 0x04C11DB7, CRC-32/ISO-HDLC = zlib.crc32


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (reflected bit order), as zlib's ``multmodp``."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> tuple[int, ...]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return tuple(table)


_X2N = _x2n_table()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's ``crc32_combine``: the CRC-32 of ``A || B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``.

    Lets a streaming writer CRC the sections first and the header (known only at the end) last.
    """
    if len2 < 0:
        raise ValueError("len2 must be non-negative")
    p = 1 << 31  # x^0
    n, k = len2, 3  # x^(8 * len2)
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1 & 0xFFFFFFFF) ^ (crc2 & 0xFFFFFFFF)


# --------------------------------------------------------------------------------------------- strict rules (§1.7)


def validate_header(header: EIFHeader, *, allow_legacy_versions: bool = False) -> None:
    """The strict rules that need only the header (checked before reading any section)."""

    def fail(rule: str, message: str) -> None:
        raise EIFValidationError(message, rule=rule)

    allowed_versions = (CURRENT_VERSION, *LEGACY_VERSIONS) if allow_legacy_versions else (CURRENT_VERSION,)
    if header.version not in allowed_versions:
        fail("version", f"EIF version {header.version} is not accepted (expected one of {allowed_versions})")
    # QEMU: flags == 0 on x86; bit 0 marks aarch64 (§1.2); no other bit is defined.
    if header.flags not in ARCH_FLAGS.values():
        fail("flags", f"EIF header flags are {header.flags:#x}; only 0 (x86_64) or 1 (aarch64) are defined")
    if header.reserved != 0 or header.unused != 0:
        fail("reserved", "EIF header reserved/unused fields must be 0")
    # README: num_sections is 2..32.
    if not 2 <= header.num_sections <= MAX_NUM_SECTIONS:
        fail("num-sections", f"num_sections is {header.num_sections}, expected 2..{MAX_NUM_SECTIONS}")


def validate_structure(
    header: EIFHeader,
    sections: Sequence[WalkedSection],
    *,
    file_size: int,
    computed_crc: int,
    allow_legacy_versions: bool = False,
) -> None:
    """Apply the strict rules (QEMU ``hw/core/eif.c`` plus the builder's invariants) to a walked file.

    ``sections`` are the sections found by walking from offset 548; ``file_size`` is the file's length and
    ``computed_crc`` the CRC-32 of header[0:544] and every walked section.  Raises
    :class:`EIFValidationError` with ``rule`` naming the first rule broken.
    """

    def fail(rule: str, message: str) -> None:
        raise EIFValidationError(message, rule=rule)

    validate_header(header, allow_legacy_versions=allow_legacy_versions)
    if header.num_sections != len(sections):
        fail("num-sections", f"header declares {header.num_sections} sections, the file holds {len(sections)}")
    for i in range(header.num_sections, MAX_NUM_SECTIONS):
        if header.section_offsets[i] or header.section_sizes[i]:
            fail("unused-slots", f"section table slot {i} is beyond num_sections but not zero")

    expected_offset = HEADER_SIZE
    counts: dict[SectionType, int] = dict.fromkeys(SectionType, 0)
    for s in sections:
        if s.header.flags != 0:
            fail("section-flags", f"section {s.index} has flags {s.header.flags:#x}, expected 0")
        if s.offset != expected_offset or header.section_offsets[s.index] != s.offset:
            fail("section-offset", f"section {s.index} starts at {s.offset}, header says "
                 f"{header.section_offsets[s.index]}, contiguous layout needs {expected_offset}")
        if header.section_sizes[s.index] != s.size:
            fail("section-size", f"section {s.index} holds {s.size} bytes, header says "
                 f"{header.section_sizes[s.index]}")
        expected_offset = s.end
        counts[s.section_type] += 1
        if s.section_type == SectionType.RAMDISK and counts[SectionType.KERNEL] == 0:
            fail("section-order", f"ramdisk section {s.index} comes before the kernel")
        if s.section_type == SectionType.CMDLINE and counts[SectionType.KERNEL] == 0:
            fail("section-order", f"cmdline section {s.index} comes before the kernel")
        if s.section_type == SectionType.SIGNATURE and s.size > SIGNATURE_MAX_SIZE:
            fail("signature-size", f"signature section is {s.size} bytes, more than {SIGNATURE_MAX_SIZE}")
        if s.section_type == SectionType.METADATA and s.size > METADATA_MAX_SIZE:
            fail("metadata-size", f"metadata section is {s.size} bytes, more than {METADATA_MAX_SIZE}")
        if s.section_type == SectionType.CMDLINE and s.size > CMDLINE_MAX_SIZE:
            fail("cmdline-size", f"cmdline section is {s.size} bytes, more than {CMDLINE_MAX_SIZE}")
    for kind in (SectionType.KERNEL, SectionType.CMDLINE, SectionType.SIGNATURE, SectionType.METADATA):
        if counts[kind] > 1:
            fail("duplicate-section", f"{counts[kind]} {kind.name.lower()} sections, at most one is allowed")
    for kind in (SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK):
        if counts[kind] == 0:
            fail("missing-section", f"no {kind.name.lower()} section")
    if header.version >= 4 and counts[SectionType.METADATA] == 0:
        fail("missing-metadata", "EIF version 4 requires a metadata section")
    if header.version < 4 and counts[SectionType.METADATA]:
        fail("version", f"EIF version {header.version} cannot hold a metadata section (added in version 4)")
    if header.version < 3 and counts[SectionType.SIGNATURE]:
        fail("version", f"EIF version {header.version} cannot hold a signature section (added in version 3)")
    if file_size != expected_offset:
        fail("trailing-bytes", f"{file_size - expected_offset} bytes after the last section")
    if computed_crc != header.eif_crc32:
        fail("crc", f"CRC mismatch: header has {header.eif_crc32:#010x}, content gives {computed_crc:#010x}")
