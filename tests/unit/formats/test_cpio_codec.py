"""newc cpio writer and reader: exact bytes, determinism, streaming sizes, strict decoding (one test per rule)."""

from __future__ import annotations

import io
import stat

import pytest

from enclavekit.formats.cpio import (
    BytesContent,
    CpioArchive,
    CpioEntry,
    CpioFormatError,
    decode,
    encode_header,
    iter_members,
    normalised_mode,
)


def _archive() -> CpioArchive:
    return CpioArchive([
        CpioEntry("rootfs/bin/app", stat.S_IFREG | 0o755, content=BytesContent(b"#!/bin/sh\necho hi\n")),
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("rootfs", stat.S_IFDIR | 0o755),
        CpioEntry("rootfs/bin", stat.S_IFDIR | 0o755),
        CpioEntry("rootfs/sh", stat.S_IFLNK | 0o777, link_target="bin/app"),
        CpioEntry("rootfs/dev/null", stat.S_IFCHR | 0o666, rdev_major=1, rdev_minor=3),
        CpioEntry("cmd", stat.S_IFREG | 0o644, mtime=1700000000, content=BytesContent(b"/bin/app\n")),
    ])


def test_exact_newc_bytes_for_one_entry() -> None:
    # 110-byte header: magic, then ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    # rdevminor, namesize, check as 8 upper-case hex digits; name + NUL padded so header+name is a multiple of 4.
    data = CpioArchive([CpioEntry("init", stat.S_IFREG | 0o755, uid=0, gid=0, mtime=0,
                                  content=BytesContent(b"hello"))]).to_bytes()
    expected_head = (b"070701" + b"00000001" + b"000081ED" + b"00000000" + b"00000000" + b"00000001"
                     + b"00000000" + b"00000005" + b"00000000" * 4 + b"00000005" + b"00000000")
    assert data[:110] == expected_head
    assert data[110:116] == b"init\0\0"       # 110 + 5 = 115 -> padded to 116
    assert data[116:124] == b"hello\0\0\0"    # data padded to a multiple of 4
    trailer = encode_header(ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, filesize=0, rdev_major=0,
                            rdev_minor=0, name="TRAILER!!!")
    assert data[124:] == trailer
    assert len(trailer) == 124 and trailer.endswith(b"TRAILER!!!\0\0\0\0")


def test_round_trip_and_sorted_entries() -> None:
    archive = _archive()
    members = decode(archive.to_bytes())
    assert [m.name for m in members] == sorted(m.name for m in members)
    by_name = {m.name: m for m in members}
    assert by_name["rootfs/bin/app"].data == b"#!/bin/sh\necho hi\n"
    assert by_name["rootfs/bin/app"].permissions == 0o755
    assert by_name["rootfs/sh"].data == b"bin/app"
    assert by_name["rootfs/sh"].file_type == stat.S_IFLNK
    assert (by_name["rootfs/dev/null"].rdev_major, by_name["rootfs/dev/null"].rdev_minor) == (1, 3)
    assert by_name["dev"].nlink == 2 and by_name["cmd"].nlink == 1
    assert by_name["cmd"].mtime == 1700000000
    assert [m.ino for m in members] == list(range(1, len(members) + 1))


def test_deterministic_whatever_the_input_order() -> None:
    a = _archive()
    b = CpioArchive(reversed(a.entries))
    assert a.to_bytes() == b.to_bytes()


def test_size_is_known_in_advance() -> None:
    archive = _archive()
    assert archive.size == len(archive.to_bytes())
    assert CpioArchive([]).size == len(CpioArchive([]).to_bytes())


def test_streaming_yields_content_chunks_unchanged() -> None:
    class Chunked:
        size = 3 << 20

        def chunks(self):  # type: ignore[no-untyped-def]
            for _ in range(3):
                yield b"x" * (1 << 20)

    chunks = list(CpioArchive([CpioEntry("big", stat.S_IFREG | 0o644, content=Chunked())]).chunks())
    assert sum(1 for c in chunks if len(c) == 1 << 20) == 3


def test_content_that_lies_about_its_size_is_refused() -> None:
    class Liar:
        size = 10

        def chunks(self):  # type: ignore[no-untyped-def]
            yield b"short"

    with pytest.raises(ValueError, match="declared 10"):
        CpioArchive([CpioEntry("f", stat.S_IFREG | 0o644, content=Liar())]).to_bytes()


def test_duplicate_paths_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        CpioArchive([CpioEntry("a", stat.S_IFDIR | 0o755), CpioEntry("a", stat.S_IFDIR | 0o755)])


@pytest.mark.parametrize("path", ["", "/abs", "dir/", "a\0b", "TRAILER!!!"])
def test_bad_entry_paths_are_caller_bugs(path: str) -> None:
    with pytest.raises(ValueError):
        CpioEntry(path, stat.S_IFDIR | 0o755)


def test_normalised_modes() -> None:
    assert normalised_mode(stat.S_IFDIR, 0o700) == stat.S_IFDIR | 0o755
    assert normalised_mode(stat.S_IFREG, 0o600) == stat.S_IFREG | 0o644
    assert normalised_mode(stat.S_IFREG, 0o700) == stat.S_IFREG | 0o755
    assert normalised_mode(stat.S_IFREG, 0o4711) == stat.S_IFREG | 0o755
    assert normalised_mode(stat.S_IFLNK, 0o755) == stat.S_IFLNK | 0o777
    assert normalised_mode(stat.S_IFCHR, 0o666) == stat.S_IFCHR | 0o666


def test_iter_members_streams_and_skips_unread_data() -> None:
    data = _archive().to_bytes()
    names = [m.name for m, _chunks in iter_members(io.BytesIO(data), len(data))]
    assert "rootfs/bin/app" in names


