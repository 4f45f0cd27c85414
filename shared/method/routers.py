"""From members' statistics to the routers and the checkpoint's ``dume`` block, in one step.

``dume merge`` and the coordinator's publisher both call ``solve_for_checkpoint``, so the block that records what a
version is (members, basis, lambda per layer, settings, exact or provisional) is built in one place, and an exact
federated version and a local merge of the same members cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dume.shared.method.ridge import LayerRouter, solve_routers
from dume.shared.method.settings import MergeSettings
from dume.shared.method.statistics import token_count


@dataclass(frozen=True)
class SolvedRouters:
    """The routers of every layer, the top-k the checkpoint declares, and its ``dume`` block."""

    routers: list[LayerRouter]
    top_k: int
    dume_block: dict[str, Any]


def solve_for_checkpoint(statistics: Mapping[str, torch.Tensor | None], settings: MergeSettings, basis_hash: str,
                         stale: Sequence[str] = ()) -> SolvedRouters:
    """Routers from each member's G (None: no statistics yet, masked out of routing) and the ``dume`` block.

    ``stale`` names members whose statistics were computed under another basis than ``basis_hash``. The version is
    exact when no member is stale or without statistics.
    """
    routers = solve_routers(statistics, settings.rho, settings.router_bias, settings.normalize, settings.temperature)
    routed = list(routers[0].experts)
    without = sorted(name for name, gram in statistics.items() if gram is None)
    exact = not stale and not without
    top_k = min(settings.top_k, len(routed))  # at most the experts routed to while some have no statistics yet
    block: dict[str, Any] = {
        "members": routed,
        "members_without_statistics": without,
        "basis_hash": basis_hash,
        "exact": exact,
        "token_counts": {name: token_count(statistics[name]) for name in routed},
        "ridge_lambda": [router.ridge_lambda for router in routers],
        "column_normalization": "l2" if settings.normalize else "none",
        **asdict(settings),
        "top_k": top_k,
    }
    if not exact:
        block["stale_statistics"] = sorted(stale)
    return SolvedRouters(routers, top_k, block)
