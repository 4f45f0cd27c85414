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
from dume.shared.method.statistics import gram_size


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
    return solve_system(layer, full_system(total, router_bias), targets, experts, rho, router_bias, normalize,
                        temperature)


def solve_system(layer: int, system: torch.Tensor, targets: torch.Tensor, experts: tuple[str, ...], rho: float,
                 router_bias: bool, normalize: bool, temperature: float) -> LayerRouter:
    """One layer's router from its system (``full_system`` or ``packed_system``, factorised in place: the caller
    hands it over) and ``targets``."""
    factor, ridge_lambda = _factor_in_place(system, rho)
    del system
    if factor is None:
        raise DumeError(f"layer {layer}: the statistics are not positive definite even with ridge: increase rho")
    # cholesky_solve's two triangular solves (LAPACK potrs), the same bytes, without its copy of the factor
    solution = torch.linalg.solve_triangular(factor.mT, torch.linalg.solve_triangular(factor, targets, upper=False),
                                             upper=True)
    del factor
    hidden = solution.shape[0] - 1 if router_bias else solution.shape[0]
    weight, bias = solution[:hidden].T, (solution[-1] if router_bias else None)
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


# The system G (or its X^T X block) is held for the Cholesky factorisation as one column-major matrix of which only
# the lower triangle is read (LAPACK's potrf, as torch calls it), and which becomes the factor: one (d+1)^2 buffer
# per solve, no mirrored copy of G, no identity matrix, no separate factor.
def full_system(gram: torch.Tensor, router_bias: bool) -> torch.Tensor:
    """The system of one layer's full G, copied into a fresh column-major buffer."""
    size = system_size(gram[None], router_bias)
    system = torch.empty(size, size, dtype=torch.float64).mT
    system.copy_(gram[:size, :size])
    return system


def packed_system(packed: torch.Tensor, router_bias: bool) -> torch.Tensor:
    """The system of one layer's packed upper triangle (``statistics.upper_triangle``'s layout), in a fresh
    column-major buffer: row r of the triangle, G[r, r:], is column r of G's lower triangle, so each row is one
    contiguous copy and the upper triangle is never written (it holds whatever the allocation held)."""
    size = gram_size(packed[None])
    rows = size if router_bias else size - 1
    transposed = torch.empty(rows, rows, dtype=torch.float64)  # its row r, from column r on, is column r of G
    start = 0
    for row in range(rows):
        transposed[row, row:].copy_(packed[start:start + rows - row])
        start += size - row
    return transposed.mT


def _factor_in_place(system: torch.Tensor, rho: float) -> tuple[torch.Tensor | None, float]:
    """``system`` (column-major, its lower triangle read) turned into the Cholesky factor of ``system + lambda I``,
    in place; None if it does not factorise. Adding ``lambda * 0.0`` everywhere first gives the bytes of adding
    ``lambda * I`` (it turns a -0.0 into 0.0, as that addition does)."""
    ridge_lambda = rho * float(torch.trace(system)) / system.shape[0]
    system.add_(ridge_lambda * 0.0)
    system.diagonal().add_(ridge_lambda)
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(system, out=(system, info))  # on the CPU: tril, then LAPACK potrf, in place
    return (system if int(info) == 0 and math.isfinite(ridge_lambda) else None), ridge_lambda


def packed_solvable(packed: torch.Tensor, rho: float, router_bias: bool) -> bool:
    """Whether one layer's ``G + lambda I`` factorises, G given as its packed upper triangle (``check_solvable``)."""
    return _factor_in_place(packed_system(packed, router_bias), rho)[0] is not None


def check_solvable(gram: torch.Tensor, rho: float, router_bias: bool) -> int | None:
    """The first layer whose ``G + lambda I`` does not factorise (None if every layer does).

    lambda is what the solve takes for these statistics alone. Since lambda is linear in G, the federation's
    ``sum_j G_j + lambda I`` is the sum of every member's ``G_j + lambda_j I``: when each member's factorises, so
    does the sum, and no member's statistics can make the routers unsolvable for the others.
    """
    for layer in range(gram.shape[0]):
        if _factor_in_place(full_system(gram[layer].to(torch.float64), router_bias), rho)[0] is None:
            return layer
    return None
