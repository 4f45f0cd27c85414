"""From experts' contributions to the routers and the checkpoint's ``dume`` block, in one step.

``dume merge`` and the coordinator's publisher both call ``solve_for_checkpoint``, so the block that records what a
version is (members, basis, lambda per layer, settings, exact or provisional) is built in one place, and an exact
federated version and a local merge of the same members cannot drift apart.

The solve goes one layer at a time: each contribution is a reader of one layer's packed triangle, so the statistics
in memory at once are one layer's (the total, one expert's sum, one triangle being read), whatever the number of
layers, experts or contributions. The additions are those of summing whole tensors, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dume.shared.errors import DumeError
from dume.shared.method.ridge import NO_STATISTICS, LayerRouter, check_router_settings, packed_system, solve_system
from dume.shared.method.settings import MergeSettings
from dume.shared.method.statistics import gram_size, last_column

# What every expert's statistics are scaled to with ``expert_weighting="equal"``. Only the experts' relative weights
# reach the routers (lambda scales with G, and columns are L2-normalised); a round number keeps G's magnitude usual.
TOKEN_BUDGET = 1_000_000.0

# (layer, out): fills ``out`` (float64, the triangle's size) with that layer's packed upper triangle of G
LayerReader = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class ContributionStatistics:
    """One contribution's G (one node's statistics of one named dataset), read one layer's packed triangle (the
    layout of ``upper_triangle``) at a time: from its blobs in the coordinator, from the computed statistics in
    ``dume merge``. Each read fills a buffer the solve reuses, so reading costs no fresh memory."""

    node: str
    dataset: str
    layers: int
    triangle_entries: int  # of one layer's packed triangle: (d+1)(d+2)/2
    read_layer_into: LayerReader

    @property
    def label(self) -> str:
        return contribution_label(self.node, self.dataset)


def packed_contribution(node: str, dataset: str, packed: torch.Tensor) -> ContributionStatistics:
    """A contribution whose packed statistics (layers, triangle) are in memory."""
    return ContributionStatistics(node, dataset, len(packed), packed.shape[-1],
                                  lambda layer, out: out.copy_(packed[layer]))


@dataclass(frozen=True)
class ExpertStatistics:
    """An expert's contributions in the canonical order (node, then dataset). Its G is their sum, formed one layer
    at a time (``layer``), so no more than one layer of it is ever in memory."""

    contributions: tuple[ContributionStatistics, ...]

    @property
    def layers(self) -> int:
        return self.contributions[0].layers

    @property
    def triangle_entries(self) -> int:
        return self.contributions[0].triangle_entries

    def layer(self, index: int, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, int]]:
        """This expert's packed G of layer ``index``, its contributions' triangles summed in canonical order, one
        read at a time, and the token count each recorded ("node/dataset" -> tokens, in that order). The sum is
        formed in ``out`` and each further contribution read into ``scratch`` (float64 buffers of the triangle's
        size, overwritten; new ones when not given)."""
        counts = {}
        for position, contribution in enumerate(self.contributions):
            if position == 0:
                total = out if out is not None else torch.empty(contribution.triangle_entries, dtype=torch.float64)
                triangle = total
            else:
                triangle = scratch if scratch is not None else torch.empty_like(total)
                scratch = triangle
            contribution.read_layer_into(index, triangle)
            counts[contribution.label] = packed_token_count(triangle)
            if position > 0:
                total += triangle
        return total, counts


def contribution_label(node: str, dataset: str) -> str:
    return f"{node}/{dataset}"


def packed_token_count(triangle: torch.Tensor) -> int:
    """The token count one layer's packed triangle records (its last entry)."""
    return int(round(float(triangle[-1])))


