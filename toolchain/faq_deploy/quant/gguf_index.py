"""The tensors of a GGUF file, found without parsing its metadata arrays.

gguf-py's GGUFReader makes a numpy view of every element of every metadata array, so a file is read
in seconds that grow with its vocabulary: 4 s for SmolLM2's 49k tokens and merges, 14 s for
Qwen2.5's 152k, on one core here. `--method gguf` needs the tensor table and two scalar keys, so this
reader steps over the arrays by their lengths and memory-maps the tensors' bytes: milliseconds.
Layout (GGUF v2 and v3, little-endian): magic, version, tensor and key counts; the keys, each a
string, a value type and a value; then per tensor its name, dimensions, type and offset; the data
after them, aligned to `general.alignment` (32 when the file does not say).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
            GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
_FLOATS = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # as the file lists it: the row length first
    data: np.ndarray        # float32/float16 values, or a block type's raw bytes, uint8 [rows, row bytes]


class GgufIndex:
    """A GGUF file's scalar and string keys (`fields`) and its tensors by name."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)  # the arrays below keep it open
        self._at = 0
        magic, version, tensors, keys = self._read("<4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a little-endian GGUF v2 or v3 file (magic {magic!r}, version {version})")
        self.fields: dict[str, object] = {}
        for _ in range(keys):
            key, kind = self._string(), GGUFValueType(self._read("<I")[0])
            value = self._value(kind)
            if value is not None:
                self.fields[key] = value
        infos = []
        for _ in range(tensors):
            name, dims = self._string(), self._read("<I")[0]
            shape = self._read(f"<{dims}Q")
            kind, offset = self._read("<IQ")
            infos.append((name, tuple(shape), GGMLQuantizationType(kind), offset))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-self._at // alignment) * alignment
        self.tensors = {name: self._tensor(name, shape, kind, start + offset) for name, shape, kind, offset in infos}

    def _read(self, layout: str) -> tuple:
        try:
            values = struct.unpack_from(layout, self._map, self._at)
        except struct.error:
            raise ValueError(f"the file ends at byte {len(self._map)}, inside its header") from None
        self._at += struct.calcsize(layout)
        return values

    def _string(self) -> str:
        size = self._read("<Q")[0]
        self._at += size
        return self._map[self._at - size:self._at].decode("utf-8")

    def _value(self, kind: GGUFValueType) -> object:
        """A scalar or a string; an array is stepped over (None): strings by their lengths, numbers at once."""
        if kind == GGUFValueType.STRING:
            return self._string()
        if kind != GGUFValueType.ARRAY:
            return self._read("<" + _SCALARS[kind])[0]
        item, count = self._read("<IQ")
        if item == GGUFValueType.STRING:
            for _ in range(count):
                (size,) = self._read("<Q")
                self._at += size
        elif item == GGUFValueType.ARRAY:
            for _ in range(count):
                self._value(GGUFValueType.ARRAY)
        else:
            self._at += count * struct.calcsize(_SCALARS[GGUFValueType(item)])
        return None

    def _tensor(self, name: str, shape: tuple[int, ...], kind: GGMLQuantizationType, at: int) -> GgufTensor:
        rows, row = int(np.prod(shape[1:])), shape[0]
        if kind in _FLOATS:
            data = np.frombuffer(self._map, _FLOATS[kind], rows * row, at).reshape(rows, row)
        else:
            block, block_bytes = GGML_QUANT_SIZES[kind]
            data = np.frombuffer(self._map, np.uint8, rows * row // block * block_bytes, at).reshape(rows, -1)
        return GgufTensor(name, kind, shape, data)
