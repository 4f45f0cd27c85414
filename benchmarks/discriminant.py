"""A second closed-form router from the same statistics: linear discriminant analysis (LDA).

Ridge regression fits one-hot targets by least squares. LDA instead models each member's router inputs as a
Gaussian with its own mean and a covariance shared by all members, and routes a token to the member under which
it is most likely: ``logit_j = x^T S^-1 mu_j - mu_j^T S^-1 mu_j / 2 + log(n_j / n)``. Everything it needs is in
the members' G: ``mu_j`` and ``n_j`` from the last column, the within-member scatter
``S = (sum_j X_j^T X_j - n_j mu_j mu_j^T) / n``. It needs the intercept. Measured here, not (yet) in the product.
"""

from __future__ import annotations

import torch

from dume.shared.method.ridge import LayerRouter


def discriminant_routers(statistics: dict[str, torch.Tensor], shrinkage: float = 1e-4) -> list[LayerRouter]:
    names = sorted(statistics)
    grams = [statistics[name].to(torch.float64) for name in names]
    size = grams[0].shape[-1] - 1
    routers = []
    for layer in range(grams[0].shape[0]):
        counts = torch.stack([gram[layer, -1, -1] for gram in grams])
        means = torch.stack([gram[layer, :size, -1] / gram[layer, -1, -1] for gram in grams], dim=1)  # (d, members)
        scatter = sum(gram[layer, :size, :size] for gram in grams) - (means * counts) @ means.T
        covariance = scatter / counts.sum()
        covariance += shrinkage * torch.trace(covariance) / size * torch.eye(size, dtype=torch.float64)
        weight = torch.linalg.solve(covariance, means)  # (d, members)
        bias = -0.5 * (means * weight).sum(dim=0) + torch.log(counts / counts.sum())
        routers.append(LayerRouter(tuple(names), weight.T.contiguous(), bias, 0.0))
    return routers