def sum_contributions(contributions: Iterable[ContributionStatistics]) -> ExpertStatistics | None:
    """An expert's statistics from its contributions in the canonical order (node, then dataset) whatever order
    they come in: the same contributions always give the same bytes, so a contribution taken out gives exactly the
    sum it was never in. None without contributions."""
    ordered = tuple(sorted(contributions, key=lambda contribution: (contribution.node, contribution.dataset)))
    if not ordered:
        return None
    if len({contribution.layers for contribution in ordered}) > 1:
        raise DumeError(f"the contributions {', '.join(c.label for c in ordered)} have statistics of different "
                        "numbers of layers: they must come from one architecture")
    if len({contribution.triangle_entries for contribution in ordered}) > 1:
        raise DumeError(f"the contributions {', '.join(c.label for c in ordered)} have statistics of different "
                        "hidden sizes: they must come from one architecture")
    return ExpertStatistics(ordered)


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
    check_router_settings(settings.rho, settings.temperature)
    routed = tuple(sorted(name for name, expert in statistics.items() if expert is not None))
    if not routed:
        raise DumeError(NO_STATISTICS)
    layers = {statistics[name].layers for name in routed}
    if len(layers) > 1:
        raise DumeError(f"the experts' statistics cover different numbers of layers ({sorted(layers)}): they must "
                        "come from one architecture")
    if len({statistics[name].triangle_entries for name in routed}) > 1:
        raise DumeError("the experts' statistics are of different hidden sizes: they must come from one architecture")
    buffers = LayerBuffers.for_triangle(statistics[routed[0]].triangle_entries)
    routers, token_counts, contributions = [], {}, {}
    for layer in range(layers.pop()):
        router, counts = solve_layer_from_packed(layer, {name: statistics[name] for name in routed}, settings,
                                                 buffers)
        routers.append(router)
        if layer == 0:
            token_counts = {name: tokens for name, (tokens, _) in counts.items()}
            contributions = {name: by_label for name, (_, by_label) in counts.items()}
    without = sorted(name for name, expert in statistics.items() if expert is None)
    exact = not stale and not without
    top_k = min(settings.top_k, len(routed))  # at most the experts routed to while some have no statistics yet
    block: dict[str, Any] = {
        "members": list(routed),
        "members_without_statistics": without,
        "basis_hash": basis_hash,
        "exact": exact,
        "token_counts": token_counts,
        "contributions": contributions,
        "ridge_lambda": [router.ridge_lambda for router in routers],
        "column_normalization": "l2" if settings.normalize else "none",
        **asdict(settings),
        "top_k": top_k,
    }
    if not exact:
        block["stale_statistics"] = sorted(stale)
    return SolvedRouters(routers, top_k, block)


@dataclass(frozen=True)
class LayerBuffers:
    """The packed triangles a layer's solve fills, reused from layer to layer: the total over experts, one expert's
    sum, and one contribution being read. Memory used again costs no page faults, and none of it is zeroed."""

    total: torch.Tensor
    expert: torch.Tensor
    scratch: torch.Tensor

    @classmethod
    def for_triangle(cls, entries: int) -> LayerBuffers:
        return cls(*(torch.empty(entries, dtype=torch.float64) for _ in range(3)))


def solve_layer_from_packed(layer: int, statistics: Mapping[str, ExpertStatistics], settings: MergeSettings,
                            buffers: LayerBuffers | None = None
                            ) -> tuple[LayerRouter, dict[str, tuple[int, dict[str, int]]]]:
    """Layer ``layer``'s router: each expert's packed G of the layer (its contributions summed in canonical order),
    added in sorted expert order into the total, whose lower triangle alone is copied out, into the one matrix the
    Cholesky factorisation overwrites. These are the additions of summing whole (layers, d+1, d+1) tensors, and the
    factor is that of the same lower triangle, so the bytes are the same. Also returns each expert's token count
    and its contributions' (what the layer's triangles record)."""
    experts = tuple(sorted(statistics))
    if buffers is None:
        buffers = LayerBuffers.for_triangle(statistics[experts[0]].triangle_entries)
    targets, counts = [], {}
    for position, name in enumerate(experts):
        # the first expert's sum is formed in the total itself, as adding whole tensors starts from it
        gram, by_label = statistics[name].layer(layer, buffers.total if position == 0 else buffers.expert,
                                                buffers.scratch)
        size = gram_size(gram[None])
        counts[name] = (packed_token_count(gram), by_label)
        if settings.expert_weighting == "equal":  # every expert's data weighs as TOKEN_BUDGET tokens
            gram.mul_(TOKEN_BUDGET / counts[name][0])
        targets.append(gram[last_column(size)])  # expert j's X^T Y (and its count): a copy
        if position > 0:
            buffers.total.add_(gram)
    system = packed_system(buffers.total, settings.router_bias)
    router = solve_system(layer, system, torch.stack(targets, dim=1)[:system.shape[0]], experts, settings.rho,
                          settings.router_bias, settings.normalize, settings.temperature)
    return router, counts
