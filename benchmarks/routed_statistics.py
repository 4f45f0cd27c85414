"""Router statistics from the merged model's own forward pass instead of each member's oracle path.

DUME collects a member's statistics with every layer's MLP being that member's expert (the oracle path), so a
layer's router learns the hidden states that follow the member's own expert in the layers before it. In the merged
model a token misrouted early carries another expert's output into the next layers, where the router has not seen
such states, and the mistake spreads. Here each layer's statistics are collected through the merged model routed by
the routers already solved for the layers before it, one layer at a time (``layer_by_layer``), or for every layer
at once through the first model (one refinement round); ``solve`` turns statistics into routers (ridge or LDA).
Measured here, not (yet) in the product.
"""

from __future__ import annotations

from collections.abc import Callable

from dume.shared.method.data import PackedData
from dume.shared.method.ridge import LayerRouter
from dume.shared.method.routing import build_routed_model
from dume.shared.method.statistics import collect_statistics

Solver = Callable[[dict], list[LayerRouter]]  # members' statistics -> one router per layer


def refined_routers(experts: dict, basis: dict, start: list[LayerRouter], data: dict[str, PackedData],
                    solve: Solver, layer_by_layer: bool = False) -> list[LayerRouter]:
    routers = list(start)
    layers = range(len(routers)) if layer_by_layer else [None]
    for layer in layers:
        model = build_routed_model(experts, basis, routers, top_k=1).eval()
        solved = solve({name: collect_statistics(model, packed) for name, packed in sorted(data.items())})
        if layer is None:
            routers = solved
        else:
            routers[layer] = solved[layer]
    return routers
