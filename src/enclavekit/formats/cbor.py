"""A strict, byte-exact CBOR (RFC 8949) codec for the subset the Nitro formats use.

General-purpose CBOR libraries are liberal where enclavekit must be strict (duplicate map keys, trailing
bytes, absurd declared lengths) and cannot emit some encodings the formats fix byte for byte (an
indefinite-length payload map, arrays of small integers for `Vec<u8>`).  This module does both:

* ``decode(data)`` parses exactly one item and refuses trailing bytes, duplicate map keys, reserved
  additional-information values, lengths past the end of the input and nesting deeper than ``max_depth``.
  Every failure raises :class:`enclavekit.errors.CBORError`, never another exception.
* ``encode(value)`` writes shortest-form heads and definite lengths; dicts keep insertion order (serde's struct
  field order, not canonical sorting).  :class:`IndefiniteMap` and :class:`IndefiniteArray` select the
  indefinite-length form.

Pure: no I/O, clock or randomness.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from enclavekit.errors import CBORError

__all__ = [
    "Tag",
    "IndefiniteMap",
    "IndefiniteArray",
    "Decoded",
    "decode",
    "decode_prefix",
    "encode",
    "encode_head",
    "encode_uint_array",
    "decode_uint_array",
]

DEFAULT_MAX_DEPTH = 32


@dataclass(frozen=True)
class Tag:
    """A tagged item (major type 6)."""

    tag: int
    value: Any


class IndefiniteMap(dict):  # type: ignore[type-arg]
    """A dict that :func:`encode` writes with an indefinite-length head (``bf … ff``)."""


class IndefiniteArray(list):  # type: ignore[type-arg]
    """A list that :func:`encode` writes with an indefinite-length head (``9f … ff``)."""


@dataclass
class Decoded:
    """Result of :func:`decode_prefix`: the value, where it ended, and which items were indefinite."""

    value: Any
    end: int
    indefinite_maps: list[int] = field(default_factory=list)  # offsets of maps encoded `bf … ff`
    # offsets of every indefinite-length item: maps, arrays (`9f … ff`) and chunked strings (`5f`/`7f … ff`)
    indefinite_items: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- encoding


def encode_head(major: int, argument: int) -> bytes:
    """Shortest-form head for ``major`` (0..7) carrying ``argument``."""
    if argument < 0:
        raise ValueError("CBOR head argument must be non-negative")
    m = major << 5
    if argument < 24:
        return bytes([m | argument])
    if argument < 0x100:
        return bytes([m | 24, argument])
    if argument < 0x10000:
        return bytes([m | 25]) + struct.pack(">H", argument)
    if argument < 0x100000000:
        return bytes([m | 26]) + struct.pack(">I", argument)
    if argument < 0x10000000000000000:
        return bytes([m | 27]) + struct.pack(">Q", argument)
    raise ValueError("integer too large for CBOR")


def encode(value: Any) -> bytes:
    """Encode ``value`` (None, bool, int, bytes, str, list, tuple, dict, Tag, Indefinite*)."""
    out = bytearray()
    _encode_into(out, value, 0)
    return bytes(out)


def _encode_into(out: bytearray, value: Any, depth: int) -> None:
    if depth > 64:
        raise ValueError("value nested too deeply to encode")
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        if value >= 0:
            out += encode_head(0, value)
        else:
            out += encode_head(1, -1 - value)
    elif isinstance(value, bytes | bytearray | memoryview):
        b = bytes(value)
        out += encode_head(2, len(b))
        out += b
    elif isinstance(value, str):
        b = value.encode("utf-8")
        out += encode_head(3, len(b))
        out += b
    elif isinstance(value, IndefiniteArray):
        out.append(0x9F)
        for item in value:
            _encode_into(out, item, depth + 1)
        out.append(0xFF)
    elif isinstance(value, list | tuple):
        out += encode_head(4, len(value))
        for item in value:
            _encode_into(out, item, depth + 1)
    elif isinstance(value, IndefiniteMap):
        out.append(0xBF)
        for k, v in value.items():
            _encode_into(out, k, depth + 1)
            _encode_into(out, v, depth + 1)
        out.append(0xFF)
    elif isinstance(value, Mapping):
        out += encode_head(5, len(value))
        for k, v in value.items():
            _encode_into(out, k, depth + 1)
            _encode_into(out, v, depth + 1)
    elif isinstance(value, Tag):
        out += encode_head(6, value.tag)
        _encode_into(out, value.value, depth + 1)
    else:
        raise TypeError(f"cannot CBOR-encode {type(value).__name__}")


def encode_uint_array(data: bytes) -> bytes:
    """serde's encoding of a plain ``Vec<u8>``: an array of unsigned integers, one per byte."""
    out = bytearray(encode_head(4, len(data)))
    for b in data:
        if b < 24:
            out.append(b)
        else:
            out.append(0x18)
            out.append(b)
    return bytes(out)


# --------------------------------------------------------------------------------------------- decoding


_BREAK = object()


