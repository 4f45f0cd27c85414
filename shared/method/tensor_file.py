"""The tensor dtypes the project stores (by their safetensors names), and writing tensors as a safetensors file a
tensor at a time, with the bytes ``safetensors.torch.save_file`` writes.

Kept apart from ``shard_layout``, which must not import torch: the commands import it for ``--help``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from dume.shared.method.lazy_tensors import describe
from dume.shared.method.shard_layout import ShardTensor, shard_header, shard_order

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


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
