"""The merged model in memory: the library's own forward, independent of the stock MoE classes.

The dense architecture of the first expert is kept, its shared parameters are replaced by the basis, and each
decoder layer's MLP becomes a ``RoutedMLP`` over every member's MLP of that layer. How tokens are routed is a
setting, which gives the method and its baselines from one piece of code:

* ``"router"``: the closed-form router (softmax over logits, top-k, renormalised weights, as the stock classes do);
* ``"oracle"``: every token to one given expert (the model each member's statistics were computed with);
* ``"random"``: every token to k experts drawn uniformly, with equal weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dume.shared.method.averaging import canonical_mean
from dume.shared.method.expert import ExpertDirectory, load_dense_model, overwrite_parameters
from dume.shared.method.ridge import LayerRouter

ROUTING_MODES = ("router", "oracle", "random")


class RoutedMLP(nn.Module):
    """A Mixture-of-Experts block built from dense MLPs and a linear router."""

    def __init__(
        self,
        experts: Sequence[nn.Module],
        router: LayerRouter | None,
        top_k: int = 1,
        mode: str = "router",
        oracle_expert: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {mode!r}")
        self.experts = nn.ModuleList(experts)
        self.top_k, self.mode, self.oracle_expert, self.generator = top_k, mode, oracle_expert, generator
        if router is not None:
            dtype = next(self.experts[0].parameters()).dtype
            self.register_buffer("router_weight", router.weight.to(dtype))
            self.register_buffer("router_bias", None if router.bias is None else router.bias.to(dtype))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert indices), each (tokens, k)."""
        tokens = x.shape[0]
        if self.mode == "oracle":
            indices = torch.full((tokens, 1), self.oracle_expert, dtype=torch.long, device=x.device)
            return torch.ones(tokens, 1, device=x.device), indices
        if self.mode == "random":
            draws = torch.rand(tokens, len(self.experts), generator=self.generator).to(x.device)
            indices = draws.argsort(dim=-1)[:, : self.top_k]
            return torch.full((tokens, self.top_k), 1.0 / self.top_k, device=x.device), indices
        logits = F.linear(x, self.router_weight, self.router_bias)
        probabilities = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probabilities, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), indices

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, indices = self.route(x)
        output = torch.zeros_like(x)
        for expert_index, expert in enumerate(self.experts):
            token_rows, slot = torch.where(indices == expert_index)
            if len(token_rows):
                contribution = expert(x[token_rows]) * weights[token_rows, slot, None]
                output.index_add_(0, token_rows, contribution.to(output.dtype))
        return output.reshape(hidden_states.shape)


def build_routed_model(
    experts: Mapping[str, ExpertDirectory],
    basis: Mapping[str, torch.Tensor],
    routers: Sequence[LayerRouter] | None = None,
    top_k: int = 1,
    mode: str = "router",
    oracle_expert: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """The merged model with experts in sorted member order (``routers`` may cover a subset of members)."""
    names = sorted(experts)
    if routers is not None:
        names = list(routers[0].experts)
    model = load_dense_model(experts[names[0]])
    overwrite_parameters(model, basis)
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(model.model.layers):
        layer_experts = []
        for name in names:
            mlp = copy.deepcopy(layer.mlp)
            with torch.no_grad():
                for projection, parameter in mlp.named_parameters():
                    parameter.copy_(experts[name].mlp_tensor(index, projection.removesuffix(".weight")))
            layer_experts.append(mlp)
        layer.mlp = RoutedMLP(
            layer_experts,
            routers[index] if routers is not None else None,
            top_k=top_k,
            mode=mode,
            oracle_expert=names.index(oracle_expert) if oracle_expert is not None else 0,
            generator=generator,
        )
    return model


def build_weight_averaged_model(experts: Mapping[str, ExpertDirectory]) -> nn.Module:
    """The full weight averaging baseline: a dense model whose every parameter, MLPs included, is the mean."""
    first = experts[min(experts)]
    model = load_dense_model(first)
    means = {parameter: canonical_mean(experts, parameter) for parameter in first.parameter_names}
    overwrite_parameters(model, means)
    return model
