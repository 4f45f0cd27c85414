"""Resumable statistics: the float64 partial sums and the position in the data, saved now and then beside the
statistics' output, so that a node killed or rebooted in the middle of a long run resumes where it stopped.

A checkpoint is a safetensors file holding the packed accumulator (one F64 tensor per layer, as in the final
layout) and, in its metadata, a fingerprint of the inputs and how many batches and tokens the sums cover. It is
written atomically (a kill leaves the previous checkpoint or the new one, never half of one) and a layer at a time
(no second copy of the sums). Only a run whose fingerprint matches uses it; one made from other inputs is ignored
and replaced. Resuming reads the data stream again up to the saved batch without running the model, so the sums
go on exactly as an uninterrupted run's would: the result is bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dume.shared.files import atomic_path
from dume.shared.method.settings import CHECKPOINT_EVERY_SECONDS
from dume.shared.method.shard_layout import ShardTensor, shard_header, shard_order

log = logging.getLogger("dume.statistics")

FORMAT = "dume-statistics-checkpoint-1"


@dataclass(frozen=True)
class Position:
    """How far into the data the saved sums reach: batches and real tokens consumed."""

    batches: int = 0
    tokens: int = 0


def fingerprint(parts: object) -> str:
    """A short hash of everything the statistics depend on (JSON-serialisable ``parts``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_stamps(paths: list[Path]) -> list[tuple[str, int, int]]:
    """Name, size and modification time of each file: a change to any of them changes the fingerprint."""
    stamps = []
    for path in sorted(paths):
        status = path.stat()
        stamps.append((str(path.resolve()), status.st_size, status.st_mtime_ns))
    return stamps


@dataclass
class StatisticsCheckpoint:
    """Where and how often a statistics run saves its partial sums.

    ``inputs`` names what the statistics code cannot see for itself, typically the basis hash; the model files,
    the data files and the settings are fingerprinted by the run. A checkpoint is saved every ``every_seconds``
    and, if set, every ``every_batches`` batches, and removed when the run completes.
    """

    path: Path
    inputs: str
    every_seconds: float = CHECKPOINT_EVERY_SECONDS
    every_batches: int | None = None
    _last_save: float = field(default_factory=time.monotonic, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.every_seconds <= 0 or (self.every_batches is not None and self.every_batches < 1):
            raise ValueError("a statistics checkpoint needs a positive interval")

    def restore(self, inputs_fingerprint: str, accumulators: Mapping[str, torch.Tensor]) -> Position:
        """Fills ``accumulators`` from the checkpoint and returns its position, or leaves them as they are and
        returns the start when there is no usable checkpoint (none, another run's, or unreadable)."""
        self._last_save = time.monotonic()
        if not self.path.is_file():
            return Position()
        try:
            with safe_open(self.path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != FORMAT or metadata.get("fingerprint") != inputs_fingerprint:
                    log.warning("ignoring the statistics checkpoint %s: it was made from other inputs", self.path)
                    return Position()
                if set(handle.keys()) != set(accumulators) or any(
                        tuple(handle.get_slice(name).get_shape()) != tuple(tensor.shape)
                        for name, tensor in accumulators.items()):
                    log.warning("ignoring the statistics checkpoint %s: its tensors do not fit this run", self.path)
                    return Position()
                position = Position(int(metadata["batches"]), int(metadata["tokens"]))
                try:
                    for name, tensor in accumulators.items():
                        tensor.copy_(handle.get_tensor(name))
                except BaseException:
                    for tensor in accumulators.values():
                        tensor.zero_()
                    raise
        except (OSError, SafetensorError, ValueError, KeyError) as error:
            log.warning("ignoring the statistics checkpoint %s: cannot read it (%s)", self.path, error)
            return Position()
        log.warning("resuming statistics from %s at batch %d (%d tokens done)", self.path, position.batches,
                    position.tokens)
        return position

    def due(self, batches: int) -> bool:
        """Whether to save after ``batches`` batches."""
        if self.every_batches is not None and batches % self.every_batches == 0:
            return True
        return time.monotonic() - self._last_save >= self.every_seconds

    def save(self, accumulators: Mapping[str, torch.Tensor], position: Position, inputs_fingerprint: str) -> None:
        """Replaces the checkpoint atomically, writing one tensor at a time (one layer's copy off a GPU)."""
        layout = [ShardTensor(name, "F64", tuple(tensor.shape), tensor.numel() * 8)
                  for name, tensor in accumulators.items()]
        metadata = {"format": FORMAT, "fingerprint": inputs_fingerprint, "batches": str(position.batches),
                    "tokens": str(position.tokens)}
        with atomic_path(self.path) as partial, open(partial, "wb") as handle:
            handle.write(shard_header(layout, metadata))
            for tensor in shard_order(layout):
                handle.write(accumulators[tensor.name].detach().cpu().contiguous().numpy().data)
        self._last_save = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
