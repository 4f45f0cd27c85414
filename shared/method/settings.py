"""The plain settings a command line parses, kept free of torch so that ``--help`` and argument checks answer at
once (the modules that use them import torch; this one must not)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dume.shared.errors import DumeError

# Routing accuracy is flat for rho in [1e-6, 1e-2] and falls from 1e-1 on (benchmarks/rho_sweep.py); 1e-3 sits a
# decade inside that plateau while keeping G + lambda I well conditioned.
DEFAULT_RHO = 1e-3

# The precisions a model may run in (``--dtype``); placement maps them to torch dtypes.
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# How experts weigh in the router solve (``MergeSettings.expert_weighting``). "equal" is the default: on the quality
# benchmark it keeps as much of the experts as "tokens" with honest data and more when one member holds ten times
# the others' data, and a member repeating its data buys nothing (docs/limits.md, "Router capture").
EXPERT_WEIGHTINGS = ("tokens", "equal")
DEFAULT_EXPERT_WEIGHTING = "equal"
# What a federation initialised before the setting existed solved with: its settings keep it (state_dir).
LEGACY_EXPERT_WEIGHTING = "tokens"


# The name of a dataset given without one (``--data PATH``): a node or expert with one dataset needs no names.
DEFAULT_DATASET = "default"
CHECKPOINT_EVERY_SECONDS = 600.0  # a statistics run saves its sums this often: at most that much work lost to a kill
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, what: str = "member name") -> str:
    """Node, expert and dataset names: 1-64 letters, digits, '.', '_' or '-', starting alphanumeric."""
    if not NAME_PATTERN.fullmatch(name):  # match() would take a trailing newline after $
        raise DumeError(f"{what} {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting "
                        "alphanumeric")
    return name


@dataclass(frozen=True)
class DatasetSpec:
    """One contribution's data: a named dataset of one node (the expert's owner when ``node`` is "")."""

    name: str
    path: Path
    node: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


def parse_dataset(text: str) -> DatasetSpec:
    """``[[NODE/]NAME=]PATH``: a dataset, optionally named and attributed to a node. The part before the first '='
    names it only when it is a valid name (or NODE/NAME), so a path that holds an '=' still reads as a path."""
    label, equals, path = text.partition("=")
    node, slash, name = label.rpartition("/")
    if equals and path and NAME_PATTERN.fullmatch(name) and (not slash or NAME_PATTERN.fullmatch(node)):
        return DatasetSpec(name, Path(path), node)
    return DatasetSpec(DEFAULT_DATASET, Path(text))


def check_unique_datasets(datasets: Sequence[DatasetSpec], owner: str) -> None:
    """Refuses a dataset name given twice for one node (the second would replace the first's statistics)."""
    seen: set[tuple[str, str]] = set()
    for dataset in datasets:
        key = (dataset.node or owner, dataset.name)
        if key in seen:
            raise DumeError(f"dataset name {dataset.name!r} is given twice for node {key[0]!r}: name each dataset, "
                            f"e.g. notes2025=PATH")
        seen.add(key)


@dataclass(frozen=True)
class ExpertSpec:
    """One expert of a merge: its name, its model directory and its data: ``data_path`` (one dataset named
    ``default``) or ``datasets`` (several, each named, possibly of other nodes feeding this expert)."""

    name: str
    model_dir: Path
    data_path: Path | None = None
    datasets: tuple[DatasetSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.data_path is not None:
            object.__setattr__(self, "data_path", Path(self.data_path))
        object.__setattr__(self, "datasets", tuple(self.datasets))

    def contributions(self) -> list[DatasetSpec]:
        """Every dataset with its node named, in the canonical order statistics are summed in: (node, dataset)."""
        given = list(self.datasets) or ([DatasetSpec(DEFAULT_DATASET, self.data_path)] if self.data_path else [])
        if not given:
            raise DumeError(f"expert {self.name!r} has no data: give NAME=MODEL_DIR:DATA[,DATA...]")
        check_unique_datasets(given, self.name)
        return sorted((DatasetSpec(d.name, d.path, d.node or self.name) for d in given),
                      key=lambda d: (d.node, d.name))


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
    # How much each expert's statistics weigh in the ridge system: "equal" (each expert's G scaled to the same token
    # budget, so declaring more data, or the same data repeated, buys no more of the solve) or "tokens" (as
    # collected: an expert's share grows with the tokens it declares, the method as published); docs/limits.md.
    expert_weighting: str = DEFAULT_EXPERT_WEIGHTING

    def __post_init__(self) -> None:
        if self.expert_weighting not in EXPERT_WEIGHTINGS:
            raise DumeError(f"expert weighting {self.expert_weighting!r} is not one of {', '.join(EXPERT_WEIGHTINGS)}")


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
