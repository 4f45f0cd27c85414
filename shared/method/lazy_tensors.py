"""Named tensors read from their source only when used, and not kept.

A basis of several GiB (the node's blob cache, a safetensors file) is hashed and copied into a model a tensor at
a time through this mapping, so it is never whole in memory; a source that can also read a tensor straight into
existing memory (a parameter of the right dtype and shape) saves even the one tensor's copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

Description = tuple[tuple[int, ...], torch.dtype]  # a tensor's shape and dtype


class LazyTensors(Mapping[str, torch.Tensor]):
    """``read(name)`` gives a fresh tensor at each lookup; the optional ``read_into(name, out)`` fills ``out`` in
    place and returns whether it could (same dtype and shape, contiguous, on the CPU); the optional
    ``describe(name)`` gives a tensor's shape and dtype from the source's metadata, without reading (or averaging)
    its data. ``file`` names the safetensors file that holds exactly these tensors, where there is one: another
    process can then open it instead of being given a copy."""

    def __init__(self, names: Iterable[str], read: Callable[[str], torch.Tensor],
                 read_into: Callable[[str, torch.Tensor], bool] | None = None,
                 describe: Callable[[str], Description] | None = None, file: Path | None = None) -> None:
        self._names = list(dict.fromkeys(names))
        self._known = set(self._names)
        self._read = read
        self._read_into = read_into
        self._describe = describe
        self.file = file

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Fills ``out`` with the named tensor without an intermediate copy, where the source can; else False (the
        caller then copies ``self[name]``)."""
        if name not in self._known:
            raise KeyError(name)
        if self._read_into is None or out.device.type != "cpu" or not out.is_contiguous():
            return False
        return self._read_into(name, out)

    def describe(self, name: str) -> Description:
        """The named tensor's shape and dtype: from the source's metadata where it has them, else from the tensor
        read once for them."""
        if name not in self._known:
            raise KeyError(name)
        if self._describe is not None:
            return self._describe(name)
        tensor = self._read(name)
        return tuple(tensor.shape), tensor.dtype


def describe(tensors: Mapping[str, torch.Tensor], name: str) -> Description:
    """A tensor's shape and dtype without reading it where ``tensors`` is lazy (a tensor in memory describes
    itself)."""
    if isinstance(tensors, LazyTensors):
        return tensors.describe(name)
    tensor = tensors[name]
    return tuple(tensor.shape), tensor.dtype


@contextmanager
def file_tensors(path: Path) -> Iterator[LazyTensors]:
    """The tensors of a safetensors file, each read when used (``file`` is ``path``)."""
    with safe_open(path, framework="pt") as handle:
        yield LazyTensors(handle.keys(), handle.get_tensor, file=path)
