"""Tensors on the wire: raw little-endian bytes described by a ``TensorEntry`` (name, dtype, shape, SHA-256).

The raw bytes of a tensor are exactly its bytes inside a safetensors file, so a node can hash and send its model
straight from its own files a chunk at a time, and the coordinator can rebuild the tensor from a blob.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from dume.v1 import tensors_pb2

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_entry(name: str, tensor: torch.Tensor) -> tensors_pb2.TensorEntry:
    data = tensor_bytes(tensor)
    return tensors_pb2.TensorEntry(
        name=name, dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape),
        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
    )


def tensor_from_bytes(entry: tensors_pb2.TensorEntry, data: bytes) -> torch.Tensor:
    """The tensor an entry describes, from its raw bytes (a copy the caller owns)."""
    dtype = DTYPES[entry.dtype]
    if not data:
        return torch.empty(tuple(entry.shape), dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(tuple(entry.shape))


def expected_size(entry: tensors_pb2.TensorEntry) -> int:
    count = 1
    for dimension in entry.shape:
        count *= dimension
    return count * DTYPES[entry.dtype].itemsize


@dataclass(frozen=True)
class FileRange:
    """Where one tensor's raw bytes lie inside a safetensors file."""

    path: Path
    start: int
    size: int
    dtype: str
    shape: tuple[int, ...]


def safetensors_ranges(path: Path) -> dict[str, FileRange]:
    """Every tensor's byte range in a safetensors file, from its header alone (no tensor is loaded)."""
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    base = 8 + header_size
    ranges = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        ranges[name] = FileRange(path, base + begin, end - begin, info["dtype"], tuple(info["shape"]))
    return ranges
