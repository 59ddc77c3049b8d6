"""Reading a GGUF file's header: metadata, tensor directory, and raw tensor bytes (memory-mapped).

`gguf.GGUFReader` builds one numpy view per string of every array, which takes ~30 s for the
262144-token vocabulary of Gemma 3; this reader decodes the same format in about a second. The
layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, kv count u64,
the key/value pairs, the tensor infos (name, dims in ggml order, type u32, offset u64), then the
tensor data, aligned to `general.alignment` (32 by default).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from gemmakit.errors import CheckpointError

# GGUF value types: u8 i8 u16 i16 u32 i32 f32 bool string array u64 i64 f64
_SCALAR = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_MAGIC = b"GGUF"


class GGUFFormatError(CheckpointError):
    """A file that is not a readable GGUF; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: (out, in) for a matrix; ggml stores it reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        except struct.error:
            raise GGUFFormatError(f"{self.path}: truncated header at byte {self.pos}") from None
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        if len(raw) != n:
            raise GGUFFormatError(f"{self.path}: truncated string at byte {self.pos}")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("I"), self.unpack("Q")
            if itype in _SCALAR and itype != 7:  # numeric arrays in one read
                dtype = np.dtype("<" + _SCALAR[itype])
                arr = np.frombuffer(self.buf, dtype, count, self.pos).copy()
                self.pos += dtype.itemsize * count
                return arr.tolist()
            return [self.value(itype) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown metadata value type {vtype} at {self.pos}")


class GGUFFile:
    """metadata: dict of key -> value (arrays as lists); tensors: name -> TensorInfo;
    raw(name) -> the tensor's bytes as a read-only uint8 numpy array (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise GGUFFormatError(f"{self.path}: cannot open ({e})") from e
        cur = _Cursor(memoryview(self._map), self.path)
        if bytes(self._map[:4]) != _MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {bytes(self._map[:4])!r})")
        cur.pos = 4
        self.version = cur.unpack("I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {self.version} is not supported")
        n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
            qtype, offset = cur.unpack("I"), cur.unpack("Q")
            infos.append((name, dims, qtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in infos:
            try:
                qt = GGMLQuantizationType(qtype)
                block, type_size = GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise GGUFFormatError(
                    f"{self.path}: tensor {name!r} has unknown type {qtype}"
                ) from None
            if dims[0] % block:
                raise GGUFFormatError(
                    f"{self.path}: tensor {name!r} row of {dims[0]} is not a multiple of the "
                    f"{qt.name} block size {block}"
                )
            nbytes = int(np.prod(dims[1:], dtype=np.int64)) * dims[0] // block * type_size
            start = data_start + offset
            if start + nbytes > len(self._map):
                raise GGUFFormatError(f"{self.path}: tensor {name!r} runs past the end of file")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), qt, start, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name`, rows of the innermost ggml dimension:
        shape [prod(shape[:-1]), bytes per row]."""
        info = self.tensors[name]
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        return self._map[info.offset : info.offset + info.nbytes].reshape(rows, -1)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)
