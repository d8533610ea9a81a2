"""A GGUF file's header: its metadata (key-value pairs) and its tensor table, read without the tensor data.

Layout (GGUF versions 2 and 3, little-endian): ``GGUF``, uint32 version, uint64 tensor count, uint64 metadata
count; the metadata as (string key, uint32 value type, value); the tensor infos as (string name, uint32 n_dims,
uint64 dims[n_dims] innermost first, uint32 ggml type, uint64 offset); the tensor data from the next multiple of
``general.alignment`` (default 32) after the infos, each tensor at ``data start + offset``. A string is a uint64 byte
count and UTF-8 bytes; an array is a uint32 item type, a uint64 count and the items.

Cost: one pass over the header. Arrays are decoded only where asked (``decode_array``); the others are skipped with
their length kept, so a 49,152-token vocabulary and its merges cost milliseconds (decoding every field, as the
``gguf`` package's reader does, costs seconds in Python).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

MAGIC = b"GGUF"
READ_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY, _BOOL = 8, 9, 7
#: GGUF value type -> (struct format, numpy dtype) of the fixed-size types
_SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
            5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64), 11: ("q", np.int64),
            12: ("d", np.float64)}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF header memzoo reads (the message says what was found where)."""


class GGUFDamagedError(GGUFFormatError):
    """A GGUF header that ends early or whose lengths point past the end of the file."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of the table: ``shape`` outermost first (numpy/torch order), ``ggml_type`` the GGML quantisation
    type number, ``offset`` the absolute byte offset of its data in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFHeader:
    """``metadata``: every scalar and every decoded array (a list); ``array_lengths``: the length of every array
    field, decoded or not; ``tensors`` in file order."""

    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def tensor_names(self) -> set[str]:
        return {tensor.name for tensor in self.tensors}


class _Cursor:
    """Little-endian reads from a buffer, with the offset of every failure in its message."""

    def __init__(self, buffer: Any) -> None:
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        except struct.error:
            raise GGUFDamagedError(f"the header ends early (at byte {self.offset} of {len(self.buffer)}): the file "
                                  f"is truncated") from None
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise GGUFDamagedError(f"a string at byte {self.offset} claims {length} bytes, past the end of the file "
                                  f"({len(self.buffer)} bytes): the file is truncated or damaged")
        raw = bytes(self.buffer[self.offset:end])
        self.offset = end
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, key: str, decode_array: Callable[[str], bool]) -> tuple[Any, int | None]:
        """The value of type ``kind`` (and, for an array, its length)."""
        if kind == _STRING:
            return self.string(), None
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind][0]), None
        if kind != _ARRAY:
            raise GGUFFormatError(f"metadata key {key!r} has value type {kind}, which GGUF does not define")
        item, count = self.unpack("I"), self.unpack("Q")
        if item == _STRING:
            if decode_array(key):
                return [self.string() for _ in range(count)], count
            for _ in range(count):
                length = self.unpack("Q")  # (not `offset += unpack()`: that would add to the offset read before)
                self.offset += length
            return None, count
        if item not in _SCALARS:
            raise GGUFFormatError(f"metadata key {key!r} is an array of value type {item}, which memzoo does not "
                                  f"read (nested arrays)")
        dtype = np.dtype(_SCALARS[item][1]).newbyteorder("<")
        size = count * dtype.itemsize
        if self.offset + size > len(self.buffer):
            raise GGUFDamagedError(f"metadata key {key!r} claims {count} items, past the end of the file: the file "
                                  f"is truncated or damaged")
        values = None
        if decode_array(key):
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset).tolist()
        self.offset += size
        return values, count


def read_gguf_header(path: str | Path, decode_array: Callable[[str], bool] = lambda key: False) -> GGUFHeader:
    """The header of GGUF file ``path``; ``decode_array(key)`` says which array fields to decode. Raises
    :class:`GGUFFormatError` for another format, an unread version, a big-endian file or a truncated header."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        cursor = _Cursor(buffer)
        magic = bytes(buffer[:4])
        if magic != MAGIC:
            raise GGUFFormatError(f"it starts with {magic!r}, not {MAGIC!r}")
        cursor.offset = 4
        version = cursor.unpack("I")
        if version not in READ_VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            if swapped in READ_VERSIONS:
                raise GGUFFormatError("it is a big-endian GGUF file; memzoo reads little-endian ones (llama.cpp's "
                                      "convert scripts write those by default)")
            raise GGUFFormatError(f"it is GGUF version {version}; memzoo reads versions {READ_VERSIONS}")
        n_tensors, n_fields = cursor.unpack("Q"), cursor.unpack("Q")
        metadata: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_fields):
            key = cursor.string()
            value, length = cursor.value(cursor.unpack("I"), key, decode_array)
            if length is not None:
                lengths[key] = length
                if value is None:
                    continue
            metadata[key] = value
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = [cursor.unpack("Q") for _ in range(cursor.unpack("I"))]
            infos.append((name, tuple(reversed(dims)), cursor.unpack("I"), cursor.unpack("Q")))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-cursor.offset // alignment) * alignment
    tensors = tuple(GGUFTensorInfo(name, shape, kind, start + offset) for name, shape, kind, offset in infos)
    names = [tensor.name for tensor in tensors]
    if len(set(names)) != len(names):
        raise GGUFFormatError(f"its tensor table names a tensor twice "
                              f"({sorted({n for n in names if names.count(n) > 1})[:3]})")
    return GGUFHeader(version, metadata, lengths, tensors)
