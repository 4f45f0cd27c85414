"""Shared-parameter averaging: ``shared = (sum over members) / N``, summed in float64, cast back only at the end.

Adding or removing a member changes the member set the sum runs over. The sum is always recomputed in sorted
member order from each member's own tensors rather than updated by subtraction (float64 subtraction is not an
exact inverse of addition), so "revoked" and "never joined" give identical bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping

import torch

from dume.shared.method.expert import ExpertDirectory

SUM_BLOCK = 1 << 20  # values added at a time (8 MiB of float64)


def canonical_mean(member_names: Iterable[str], read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The mean of one tensor over members, summed in float64 in sorted member order.

    ``read(member)`` returns that member's copy of the tensor. Sorting makes the result independent of the order
    members joined, so the same member set always gives the same bytes. The mean is cast back to the dtype of the
    first member's copy (the model dtype) only at the end.
    """
    names = sorted(member_names)
    if not names:
        raise ValueError("no members to average")
    first = read(names[0])
    dtype = first.dtype
    total = first.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    del first
    flat = total.view(-1)
    for name in names[1:]:  # in place and a block at a time: no float64 copy of a whole member's tensor
        tensor = read(name).reshape(-1)
        for start in range(0, len(flat), SUM_BLOCK):
            flat[start:start + SUM_BLOCK] += tensor[start:start + SUM_BLOCK].to(torch.float64)
        del tensor
    return total.div_(len(names)).to(dtype)


def compute_basis(experts: Mapping[str, ExpertDirectory]) -> dict[str, torch.Tensor]:
    """The federation's basis: every shared parameter averaged over all members."""
    first = experts[min(experts)]
    return {
        name: canonical_mean(experts, lambda member, name=name: experts[member].tensor(name))
        for name in first.shared_names
    }


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
