"""The closed-form router: ridge regression from summed statistics, one layer at a time.

With ``G = sum_j G_j`` over the members that have statistics and ``B`` the matrix whose column j is the last
column of ``G_j`` (member j's feature sum and token count, i.e. X^T Y for its one-hot target):

    W~ = (G + lambda I)^-1 B,        lambda = rho * trace(G) / dim(G)       (Cholesky, float64)

With ``router_bias`` the system is the full (d+1)x(d+1) one and the last row of W~ is the intercept; without it,
only the d x d block ``X^T X`` and the first d rows of B are used, so the router is a stock bias-free linear map.
Each expert's column (and its intercept) is then divided by the column's L2 norm, so a logit is a signed
distance to that expert's hyperplane, and by the temperature. Members without statistics get no column: they
are masked out of routing rather than given a zero logit that could win.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dume.shared.errors import DumeError
from dume.shared.method.settings import DEFAULT_RHO


@dataclass(frozen=True)
class LayerRouter:
    """One layer's router: ``logits = weight @ x + bias`` over ``experts`` (in that order)."""

    experts: tuple[str, ...]
    weight: torch.Tensor  # (experts, d), float64
    bias: torch.Tensor | None  # (experts,), float64, or None without an intercept
    ridge_lambda: float


def solve_routers(
    statistics: Mapping[str, torch.Tensor | None],
    rho: float = DEFAULT_RHO,
    router_bias: bool = False,
    normalize: bool = True,
    temperature: float = 1.0,
) -> list[LayerRouter]:
    """Routers for every layer from members' whole statistics (name -> (layers, d+1, d+1) float64, or None), all
    in memory at once: for analyses on small models. The federation solves one layer at a time from packed
    statistics (``dume.shared.method.routers.solve_for_checkpoint``), with the same ``solve_layer``."""
    check_router_settings(rho, temperature)
    experts = tuple(name for name in sorted(statistics) if statistics[name] is not None)
    if not experts:
        raise DumeError(NO_STATISTICS)
    grams = [statistics[name].to(torch.float64) for name in experts]
    total = grams[0].clone()
    for gram in grams[1:]:  # sorted member order, so the same member set always gives the same bytes
        total += gram
    size = system_size(total, router_bias)
    return [solve_layer(layer, total[layer], torch.stack([gram[layer, :size, -1] for gram in grams], dim=1), experts,
                        rho, router_bias, normalize, temperature)
            for layer in range(total.shape[0])]


NO_STATISTICS = "no member has statistics yet: a router needs at least one"


def check_router_settings(rho: float, temperature: float) -> None:
    if rho <= 0:
        raise DumeError(f"rho must be positive (got {rho}): use e.g. --rho {DEFAULT_RHO}")
    if temperature <= 0:
        raise DumeError(f"temperature must be positive (got {temperature})")


def solve_layer(layer: int, total: torch.Tensor, targets: torch.Tensor, experts: tuple[str, ...], rho: float,
                router_bias: bool, normalize: bool, temperature: float) -> LayerRouter:
    """One layer's router from its summed G (the full (d+1)x(d+1) matrix) and ``targets``, column j being the
    last column of expert j's G cut to the system's size."""
    size = system_size(total[None], router_bias)
    factor, ridge_lambda = _factor(total[:size, :size], rho)
    if factor is None:
        raise DumeError(f"layer {layer}: the statistics are not positive definite even with ridge: increase rho")
    solution = torch.cholesky_solve(targets, factor)
    del factor
    weight, bias = solution[: total.shape[-1] - 1].T, (solution[-1] if router_bias else None)
    if normalize:
        norms = weight.norm(dim=1)
        if bool((norms == 0).any()):
            raise DumeError(f"layer {layer}: an expert's router column is zero; its statistics are empty")
        weight = weight / norms[:, None]
        bias = bias / norms if bias is not None else None
    weight = weight / temperature
    bias = bias / temperature if bias is not None else None
    return LayerRouter(experts, weight.contiguous(), bias, ridge_lambda)


def system_size(gram: torch.Tensor, router_bias: bool) -> int:
    """How much of G the solve uses: all of it with an intercept, else the X^T X block."""
    return gram.shape[-1] if router_bias else gram.shape[-1] - 1


def _factor(system: torch.Tensor, rho: float) -> tuple[torch.Tensor | None, float]:
    """The Cholesky factor of ``system + lambda I`` (None if it does not factorise) and lambda."""
    ridge_lambda = rho * float(torch.trace(system)) / system.shape[0]
    regularized = system + ridge_lambda * torch.eye(system.shape[0], dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(regularized)
    return (factor if int(info) == 0 and math.isfinite(ridge_lambda) else None), ridge_lambda


def check_solvable(gram: torch.Tensor, rho: float, router_bias: bool) -> int | None:
    """The first layer whose ``G + lambda I`` does not factorise (None if every layer does).

    lambda is what the solve takes for these statistics alone. Since lambda is linear in G, the federation's
    ``sum_j G_j + lambda I`` is the sum of every member's ``G_j + lambda_j I``: when each member's factorises, so
    does the sum, and no member's statistics can make the routers unsolvable for the others.
    """
    size = system_size(gram, router_bias)
    for layer in range(gram.shape[0]):
        if _factor(gram[layer, :size, :size].to(torch.float64), rho)[0] is None:
            return layer
    return None
