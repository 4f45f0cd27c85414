"""The plain settings a command line parses, kept free of torch so that ``--help`` and argument checks answer at
once (the modules that use them import torch; this one must not)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Routing accuracy is flat for rho in [1e-6, 1e-2] and falls from 1e-1 on (benchmarks/rho_sweep.py); 1e-3 sits a
# decade inside that plateau while keeping G + lambda I well conditioned.
DEFAULT_RHO = 1e-3

# The precisions a model may run in (``--dtype``); placement maps them to torch dtypes.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ExpertSpec:
    """One member of a merge: its name, its model directory and its data (a str or a Path each)."""

    name: str
    model_dir: Path
    data_path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "data_path", Path(self.data_path))


@dataclass(frozen=True)
class MergeSettings:
    """Everything that changes the output bytes besides the experts and their data."""

    top_k: int = 1
    rho: float = DEFAULT_RHO
    router_bias: bool = False
    normalize: bool = True
    temperature: float = 1.0
    sequence_length: int = 256
    batch_size: int = 8


TRAINABLE = ("all", "mlp")


@dataclass(frozen=True)
class TrainSettings:
    """How ``dume-node train`` fine-tunes an expert from the base."""

    steps: int = 200
    learning_rate: float = 3e-3
    batch_size: int = 16
    sequence_length: int = 128
    seed: int = 0
    trainable: str = "mlp"  # the "mlp" weights only (DUME keeps them per expert), or "all" parameters
    device: str = "cpu"  # where the model trains (e.g. "cuda"); it is saved from the CPU either way