class _Decoder:
    __slots__ = ("data", "indefinite_items", "indefinite_maps", "max_depth", "pos")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.max_depth = max_depth
        self.indefinite_maps: list[int] = []
        self.indefinite_items: list[int] = []

    def _need(self, n: int, what: str) -> None:
        if n > len(self.data) - self.pos:
            raise CBORError(
                f"truncated CBOR: {what} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} remain"
            )

    def _head(self) -> tuple[int, int, int | None]:
        """Return (major, additional info, argument or None for indefinite)."""
        self._need(1, "item head")
        initial = self.data[self.pos]
        self.pos += 1
        major, ai = initial >> 5, initial & 0x1F
        if ai < 24:
            return major, ai, ai
        if ai in (24, 25, 26, 27):
            n = 1 << (ai - 24)
            self._need(n, "head argument")
            arg = int.from_bytes(self.data[self.pos : self.pos + n], "big")
            self.pos += n
            return major, ai, arg
        if ai == 31:
            if major in (0, 1, 6):
                raise CBORError(f"indefinite length is not allowed for major type {major} at offset {self.pos - 1}")
            return major, ai, None
        raise CBORError(f"reserved additional information {ai} at offset {self.pos - 1}")

    def item(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise CBORError(f"CBOR nested deeper than {self.max_depth} levels")
        start = self.pos
        major, ai, arg = self._head()
        if major == 0:
            assert arg is not None
            return arg
        if major == 1:
            assert arg is not None
            return -1 - arg
        if major in (2, 3):
            if arg is None:
                self.indefinite_items.append(start)
                chunks = []
                while True:
                    self._need(1, "string chunk")
                    if self.data[self.pos] == 0xFF:
                        self.pos += 1
                        break
                    cmajor, _, carg = self._head()
                    if cmajor != major or carg is None:
                        raise CBORError(f"bad chunk inside indefinite-length string at offset {start}")
                    self._need(carg, "string chunk")
                    chunks.append(self.data[self.pos : self.pos + carg])
                    self.pos += carg
                raw = b"".join(chunks)
            else:
                self._need(arg, "string")
                raw = self.data[self.pos : self.pos + arg]
                self.pos += arg
            if major == 2:
                return bytes(raw)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CBORError(f"text string at offset {start} is not valid UTF-8") from exc
        if major == 4:
            items: list[Any] = []
            if arg is None:
                self.indefinite_items.append(start)
                while True:
                    self._need(1, "array item")
                    if self.data[self.pos] == 0xFF:
                        self.pos += 1
                        return items
                    items.append(self.item(depth + 1))
            # each item takes at least one byte: refuse absurd counts before looping
            self._need(arg, "array items")
            for _ in range(arg):
                items.append(self.item(depth + 1))
            return items
        if major == 5:
            result: dict[Any, Any] = {}
            if arg is None:
                self.indefinite_maps.append(start)
                self.indefinite_items.append(start)
                while True:
                    self._need(1, "map entry")
                    if self.data[self.pos] == 0xFF:
                        self.pos += 1
                        return result
                    self._entry(result, depth, start)
            self._need(2 * arg, "map entries")
            for _ in range(arg):
                self._entry(result, depth, start)
            return result
        if major == 6:
            assert arg is not None
            return Tag(arg, self.item(depth + 1))
        # major 7
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai == 22:
            return None
        if ai == 31:
            raise CBORError(f"unexpected break byte at offset {start}")
        if ai == 25:
            assert arg is not None
            return struct.unpack(">e", arg.to_bytes(2, "big"))[0]
        if ai == 26:
            assert arg is not None
            return struct.unpack(">f", arg.to_bytes(4, "big"))[0]
        if ai == 27:
            assert arg is not None
            return struct.unpack(">d", arg.to_bytes(8, "big"))[0]
        raise CBORError(f"unsupported simple value {ai if ai < 24 else arg} at offset {start}")

    def _entry(self, result: dict[Any, Any], depth: int, start: int) -> None:
        key = self.item(depth + 1)
        if isinstance(key, list | dict):
            raise CBORError(f"map at offset {start} has a key of type {type(key).__name__}")
        if isinstance(key, Tag):
            raise CBORError(f"map at offset {start} has a tagged key")
        # (Python's True == 1: a map holding both counts as a duplicate, which is stricter, never looser)
        if key in result:
            raise CBORError(f"duplicate map key {key!r} in map at offset {start}")
        result[key] = self.item(depth + 1)


def decode_prefix(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Decoded:
    """Decode one item from the start of ``data``; report where it ended (trailing bytes allowed)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("decode expects bytes")
    dec = _Decoder(bytes(data), max_depth)
    value = dec.item(0)
    return Decoded(value=value, end=dec.pos, indefinite_maps=dec.indefinite_maps,
                   indefinite_items=dec.indefinite_items)


def decode(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode exactly one CBOR item; trailing bytes are an error."""
    result = decode_prefix(data, max_depth=max_depth)
    if result.end != len(data):
        raise CBORError(f"{len(data) - result.end} trailing bytes after CBOR item (item ends at offset {result.end})")
    return result.value


def decode_uint_array(value: Any, what: str) -> bytes:
    """Inverse of :func:`encode_uint_array` on a decoded value: a list of ints 0..255 back to bytes."""
    if not isinstance(value, list):
        raise CBORError(f"{what}: expected an array of byte values, got {type(value).__name__}")
    try:
        return bytes(value)
    except (TypeError, ValueError) as exc:
        raise CBORError(f"{what}: array element is not a byte value (0..255)") from exc

