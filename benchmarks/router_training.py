"""The trained-router baseline, in the spirit of Branch-Train-MiX: the merged model's routers learnt by gradient.

Everything but the routers is frozen. Routers are trained with AdamW on batches drawn from every domain's training
data (which DUME never pools: this baseline needs the data in one place), at top-2 so that the renormalised
weights of two experts give the router a gradient, with a Switch-style load-balancing term
``experts * sum_e f_e * P_e`` (f_e: share of routed slots that go to e, P_e: mean router probability of e).
Routers start either from small random weights, as in BTX, or from the closed-form DUME routers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dume.shared.method.data import PackedData
from dume.shared.method.routing import RoutedMLP
from dume.shared.method.training import causal_lm_loss


@dataclass(frozen=True)
class RouterTraining:
    steps: int
    learning_rate: float = 1e-3
    batch_size: int = 16
    balance_weight: float = 0.01
    seed: int = 0


def routed_blocks(model: nn.Module) -> list[RoutedMLP]:
    return [layer.mlp for layer in model.model.layers]


def make_routers_trainable(model: nn.Module, random_init: bool, seed: int) -> list[nn.Parameter]:
    """Freeze the model and turn each layer's router weight into a parameter (random or as it is)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    routers = []
    for block in routed_blocks(model):
        weight = block.router_weight.detach().clone().float()
        if random_init:
            weight = (torch.randn(weight.shape, generator=generator) * 0.02).to(weight.device)
        del block.router_weight
        block.router_weight = nn.Parameter(weight)
        block.router_bias = None
        routers.append(block.router_weight)
    return routers


def balance_loss(inputs: list[torch.Tensor], blocks: list[RoutedMLP], top_k: int) -> torch.Tensor:
    total = torch.zeros((), device=inputs[0].device)
    for x, block in zip(inputs, blocks, strict=True):
        probabilities = torch.softmax(x @ block.router_weight.T, dim=-1)
        experts = probabilities.shape[-1]
        chosen = torch.topk(probabilities, top_k, dim=-1).indices
        share = torch.bincount(chosen.reshape(-1), minlength=experts).float() / chosen.numel()
        total = total + experts * (share * probabilities.mean(dim=0)).sum()
    return total / len(blocks)


def train_routers(model: nn.Module, mixture: PackedData, settings: RouterTraining, random_init: bool) -> list[float]:
    """Train the routers of a top-k ``RoutedMLP`` model in place; returns the language-modelling loss per step."""
    routers = make_routers_trainable(model, random_init, settings.seed)
    blocks = routed_blocks(model)
    captured: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(
        lambda _block, args: captured.append(args[0].reshape(-1, args[0].shape[-1]))) for block in blocks]
    optimizer = torch.optim.AdamW(routers, lr=settings.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    model.train()
    try:
        for _ in range(settings.steps):
            rows = torch.randint(0, len(mixture.input_ids), (settings.batch_size,), generator=generator)
            captured.clear()
            device = routers[0].device
            loss = causal_lm_loss(model, mixture.input_ids[rows].to(device), mixture.attention_mask[rows].to(device))
            balance = balance_loss([x.detach() for x in captured], blocks, blocks[0].top_k)
            optimizer.zero_grad(set_to_none=True)
            (loss + settings.balance_weight * balance).backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for hook in hooks:
            hook.remove()
        model.eval()
    return losses
