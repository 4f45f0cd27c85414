"""From experts' contributions to the routers and the checkpoint's ``dume`` block, in one step.

``dume merge`` and the coordinator's publisher both call ``solve_for_checkpoint``, so the block that records what a
version is (members, basis, lambda per layer, settings, exact or provisional) is built in one place, and an exact
federated version and a local merge of the same members cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dume.shared.method.ridge import LayerRouter, solve_routers
from dume.shared.method.settings import MergeSettings
from dume.shared.method.statistics import token_count


@dataclass(frozen=True)
class ExpertStatistics:
    """An expert's G, the sum of its contributions, and each contribution's token count ("node/dataset" -> tokens,
    in the order they were summed)."""

    gram: torch.Tensor  # (layers, d+1, d+1), float64
    contributions: dict[str, int]


def contribution_label(node: str, dataset: str) -> str:
    return f"{node}/{dataset}"


def sum_contributions(contributions: Iterable[tuple[str, str, Callable[[], torch.Tensor]]]) -> ExpertStatistics | None:
    """An expert's G from its contributions ``(node, dataset, load G)``, summed in the canonical order (node, then
    dataset) whatever order they come in, one loaded at a time. The same contributions always give the same bytes,
    so a contribution taken out gives exactly the sum it was never in. None without contributions."""
    total, counts = None, {}
    for node, dataset, load in sorted(contributions, key=lambda item: (item[0], item[1])):
        gram = load().to(torch.float64)
        counts[contribution_label(node, dataset)] = token_count(gram)
        if total is None:
            total = gram.clone()
        else:
            total += gram
        del gram
    return ExpertStatistics(total, counts) if total is not None else None


@dataclass(frozen=True)
class SolvedRouters:
    """The routers of every layer, the top-k the checkpoint declares, and its ``dume`` block."""

    routers: list[LayerRouter]
    top_k: int
    dume_block: dict[str, Any]


def solve_for_checkpoint(statistics: Mapping[str, ExpertStatistics | None], settings: MergeSettings, basis_hash: str,
                         stale: Sequence[str] = ()) -> SolvedRouters:
    """Routers from each expert's statistics (None: no contribution yet, masked out of routing) and the ``dume``
    block.

    ``stale`` names the contributions ("node/dataset") computed under another basis than ``basis_hash`` or other
    weights of their expert. The version is exact when no contribution is stale and every expert has one.
    """
    grams = {name: (expert.gram if expert is not None else None) for name, expert in statistics.items()}
    routers = solve_routers(grams, settings.rho, settings.router_bias, settings.normalize, settings.temperature)
    routed = list(routers[0].experts)
    without = sorted(name for name, gram in grams.items() if gram is None)
    exact = not stale and not without
    top_k = min(settings.top_k, len(routed))  # at most the experts routed to while some have no statistics yet
    block: dict[str, Any] = {
        "members": routed,
        "members_without_statistics": without,
        "basis_hash": basis_hash,
        "exact": exact,
        "token_counts": {name: token_count(grams[name]) for name in routed},
        "contributions": {name: statistics[name].contributions for name in routed},
        "ridge_lambda": [router.ridge_lambda for router in routers],
        "column_normalization": "l2" if settings.normalize else "none",
        **asdict(settings),
        "top_k": top_k,
    }
    if not exact:
        block["stale_statistics"] = sorted(stale)
    return SolvedRouters(routers, top_k, block)
