"""Minimal safetensors reader and writer, memory-mapped, with FP8 through ml_dtypes.

Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw bytes. safetensors' own numpy loader has no float8 dtype, so the
header is read here and bytes are viewed through ml_dtypes; nothing is unpickled.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A file is not valid safetensors; the message names the file and what is wrong."""


class SafetensorsFile:
    """Read-only view of one .safetensors file; tensors are zero-copy views of a memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SafetensorsError(f"{self.path}: header length {n} exceeds the file size {size}; "
                                       "the file is truncated or not safetensors")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e}); the file is corrupt") from e
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.entries = header
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            lo, hi = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(DTYPES[e["dtype"]]).itemsize
            if hi - lo != want or self.start + hi > size:
                raise SafetensorsError(f"{self.path}: tensor {name!r} spans bytes {lo}..{hi} of a "
                                       f"{size - self.start}-byte body, expected {want} bytes; the file is corrupt")
        self._map = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> np.ndarray:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.entries else b""
        e = self.entries[name]
        lo, hi = e["data_offsets"]
        dtype = np.dtype(DTYPES[e["dtype"]])
        arr = np.frombuffer(self._map, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=self.start + lo)
        return arr.reshape(e["shape"])


def write(path: str | os.PathLike, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, object]]) -> None:
    """Write (name, shape, dtype, produce) entries; `produce()` returns the array when its bytes are due."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype, produce in tensors:
            arr = np.ascontiguousarray(np.asarray(produce(), dtype=dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced shape {arr.shape}, declared {tuple(shape)}")
            f.write(arr.tobytes())
    os.replace(tmp, path)
