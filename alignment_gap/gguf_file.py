"""A GGUF file's metadata and tensor directory, read once with numpy (no tensor is copied).

The layout (GGUF v2 and v3, little-endian): the magic `GGUF`, a u32 version, u64 tensor and
metadata counts; metadata as (string key, u32 value type, value); tensor infos as (string name,
u32 dims, u64 per dim innermost first, u32 ggml type, u64 offset); then the data, aligned to
`general.alignment` (default 32), each tensor at its offset from the data's start. A string is a
u64 byte length and UTF-8 bytes; an array is a u32 element type, a u64 count and the elements.

`gguf.GGUFReader` builds a numpy view per element of every array; on Gemma 3's 262,144-token
vocabulary that took 15-25 s per open, where this reads the same fields in well under a second.
Dequantising stays with the `gguf` package (`gguf.quants`).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct

import gguf
import numpy as np

from alignment_gap.errors import CheckpointError

# GGUF value types: id -> numpy dtype of a scalar or array element (8: string, 9: array).
_NUMERIC = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost (row) dimension first
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray  # uint8, outermost dimension first, each row's bytes last


class GgufFile:
    """`fields` (key -> int, float, bool, str or list) and `tensors` (name -> Tensor) of `path`.
    A truncated or foreign file raises CheckpointError naming it."""

    def __init__(self, path: str):
        self.path = path
        self._offset = 0
        if os.path.isdir(path):
            inside = sorted(name for name in os.listdir(path) if name.endswith(".gguf"))
            raise CheckpointError(f"{path}: a directory, not a GGUF file; name the .gguf file "
                                  f"in it ({', '.join(inside) if inside else 'it holds none'})")
        try:
            with open(path, "rb") as f:  # an empty file (an interrupted copy) cannot be mapped
                self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.fields, self.tensors = self._read()
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e}); copy it "
                                  "again") from None

    def _read(self):
        magic, version = self._unpack("<4sI")
        if magic != b"GGUF":
            raise ValueError(f"the magic is {magic!r}, not b'GGUF'")
        if version not in (2, 3):
            raise ValueError(f"version {version} (a big-endian or a v1 file); only "
                             "little-endian v2 and v3 are read")
        tensor_count, field_count = self._unpack("<QQ")
        fields = {}
        for _ in range(field_count):
            key = self._string()
            (kind,) = self._unpack("<I")
            fields[key] = self._value(kind)
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            (dims,) = self._unpack("<I")
            shape = self._unpack(f"<{dims}Q")
            kind, offset = self._unpack("<IQ")
            infos.append((name, tuple(shape), gguf.GGMLQuantizationType(kind), offset))
        alignment = int(fields.get("general.alignment", 32))
        start = -(-self._offset // alignment) * alignment
        tensors = {name: Tensor(name, shape, kind, self._tensor_bytes(start + offset, shape, kind))
                   for name, shape, kind, offset in infos}
        return fields, tensors

    def _tensor_bytes(self, at: int, shape: tuple[int, ...], kind) -> np.ndarray:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        if shape[0] % block:
            raise ValueError(f"a row of {shape[0]} values is not whole {kind.name} blocks")
        row_bytes = shape[0] // block * size
        outer = tuple(reversed(shape[1:]))
        count = int(np.prod(outer, dtype=np.int64)) * row_bytes
        if at + count > len(self._buffer):
            raise ValueError(f"a tensor ends at byte {at + count}, past the file's end "
                             f"({len(self._buffer)}): the file is cut short")
        return np.frombuffer(self._buffer, np.uint8, count, at).reshape(outer + (row_bytes,))

    def _unpack(self, layout: str):
        values = struct.unpack_from(layout, self._buffer, self._offset)
        self._offset += struct.calcsize(layout)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        text = self._buffer[self._offset:self._offset + length].decode("utf-8")
        self._offset += length
        return text

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            element, count = self._unpack("<IQ")
            if element == _STRING:
                return [self._string() for _ in range(count)]
            if element not in _NUMERIC:
                raise ValueError(f"an array of value type {element} (nested arrays are not read)")
            values = np.frombuffer(self._buffer, _NUMERIC[element], count, self._offset)
            self._offset += values.nbytes
            return values.tolist()
        if kind not in _NUMERIC:
            raise ValueError(f"value type {kind} is unknown")
        value = np.frombuffer(self._buffer, _NUMERIC[kind], 1, self._offset)
        self._offset += value.nbytes
        return value.item()
