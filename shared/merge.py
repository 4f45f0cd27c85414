"""The whole method on one machine: N dense experts and their data in, one MoE checkpoint out.

This is the reference the federated path must reproduce bit for bit: basis = canonical mean of the shared
parameters, each member's statistics under that basis, routers by ridge regression, checkpoint by the writer.
Everything a user can get wrong is checked before any heavy work, and the output directory appears only complete.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dume.shared.architectures import check_same_architecture
from dume.shared.averaging import compute_basis, tensors_hash
from dume.shared.data import PackedData, load_tokenizer, pack_documents, read_documents
from dume.shared.errors import DumeError
from dume.shared.expert import ExpertDirectory, load_dense_model, overwrite_parameters
from dume.shared.ridge import DEFAULT_RHO, LayerRouter, solve_routers
from dume.shared.staging import check_free, staged_directory
from dume.shared.statistics import collect_statistics, token_count
from dume.shared.writer import write_moe_checkpoint

MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    model_dir: Path
    data_path: Path


def check_member_name(name: str) -> str:
    if not MEMBER_NAME.match(name):
        raise DumeError(
            f"member name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return name


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


def member_statistics(
    expert: ExpertDirectory, basis: dict[str, torch.Tensor], data: PackedData, batch_size: int
) -> torch.Tensor:
    """One member's G under ``basis``: its own model with the shared parameters swapped for the basis."""
    model = load_dense_model(expert)
    overwrite_parameters(model, basis)
    return collect_statistics(model, data, batch_size, description=f"statistics {expert.name}")


def merge(specs: list[ExpertSpec], out_dir: Path, settings: MergeSettings = MergeSettings()) -> Path:
    """Build the DUME checkpoint for ``specs`` into ``out_dir`` (which must not exist or be empty)."""
    if not specs:
        raise DumeError("no experts given: pass --expert NAME=MODEL_DIR:DATA_PATH at least once")
    if not 1 <= settings.top_k <= len(specs):
        raise DumeError(f"top-k {settings.top_k} is out of range: use 1 to {len(specs)} (the number of experts)")
    check_free(out_dir)
    experts = open_experts(specs)
    with staged_directory(out_dir) as staging:
        _build(specs, experts, staging, settings)
    return out_dir


def solve_member_routers(
    specs: list[ExpertSpec], experts: dict[str, ExpertDirectory], basis: dict[str, torch.Tensor],
    settings: MergeSettings,
) -> tuple[dict[str, torch.Tensor], list[LayerRouter]]:
    """Every member's statistics under ``basis`` (data read and packed first, so bad data fails early), and the
    routers solved from them."""
    packed = {}
    for spec in sorted(specs, key=lambda spec: spec.name):
        tokenizer = load_tokenizer(spec.model_dir)
        packed[spec.name] = pack_documents(read_documents(spec.data_path), tokenizer, settings.sequence_length)
    statistics = {
        name: member_statistics(experts[name], basis, packed[name], settings.batch_size) for name in sorted(experts)
    }
    routers = solve_routers(statistics, settings.rho, settings.router_bias, settings.normalize, settings.temperature)
    return statistics, routers


def _build(specs: list[ExpertSpec], experts: dict[str, ExpertDirectory], out_dir: Path, settings: MergeSettings):
    basis = compute_basis(experts)
    statistics, routers = solve_member_routers(specs, experts, basis, settings)
    dume_block = {
        "members": list(routers[0].experts),
        "members_without_statistics": [],
        "basis_hash": tensors_hash(basis),
        "exact": True,
        "token_counts": {name: token_count(gram) for name, gram in sorted(statistics.items())},
        "ridge_lambda": [router.ridge_lambda for router in routers],
        "column_normalization": "l2" if settings.normalize else "none",
        **asdict(settings),
    }
    write_moe_checkpoint(out_dir, experts, routers, settings.top_k, dume_block)
