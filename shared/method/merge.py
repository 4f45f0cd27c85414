"""The whole method on one machine: N dense experts and their data in, one MoE checkpoint out.

Read this file top to bottom to read the method:

1. open and cross-check the experts (one family, one architecture, the same tensors);
2. the basis: every shared parameter averaged over the experts (``averaging``);
3. each expert's statistics ``G = sum [x;1][x;1]^T`` of its own data, through its own model with the shared
   parameters swapped for the basis (``statistics``);
4. the routers by ridge regression from the summed statistics, and the checkpoint's ``dume`` block (``routers``);
5. the checkpoint: averaged shared parameters, one expert per member, the routers (``writer``).

This is the reference the federated path must reproduce bit for bit. Everything a user can get wrong is checked
before any heavy work, and the output directory appears only complete.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from dume.shared.errors import DumeError
from dume.shared.files import check_free, disk_full_is_one_line, staged_directory
from dume.shared.method.averaging import lazy_basis, tensors_hash
from dume.shared.method.data import DocumentStream, check_documents, load_tokenizer
from dume.shared.method.distributed_statistics import (
    StatisticsTask,
    check_processes,
    packed_statistics_of,
    writes_output,
)
from dume.shared.method.expert import ExpertDirectory
from dume.shared.method.families import check_same_architecture
from dume.shared.method.lazy_tensors import LazyTensors, file_tensors
from dume.shared.method.placement import CPU, Placement
from dume.shared.method.routers import ExpertStatistics, packed_contribution, solve_for_checkpoint, sum_contributions
from dume.shared.method.settings import ExpertSpec, MergeSettings, check_name
from dume.shared.method.statistics import check_enough_tokens
from dume.shared.method.statistics_spill import spill_contribution
from dume.shared.method.tensor_file import write_tensors
from dume.shared.method.writer import write_moe_checkpoint

# What to do about a full disk beside --out, where the merge writes its spill (basis, statistics) and its output.
MERGE_DISK_FULL = "free space there, or choose an --out on a disk with room, and run the merge again"


def check_member_name(name: str) -> str:
    return check_name(name, "member name")


def open_experts(specs: list[ExpertSpec]) -> dict[str, ExpertDirectory]:
    """Open and cross-check every expert: same family, same config, same tensors."""
    names = [check_member_name(spec.name) for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DumeError(f"member name {duplicates[0]!r} is given twice: give each expert its own name")
    experts = {spec.name: ExpertDirectory(spec.model_dir, spec.name) for spec in specs}
    check_same_architecture({name: expert.config for name, expert in experts.items()})
    reference_name = min(experts)
    reference = experts[reference_name].tensor_layout()
    for name, expert in sorted(experts.items()):
        layout = expert.tensor_layout()
        for tensor in sorted(set(reference) | set(layout)):
            if reference.get(tensor, (None,))[0] != layout.get(tensor, (None,))[0]:
                raise DumeError(
                    f"experts {reference_name!r} and {name!r} differ in tensor {tensor} "
                    f"({reference.get(tensor, ('missing',))[0]} vs {layout.get(tensor, ('missing',))[0]}): "
                    "all experts must share one architecture"
                )
    return experts


def merge(specs: Sequence[ExpertSpec], out_dir: str | Path, settings: MergeSettings = MergeSettings(),
          placement: Placement = CPU, max_tokens: int | None = None, nproc: int = 1) -> Path:
    """Build the DUME checkpoint for ``specs`` into ``out_dir`` (which must not exist or be empty); the statistics'
    forward passes run where ``placement`` says, over at most ``max_tokens`` of each expert's data, in ``nproc``
    worker processes (see ``distributed_statistics``: the bytes depend on ``nproc``). Started by torchrun, every
    rank runs this and collects its share of the statistics; only rank 0 writes ``out_dir``. A full disk beside
    ``out_dir`` (the spill, the output) is one DumeError naming the folder, with nothing left there."""
    specs, out_dir = list(specs), Path(out_dir)
    if not specs:
        raise DumeError("no experts given: pass --expert NAME=MODEL_DIR:DATA[,DATA...] at least once")
    if not 1 <= settings.top_k <= len(specs):
        raise DumeError(f"top-k {settings.top_k} is out of range: use 1 to {len(specs)} (the number of experts)")
    check_processes(nproc, placement)
    if not writes_output():  # a torchrun rank other than 0: its share of the statistics, then rank 0 writes
        experts = open_experts(specs)
        # Averaged a tensor at a time as each model loads it (the bytes of rank 0's spilled basis): no copy on this
        # host's disk, never whole in memory; averaged again for each dataset, a small cost beside its forward.
        member_statistics(specs, experts, lazy_basis(experts), settings, placement, max_tokens)
        return out_dir
    check_free(out_dir)
    experts = open_experts(specs)
    with disk_full_is_one_line(out_dir.parent, MERGE_DISK_FULL), staged_directory(out_dir) as staging:
        with spill_directory(out_dir) as spill, spilled_basis(experts, spill) as basis:
            statistics = member_statistics(specs, experts, basis, settings, placement, max_tokens, spill, nproc)
            solved = solve_for_checkpoint(statistics, settings, tensors_hash(basis))
        write_moe_checkpoint(staging, experts, solved.routers, solved.top_k, solved.dume_block)
    return out_dir


@contextmanager
def spill_directory(out_dir: Path) -> Iterator[Path]:
    """A hidden folder beside ``out_dir`` for the statistics until the routers are solved; removed in any case."""
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.statistics-", dir=out_dir.parent) as spill:
        yield Path(spill)


@contextmanager
def spilled_basis(experts: dict[str, ExpertDirectory], spill: Path) -> Iterator[LazyTensors]:
    """The basis averaged into the spill folder a tensor at a time, then read from there a tensor at a time: merge
    never holds it whole (an 8B model's shared weights are 4.7 GB) and averages it once for every expert. The
    mapping names its file, so ``--nproc`` workers read this one too rather than a second copy."""
    path = spill / "basis.safetensors"
    write_tensors(lazy_basis(experts), path)
    with file_tensors(path) as basis:
        yield basis


def member_statistics(specs: list[ExpertSpec], experts: dict[str, ExpertDirectory], basis: Mapping[str, torch.Tensor],
                      settings: MergeSettings, placement: Placement = CPU,
                      max_tokens: int | None = None, spill: Path | None = None,
                      nproc: int = 1) -> dict[str, ExpertStatistics]:
    """Every expert's statistics under ``basis``: one packed G per dataset (as a node computes and uploads each of
    its datasets), kept packed (half of full matrices) and summed in canonical order one layer at a time by the
    solve. With ``spill`` (a folder) each is written there as soon as it is collected and read back layer by layer,
    so memory holds one dataset's statistics at a time, not all of them. Every data file and tokenizer is checked
    first, so bad data fails before any forward pass."""
    contributions = {spec.name: spec.contributions() for spec in specs}
    for spec in specs:
        for dataset in contributions[spec.name]:
            check_documents(dataset.path)
        load_tokenizer(spec.model_dir)
    runs = []  # (expert, node, dataset, task) in canonical order
    for name in sorted(experts):
        spec = next(spec for spec in specs if spec.name == name)
        tokenizer = load_tokenizer(spec.model_dir)
        for dataset in sorted(contributions[name], key=lambda dataset: (dataset.node, dataset.name)):
            stream = DocumentStream(dataset.path, tokenizer, settings.sequence_length, max_tokens)
            runs.append((name, dataset.node, dataset.name, StatisticsTask(experts[name], stream)))
    collected: dict[str, list] = {name: [] for name in experts}
    results = packed_statistics_of([task for *_, task in runs], basis, settings.batch_size, placement, nproc, spill)
    for (name, node, dataset, _), packed in zip(runs, results, strict=True):  # strict: runs the generator out
        if packed is None:  # a torchrun rank other than 0: its share went to rank 0
            continue
        check_enough_tokens(packed, f"{node}/{dataset}")
        collected[name].append(packed_contribution(node, dataset, packed) if spill is None
                               else spill_contribution(spill, node, dataset, packed))
        del packed
    return {name: sum_contributions(collected[name]) for name in sorted(experts)}
