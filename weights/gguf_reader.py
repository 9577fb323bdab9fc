"""A GGUF reader that reads the metadata in one pass with ``struct`` (arrays of numbers as numpy blocks,
strings in a tight loop) and maps the tensor data lazily; the ``gguf`` package's reader builds a numpy
view per array element, about 10 s for a vocabulary of 150K tokens. Same answers, as the tests check:
``values`` (key -> Python value) and ``tensors`` (name, GGML shape, type, data as the ``gguf`` reader
lays it out, so ``gguf.quants.dequantize`` takes it as is).

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian v2/v3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}


class GGUFFormatError(ValueError):
    pass


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGML order (fastest-varying first)
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # elements (plain types) or block bytes, rows last, as gguf's reader gives them
    offset: int = 0  # of the data in the file


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._map)
        self._buf, self._pos = buf, 0
        if bytes(buf[:4]) != MAGIC:
            raise GGUFFormatError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        self._pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        self.values: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            self.values[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            dims = tuple(self._scalar(10) for _ in range(n_dims))
            infos.append((name, dims, self._scalar(4), self._scalar(10)))
        align = int(self.values.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise GGUFFormatError(f"{path}: tensor {name} appears twice")
            seen.add(name)
            try:
                qtype = gguf.GGMLQuantizationType(raw_type)
            except ValueError:
                raise GGUFFormatError(f"{path}: tensor {name} has an unknown type {raw_type}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            np_dims = tuple(reversed(dims))
            if qtype.name in _PLAIN:
                dtype, count = np.dtype(_PLAIN[qtype.name]), n
            else:
                if not dims or dims[0] % block:
                    raise GGUFFormatError(f"{path}: tensor {name}: rows of {dims[:1]} do not split into blocks of {block}")
                dtype, count = np.dtype(np.uint8), n // block * type_size
                np_dims = (*np_dims[:-1], dims[0] // block * type_size)
            lo = start + offset
            hi = lo + count * dtype.itemsize
            if hi > len(self._map):
                raise GGUFFormatError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
            data = np.frombuffer(self._map, dtype=dtype, count=count, offset=lo).reshape(np_dims)
            self.tensors.append(GGUFTensor(name, dims, qtype, data, lo))
        del self._buf

    # -- metadata parsing ---------------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._buf):
            raise GGUFFormatError(f"{self.path}: the metadata runs past the end of the file (truncated?)")
        out = self._buf[self._pos: self._pos + n]
        self._pos += n
        return out

    def _scalar(self, kind: int):
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GGUFFormatError(f"{self.path}: unknown metadata type {kind}")
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._scalar(10)
        try:
            return bytes(self._take(n)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{self.path}: a metadata string is not UTF-8 ({e})") from None

    def _strings(self, count: int) -> list[str]:
        """An array of strings (a vocabulary: 10^5 of them), parsed in one tight loop."""
        buf, pos, end = self._buf, self._pos, len(self._buf)
        unpack = struct.Struct("<Q").unpack_from
        out = []
        try:
            for _ in range(count):
                if pos + 8 > end:
                    raise GGUFFormatError(f"{self.path}: the metadata runs past the end of the file (truncated?)")
                (n,) = unpack(buf, pos)
                if pos + 8 + n > end:
                    raise GGUFFormatError(f"{self.path}: the metadata runs past the end of the file (truncated?)")
                out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8"))
                pos += 8 + n
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{self.path}: a metadata string is not UTF-8 ({e})") from None
        self._pos = pos
        return out

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._scalar(4), self._scalar(10)
            if item == _STRING:
                return self._strings(count)
            if item == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_NUMPY.get(item) or self._unknown(item))
            arr = np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype)
            return [bool(x) for x in arr] if item == 7 else arr.tolist()
        return self._scalar(kind)

    def _unknown(self, kind: int):
        raise GGUFFormatError(f"{self.path}: unknown metadata type {kind}")
