"""Property tests: cpio round trips, and the reader raises only FormatError subclasses on any mutation."""

from __future__ import annotations

import contextlib
import stat

from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import FormatError
from enclavekit.formats.cpio import BytesContent, CpioArchive, CpioEntry, decode

_names = st.text(alphabet="abcdefgh.-_", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@st.composite
def archives(draw: st.DrawFn) -> CpioArchive:
    files = draw(st.dictionaries(_names, st.binary(max_size=64), max_size=6))
    entries = [CpioEntry(name, stat.S_IFREG | draw(st.sampled_from([0o644, 0o755])), uid=draw(st.integers(0, 70000)),
                         mtime=draw(st.integers(0, 2**32 - 1)), content=BytesContent(data))
               for name, data in files.items()]
    return CpioArchive(entries)


@given(archives())
@settings(max_examples=100, deadline=None)
def test_round_trip(archive: CpioArchive) -> None:
    data = archive.to_bytes()
    assert len(data) == archive.size
    members = decode(data)
    assert [m.name for m in members] == [e.path for e in archive.entries]
    for m, e in zip(members, archive.entries, strict=True):
        assert m.mode == e.mode and m.uid == e.uid and m.mtime == e.mtime
        assert m.data == (e.content.data if isinstance(e.content, BytesContent) else b"")


@given(archives(), st.data())
@settings(max_examples=300, deadline=None)
def test_mutations_raise_only_format_errors(archive: CpioArchive, data: st.DataObject) -> None:
    raw = bytearray(archive.to_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[pos] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        del raw[pos:]
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    with contextlib.suppress(FormatError):
        decode(bytes(raw))
