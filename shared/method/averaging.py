"""Shared-parameter averaging: ``shared = (sum over members) / N``, summed in float64, cast back only at the end.

Adding or removing a member changes the member set the sum runs over. The sum is always recomputed in sorted
member order from each member's own tensors rather than updated by subtraction (float64 subtraction is not an
exact inverse of addition), so "revoked" and "never joined" give identical bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping

import torch

from dume.shared.method.expert import DenseWeights
from dume.shared.method.lazy_tensors import LazyTensors

SUM_BLOCK = 1 << 20  # values averaged at a time (8 MiB of float64)


def canonical_mean(experts: Mapping[str, DenseWeights], name: str) -> torch.Tensor:
    """The mean of one tensor over members, summed in float64 in sorted member order.

    Sorting makes the result independent of the order members joined, so the same member set always gives the
    same bytes. The mean is cast back to the first member's dtype (the model dtype) only at the end. It is computed
    a block of rows at a time, each member's rows read as they are needed: memory holds the result in the model's
    dtype and one block per member in float64, never a float64 copy of a whole vocabulary matrix (4 GiB for an
    8B model's) nor a member's whole copy beside it.
    """
    names = sorted(experts)
    if not names:
        raise ValueError("no members to average")
    shape, dtype = experts[names[0]].tensor_shape(name)
    if not shape:
        return _mean([experts[member].tensor(name) for member in names], dtype)
    mean = torch.empty(shape, dtype=dtype)
    rows = max(1, SUM_BLOCK // max(1, mean[0].numel()))
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        mean[start:stop] = _mean((experts[member].tensor_rows(name, start, stop) for member in names), dtype)
    return mean


def _mean(blocks: Iterable[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``(b_0 + b_1 + ...) / n`` in float64, in the order given, cast to ``dtype``."""
    total, count = None, 0
    for block in blocks:
        total = block.to(torch.float64, copy=True) if total is None else total.add_(block.to(torch.float64))
        count += 1
    return total.div_(count).to(dtype)


def compute_basis(experts: Mapping[str, DenseWeights]) -> dict[str, torch.Tensor]:
    """The federation's basis: every shared parameter averaged over all members."""
    return dict(lazy_basis(experts).items())


def lazy_basis(experts: Mapping[str, DenseWeights]) -> LazyTensors:
    """The basis as a mapping that averages each shared parameter when it is read, so a caller that stores the
    tensors one by one never holds the whole basis (the shared weights of an 8B model are about 4.7 GB)."""
    first = experts[min(experts)]  # the member whose dtype the mean takes (``canonical_mean``)
    return LazyTensors(first.shared_names, lambda name: canonical_mean(experts, name), describe=first.tensor_shape)


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes in sorted name order: the content hash of a basis."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode()
        digest.update(struct.pack("<Q", len(header)) + header)
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
        del tensor  # before the next is read: a lazy mapping then holds one tensor at a time
    return digest.hexdigest()
