"""Tensors on the wire: raw little-endian bytes described by a ``TensorEntry`` (name, dtype, shape, SHA-256).

The raw bytes of a tensor are exactly its bytes inside a safetensors file, so a node can hash and send its model
straight from its own files a chunk at a time, and the coordinator can rebuild the tensor from a blob.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy
import torch

from dume.shared.method.lazy_tensors import LazyTensors
from dume.shared.method.tensor_file import DTYPE_NAMES, DTYPES
from dume.v1 import tensors_pb2

if TYPE_CHECKING:
    from dume.shared.transport.blobs import BlobStore

# Where each dtype keeps its exponent: a value is NaN or infinite exactly when all its exponent bits are set.
EXPONENT_BITS: dict[str, tuple[type[numpy.unsignedinteger], int]] = {
    "F64": (numpy.uint64, 0x7FF0_0000_0000_0000),
    "F32": (numpy.uint32, 0x7F80_0000),
    "F16": (numpy.uint16, 0x7C00),
    "BF16": (numpy.uint16, 0x7F80),
}


def tensor_view(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw bytes without copying them (a contiguous CPU tensor is viewed; anything else copied once)."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor_view(tensor).tobytes()


def tensor_entry(name: str, tensor: torch.Tensor, sha256: str | None = None) -> tensors_pb2.TensorEntry:
    """The entry describing ``tensor``; ``sha256`` of its bytes when the caller already hashed them."""
    data = tensor_view(tensor)
    return tensors_pb2.TensorEntry(
        name=name, dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape),
        sha256=sha256 or hashlib.sha256(data).hexdigest(), size_bytes=data.nbytes,
    )


def stored_tensors(entries: Iterable[tensors_pb2.TensorEntry], store: BlobStore) -> LazyTensors:
    """The tensors of ``entries`` as a mapping that reads each from its blob only when used (a basis is never
    whole in memory), and straight into a tensor of the same dtype and shape where asked (``read_into``); each is
    described (shape, dtype) from its entry, not its blob."""
    by_name = {entry.name: entry for entry in entries}

    def read(name: str) -> torch.Tensor:
        return tensor_from_bytes(by_name[name], store.read_buffer(by_name[name].sha256))

    def read_into(name: str, out: torch.Tensor) -> bool:
        entry = by_name[name]
        if DTYPES[entry.dtype] != out.dtype or tuple(entry.shape) != tuple(out.shape):
            return False
        store.read_into(entry.sha256, memoryview(out.detach().reshape(-1).view(torch.uint8).numpy()))
        return True

    def describe(name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(by_name[name].shape), DTYPES[by_name[name].dtype]

    return LazyTensors(by_name, read, read_into, describe)


def tensor_from_bytes(entry: tensors_pb2.TensorEntry, data: bytes | bytearray) -> torch.Tensor:
    """The tensor an entry describes, from its raw bytes: a copy the caller owns, or the very ``bytearray`` given
    (then no copy is made: the tensor is that buffer)."""
    dtype = DTYPES[entry.dtype]
    if not data:
        return torch.empty(tuple(entry.shape), dtype=dtype)
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buffer, dtype=dtype).reshape(tuple(entry.shape))


def all_finite(data: bytes | bytearray | memoryview, dtype: str) -> bool:
    """Whether every value of ``dtype`` in ``data`` (a whole number of values) is finite, read in place by its
    exponent bits (no copy, and bfloat16 too, which numpy lacks)."""
    bits, exponent = EXPONENT_BITS[dtype]
    values = numpy.frombuffer(data, dtype=bits)
    return not bool(numpy.any((values & bits(exponent)) == bits(exponent)))


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
