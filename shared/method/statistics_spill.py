"""Packed statistics spilled to disk while ``dume merge`` collects the others, read back one layer at a time.

Each contribution's packed G (layers, triangle) is as large as its model's layers are many (64 MiB per layer at
hidden 4096); held in memory until the solve, every dataset's would add up. Written as one raw float64 file per
layer, exact bytes, they cost disk instead, and the solve reads each layer's file when it reaches that layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dume.shared.errors import DumeError
from dume.shared.method.routers import ContributionStatistics


def spill_contribution(directory: Path, node: str, dataset: str, packed: torch.Tensor) -> ContributionStatistics:
    """Writes ``packed`` (layers, triangle), float64, under ``directory`` (a folder of its own per contribution)
    and returns the contribution that reads it back, one layer per read."""
    folder = directory / f"{len(list(directory.iterdir())):05d}"
    folder.mkdir()
    for layer in range(len(packed)):  # Python's file I/O: a full disk is an OSError (ENOSPC), numpy's has no errno
        with open(folder / f"{layer}.f64", "wb") as file:
            file.write(memoryview(packed[layer].contiguous().numpy()).cast("B"))

    def read_layer_into(layer: int, out: torch.Tensor) -> None:
        with open(folder / f"{layer}.f64", "rb", buffering=0) as file:
            if file.readinto(memoryview(out.numpy()).cast("B")) != out.nbytes or file.read(1):
                raise DumeError(f"the spilled statistics {folder / f'{layer}.f64'} changed size: run the merge again")

    return ContributionStatistics(node, dataset, len(packed), packed.shape[-1], read_layer_into)
