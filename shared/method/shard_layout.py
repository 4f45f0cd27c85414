"""A safetensors shard's layout from its tensors' names, dtypes and shapes alone, byte for byte as
``safetensors.torch.save_file`` lays it out (``tests/test_transfers.py`` checks it against the library).

With it a shard is written a tensor at a time from bytes that already exist (a blob, another file), so nothing
is deserialised and memory never holds more than a copy buffer: the file is the 8-byte little-endian header size,
the JSON header (``__metadata__`` first, then each tensor with its ``data_offsets``, padded with spaces to a
multiple of 8 bytes), then the tensors' bytes in the header's order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