class _Counting(io.BytesIO):
    """Counts the bytes read; ``seekable`` can be turned off (a pipe)."""

    def __init__(self, data: bytes, *, seekable: bool) -> None:
        super().__init__(data)
        self.read_total = 0
        self._seekable = seekable

    def seekable(self) -> bool:
        return self._seekable

    def read(self, n: int | None = -1) -> bytes:
        chunk = super().read(n)
        self.read_total += len(chunk)
        return chunk


def test_unread_data_is_skipped_with_a_seek_when_the_stream_can() -> None:
    big = b"x" * (3 << 20)
    data = CpioArchive([CpioEntry("big", stat.S_IFREG | 0o644, content=BytesContent(big)),
                        CpioEntry("small", stat.S_IFREG | 0o644, content=BytesContent(b"hello"))]).to_bytes()
    seekable = _Counting(data, seekable=True)
    members = [(m.name, m.data_offset, b"".join(chunks) if m.name == "small" else None)
               for m, chunks in iter_members(seekable, len(data))]
    assert [(name, content) for name, _, content in members] == [("big", None), ("small", b"hello")]
    assert seekable.read_total < 4096  # headers, names and the small file only
    assert data[members[1][1]:members[1][1] + 5] == b"hello"  # data_offset points at the data
    piped = _Counting(data, seekable=False)
    assert [m.name for m, _ in iter_members(piped, len(data))] == ["big", "small"]
    assert piped.read_total >= len(big)  # without seeking, skipping means reading


def test_a_skipped_member_past_the_end_is_truncation() -> None:
    data = CpioArchive([CpioEntry("big", stat.S_IFREG | 0o644, content=BytesContent(b"y" * 100000))]).to_bytes()
    cut = data[:50000]
    with pytest.raises(CpioFormatError, match=r"past the end|truncated"):
        for _member, _chunks in iter_members(io.BytesIO(cut), len(cut)):
            pass


def test_trailing_zero_padding_is_accepted() -> None:
    data = _archive().to_bytes() + b"\0" * 512
    assert len(decode(data)) == 7


# ---- one negative test per rule -------------------------------------------------------------------------------

VALID = _archive().to_bytes()


def test_bad_magic() -> None:
    with pytest.raises(CpioFormatError, match="magic"):
        decode(b"070707" + VALID[6:])


def test_non_hex_field() -> None:
    with pytest.raises(CpioFormatError, match="non-hexadecimal"):
        decode(VALID[:6] + b"0000000G" + VALID[14:])


def test_truncated_header() -> None:
    with pytest.raises(CpioFormatError, match="truncated"):
        decode(VALID[:50])


def test_missing_trailer() -> None:
    first_entry_end = VALID.index(b"070701", 1)
    with pytest.raises(CpioFormatError, match="truncated"):
        decode(VALID[:first_entry_end])


def test_name_past_end() -> None:
    head = encode_header(ino=1, mode=stat.S_IFDIR | 0o755, uid=0, gid=0, nlink=2, mtime=0, filesize=0,
                         rdev_major=0, rdev_minor=0, name="d")
    bad = head[:94] + b"00000FFF" + head[102:110] + b"d\0"
    with pytest.raises(CpioFormatError, match="name"):
        decode(bad)


def test_name_size_zero_and_huge() -> None:
    for value in (b"00000000", b"FFFFFFFF"):
        with pytest.raises(CpioFormatError, match="name of"):
            decode(VALID[:94] + value + VALID[102:])


def test_name_not_nul_terminated() -> None:
    # "dev" entry: namesize 4 -> replace the NUL with 'x'
    idx = VALID.index(b"dev\0")
    with pytest.raises(CpioFormatError, match="NUL"):
        decode(VALID[:idx + 3] + b"x" + VALID[idx + 4:])


def test_huge_declared_size_is_refused_without_allocation() -> None:
    head = encode_header(ino=1, mode=stat.S_IFREG | 0o644, uid=0, gid=0, nlink=1, mtime=0, filesize=0xFFFFFFF0,
                         rdev_major=0, rdev_minor=0, name="f")
    with pytest.raises(CpioFormatError, match="past the end"):
        decode(head + b"\0" * 64)


def test_data_after_trailer() -> None:
    with pytest.raises(CpioFormatError, match="after the TRAILER"):
        decode(VALID + b"junk")


def test_unknown_file_type() -> None:
    head = encode_header(ino=1, mode=0o140644, uid=0, gid=0, nlink=1, mtime=0, filesize=0,
                         rdev_major=0, rdev_minor=0, name="sock")
    with pytest.raises(CpioFormatError, match="file type"):
        decode(head + CpioArchive([]).to_bytes())


def test_non_zero_padding() -> None:
    data = CpioArchive([CpioEntry("f", stat.S_IFREG | 0o644, content=BytesContent(b"x"))]).to_bytes()
    idx = data.index(b"x\0\0\0")
    with pytest.raises(CpioFormatError, match="padding"):
        decode(data[:idx + 1] + b"yy\0" + data[idx + 4:])


def test_member_above_in_memory_limit() -> None:
    data = CpioArchive([CpioEntry("f", stat.S_IFREG | 0o644, content=BytesContent(b"x" * 100))]).to_bytes()
    with pytest.raises(CpioFormatError, match="limit"):
        decode(data, max_member_size=10)


def test_non_utf8_names_round_trip() -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    data = CpioArchive([CpioEntry(name, stat.S_IFREG | 0o644, content=BytesContent(b"x"))]).to_bytes()
    assert b"caf\xe9\0" in data
    assert decode(data)[0].name == name
