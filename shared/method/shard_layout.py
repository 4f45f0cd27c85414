"""A safetensors shard's layout from its tensors' names, dtypes and shapes alone, byte for byte as
``safetensors.torch.save_file`` lays it out (``tests/test_transfers.py`` checks it against the library).

With it a shard is written a tensor at a time from bytes that already exist (a blob, another file), so nothing
is deserialised and memory never holds more than a copy buffer: the file is the 8-byte little-endian header size,
the JSON header (``__metadata__`` first, then each tensor with its ``data_offsets``, padded with spaces to a
multiple of 8 bytes), then the tensors' bytes in the header's order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dume.shared.method.lazy_tensors import describe
from dume.shared.transport.wire import DTYPE_NAMES

SHARD_METADATA = {"format": "pt"}  # what every shard this project writes carries (transformers reads it)
# safetensors orders tensors by dtype, widest first (its dtype enumeration, descending), then by name.
DTYPE_ORDER = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3}


@dataclass(frozen=True)
class ShardTensor:
    name: str
    dtype: str  # safetensors' dtype name: F64, F32, BF16, F16
    shape: tuple[int, ...]
    size: int  # bytes


def shard_order(tensors: Sequence[ShardTensor]) -> list[ShardTensor]:
    """The order the tensors' bytes take in the file."""
    return sorted(tensors, key=lambda tensor: (DTYPE_ORDER[tensor.dtype], tensor.name))


def shard_header(tensors: Sequence[ShardTensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Everything before the first tensor's bytes: the header's size and the padded JSON header."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for tensor in shard_order(tensors):
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.size]}
        offset += tensor.size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """``tensors`` as a safetensors file, the bytes ``save_file`` writes, a tensor at a time (a lazy mapping is never
    whole in memory). The header comes from each tensor's shape and dtype (``describe``: a lazy mapping's metadata),
    so each tensor is read (averaged, or read from its blob) once, for its bytes. Written by Python's file I/O, a
    full disk is an ``OSError`` (ENOSPC), which the commands turn into one line; safetensors' own writer raises
    its own error type."""
    layout = []
    for name in sorted(tensors):
        shape, dtype = describe(tensors, name)
        layout.append(ShardTensor(name, DTYPE_NAMES[dtype], shape, math.prod(shape) * dtype.itemsize))
    with open(path, "wb") as handle:
        handle.write(shard_header(layout, metadata))
        for entry in shard_order(layout):
            tensor = tensors[entry.name].detach().cpu().contiguous()
            if (DTYPE_NAMES[tensor.dtype], tuple(tensor.shape)) != (entry.dtype, entry.shape):
                raise ValueError(f"tensor {entry.name} is {tensor.dtype} {tuple(tensor.shape)}, not the "
                                 f"{entry.dtype} {entry.shape} its description gave")
            handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor
